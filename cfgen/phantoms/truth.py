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


def _decoded(scm: PhantomSCM, subject, decode: DecodeConfig) -> np.ndarray:
    from cfgen.io.preprocess import quantize, to_fixed_size

    image, _ = scm.render(subject)
    return quantize(to_fixed_size(image, decode.size, decode.resize_mode), decode.dtype)


#: which counterfactual a truth is: "direct" holds every attribute the intervention does not set at the subject's
#: own value, "total" lets the SCM recompute the intervened attribute's descendants (`PhantomSCM.intervene`)
EFFECTS = ("direct", "total")


def held_intervention(subject, intervention: dict[str, Any]) -> dict[str, Any]:
    """do(intervention) with every other attribute held at `subject`'s own value: the counterfactual a prompt edit
    asks for. The edited prompt keeps every other attribute it states (and the edit keeps what the image shows), so
    where the intervened attribute causes others (in the phantoms, age and sex cause smoking, cardiomegaly,
    effusion and the confounded devices) an edit estimates its direct effect, not the total one. In the SCM,
    do(age=+10) gives 46 of the benchmark's 342 test subjects a new cardiomegaly and 33 a new effusion, which no
    edit of "63 year old" to "73 year old" that keeps the rest of the prompt should draw (bench/RESULTS.md)."""
    return {**subject.attributes(), **intervention}


def _intervened(scm: PhantomSCM, subject, intervention: dict[str, Any], effect: str):
    if effect not in EFFECTS:
        raise ValueError(f"effect must be one of {EFFECTS}, got {effect!r}")
    return scm.intervene(subject, held_intervention(subject, intervention) if effect == "direct" else intervention)


def true_counterfactual(scm: PhantomSCM, index: int, intervention: dict[str, Any], decode: DecodeConfig,
                        effect: str = "direct") -> np.ndarray:
    """The decoded-like image (uint8/uint16 [size, size]) of subject `index` under do(intervention): by default with
    the other attributes held (`held_intervention`, what an edit is scored against); `effect="total"` lets the
    intervention's descendants follow."""
    return _decoded(scm, _intervened(scm, scm.subject(int(index)), intervention, effect), decode)


#: noise a data row shows without its image (its split, which metadata cells are missing, the view): never redrawn
ROW_NOISE = ("u_split", "u_missing", "u_view")
#: other subjects' values tried per noise field when screening what an image hides
SCREEN_DONORS = 3
#: redraws tried per posterior draw kept
ATTEMPTS_PER_DRAW = 4


def _donor(index: int, k: int) -> int:
    """Donor subject indices far beyond any data set, distinct per (subject, k)."""
    return (1 << 40) + int(index) * 4096 + k


def unseen_noise(scm: PhantomSCM, index: int, decode: DecodeConfig) -> tuple[str, ...]:
    """The exogenous noise fields of subject `index` that neither its decoded image nor its attributes reveal:
    giving any one of them another subject's value (SCREEN_DONORS tries) leaves both exactly as they were. Where the
    finding is absent, its noise (which side the fluid takes, the meniscus) is unseen."""
    from dataclasses import fields

    subject = scm.subject(int(index))
    image, attributes = _decoded(scm, subject, decode), subject.attributes()
    hidden = []
    for name in (f.name for f in fields(subject.noise)):
        if name in ROW_NOISE:
            continue
        for k in range(SCREEN_DONORS):
            other = scm.redraw(subject, (name,), _donor(index, k))
            if other.attributes() != attributes or not np.array_equal(_decoded(scm, other, decode), image):
                break
        else:
            hidden.append(name)
    return tuple(hidden)


def counterfactual_posterior(scm: PhantomSCM, index: int, interventions: list[dict[str, Any]], decode: DecodeConfig,
                             draws: int = 16, effect: str = "direct") -> list[np.ndarray]:
    """For each intervention, up to `draws` true counterfactuals ([k, size, size]) of subjects the data cannot tell
    apart from subject `index`: its unseen noise redrawn from the prior, a draw kept only where the decoded factual
    image and the attributes come out identical (rejection sampling of the posterior given what an editor sees).

    The subject's own truth is one such draw, and nothing in its image or prompt says which: so these bound the error
    any edit can reach (`floor_errors`). For do(effusion=1) on a subject without fluid, the side the fluid would
    take is such noise; for the removal of a visible device there is none, and every draw is the truth.
    """
    subject = scm.subject(int(index))
    hidden = unseen_noise(scm, index, decode)
    image, attributes = _decoded(scm, subject, decode), subject.attributes()
    kept: list[list[np.ndarray]] = [[] for _ in interventions]
    for k in range(SCREEN_DONORS, SCREEN_DONORS + draws * ATTEMPTS_PER_DRAW):
        if len(kept[0]) >= draws:
            break
        other = scm.redraw(subject, hidden, _donor(index, k)) if hidden else subject
        if other.attributes() != attributes or not np.array_equal(_decoded(scm, other, decode), image):
            continue
        for out, intervention in zip(kept, interventions):
            out.append(_decoded(scm, _intervened(scm, other, intervention, effect), decode))
    return [np.stack(out) for out in kept]


def floor_errors(truth: np.ndarray, posterior: np.ndarray) -> tuple[float, float]:
    """(best, sampled) mean absolute error against `truth` (unit floats): of the pixel-wise median of the posterior's
    draws, the deterministic edit with the least expected L1 given the image and prompt; and of a single draw on
    average, what a model that samples the posterior exactly would score."""
    best = float(np.mean(np.abs(np.median(posterior, axis=0) - truth)))
    sampled = float(np.mean(np.abs(posterior - truth[None])))
    return best, sampled


def changes_truth(scm: PhantomSCM, index: int, intervention: dict[str, Any], effect: str = "direct") -> bool:
    """Whether do(intervention) changes any of the subject's attributes (False for a null edit)."""
    subject = scm.subject(int(index))
    return _intervened(scm, subject, intervention, effect).attributes() != subject.attributes()


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
