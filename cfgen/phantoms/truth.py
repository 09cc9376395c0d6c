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
