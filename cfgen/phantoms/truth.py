"""The true counterfactual of a phantom, as the data plane would have decoded it.

Generation scores an edit against this image, so it goes through the same fixed-size and quantisation steps as a
decoded input (`cfgen.io.preprocess`); a factual decoded from the phantom's DICOM and its null-intervention truth
then differ by at most one grey level.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfgen.config import DecodeConfig
from cfgen.phantoms.scm import PhantomSCM


def true_counterfactual(scm: PhantomSCM, index: int, intervention: dict[str, Any], decode: DecodeConfig) -> np.ndarray:
    """The decoded-like image (uint8/uint16 [size, size]) of subject `index` under do(intervention)."""
    from cfgen.io.preprocess import quantize, to_fixed_size

    image, _ = scm.render(scm.intervene(scm.subject(int(index)), intervention))
    return quantize(to_fixed_size(image, decode.size, decode.resize_mode), decode.dtype)


def changes_truth(scm: PhantomSCM, index: int, intervention: dict[str, Any]) -> bool:
    """Whether do(intervention) changes any of the subject's attributes (False for a null edit)."""
    subject = scm.subject(int(index))
    return scm.intervene(subject, intervention).attributes() != subject.attributes()


#: structures the autoencoder must keep (issue 16): what edits act on or must leave alone
STRUCTURES = ("ribs", "lung_edges", "device", "effusion_meniscus", "heart_border")


def structure_masks(scm: PhantomSCM, index: int, decode: DecodeConfig) -> dict[str, np.ndarray]:
    """Boolean [size, size] masks of the fine structures of subject `index`, at the decoded size: ribs, the lung
    edges, the device (box and lead), the effusion's meniscus and the heart border (edges 2 pixels wide)."""
    from scipy.ndimage import binary_dilation, binary_erosion

    from cfgen.io.preprocess import to_fixed_size

    regions = scm.render_regions(scm.subject(int(index)))
    fixed = {k: to_fixed_size(v.astype(np.float32), decode.size, decode.resize_mode) > 0.5 for k, v in regions.items()}

    def edge(mask: np.ndarray) -> np.ndarray:
        return binary_dilation(mask) & ~binary_erosion(mask)

    return {"ribs": fixed["ribs"], "lung_edges": edge(fixed["lungs"]), "device": binary_dilation(fixed["device"]),
            "effusion_meniscus": edge(fixed["effusion"]) & fixed["lungs"] if fixed["effusion"].any()
            else np.zeros_like(fixed["lungs"]), "heart_border": edge(fixed["heart"])}
