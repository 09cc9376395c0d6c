"""Choosing the best setting of a sweep (Prompt-to-Prompt's self-replace settings, ddpm's direction scales) per
image with the project's attribute classifier.

PRISM keeps, of the candidates its self-attention sweep makes, the one its CLIP filters like best (image-image
similarity for preservation, image-text and directional similarity for the edit; DESIGN.md §2). CLIP weights cannot
be had here, and CLIP knows little of chest X-rays anyway, so the same two halves are read off the attribute
classifier and the pixels:

    score(candidate) = effect - off_target_weight * off_target - pixel_weight * mean |candidate - image|

- ``effect`` in [0, 1]: how far the classifier puts the candidate at the edit's target. For a binary attribute the
  calibrated probability of the target state (p for a target of 1, 1 - p for 0); for age the closeness
  tolerance / (tolerance + |predicted age - target|) with tolerance = `AGE_TOLERANCE_YEARS` (1 at the target, 1/2
  at the tolerance). An edit of several attributes averages them.
- ``off_target`` in [0, 1]: the mean absolute change, from the input to the candidate, of the probabilities of the
  binary attributes the edit does not name (an edit of A should leave B where it was; age, in years, is left out
  as `summarize_scores` leaves it out of the off-target figure).
- ``mean |candidate - image|``: the pixels the candidate changes, in [0, 1] units.

A candidate the classifier reads as at the target (``effect`` >= 0.5: the target state more likely than not, for
age within the tolerance) beats every candidate that is not (+1), so the score keeps the least change that makes
the edit. Where no candidate of an image makes it (a weak model, an edit the image resists), the pixel term is
dropped for that image and the candidate closest to the target wins: the least change that does not make the edit
would be the input itself, which is no counterfactual (on a weakly trained model a sweep of edit strengths kept its
weakest setting everywhere, and the demo's edits changed nothing).

Defaults: off_target_weight 1 (a point of probability moved elsewhere costs what a point toward the target gains),
pixel_weight 5 (a phantom edit changes some 0.01-0.03 of the mean intensity, so the term is worth a few points of
probability: it breaks ties between candidates the classifier reads alike and keeps the one that changes least).
An edit of attributes the classifier has no head for has no effect term: its candidates are ranked by
preservation alone, i.e. the one closest to the input wins.

The same classifier then measures the flip rate of the chosen counterfactuals, so a benchmark's flip rate is
optimistic for the sweep methods; the error against the phantom's true counterfactual is not read off it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cfgen.metrics.effectiveness import AGE_TOLERANCE_YEARS, REGRESSION_ATTRIBUTES, target_value

PIXEL_WEIGHT = 5.0
OFF_TARGET_WEIGHT = 1.0
#: the effect at which the classifier reads a candidate as at the target
REACHED = 0.5


def edit_targets(edit: Mapping[str, Any], attributes: Sequence[str]) -> dict[str, float]:
    """{attribute: target as the classifier reads it} for the edited attributes the classifier has a head for."""
    return {name: target_value(name, value) for name, value in edit.items() if name in attributes}


def effect_score(predicted: Mapping[str, np.ndarray], targets: Mapping[str, float]) -> np.ndarray | None:
    """[N] in [0, 1]: how far the classifier puts each image at the targets (see the module's docstring); None
    when there is no target the classifier reads."""
    if not targets:
        return None
    parts = []
    for name, target in targets.items():
        value = np.asarray(predicted[name], dtype=np.float64)
        if name in REGRESSION_ATTRIBUTES:
            parts.append(AGE_TOLERANCE_YEARS / (AGE_TOLERANCE_YEARS + np.abs(value - target)))
        else:
            parts.append(value if target >= 0.5 else 1.0 - value)
    return np.mean(parts, axis=0)


def off_target_shift(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                     edited: Sequence[str]) -> np.ndarray:
    """[N]: the mean |after - before| of the binary attributes not edited (0 when there are none)."""
    others = [a for a in before if a != "features" and a not in edited and a not in REGRESSION_ATTRIBUTES]
    if not others:
        return np.zeros(len(next(iter(before.values()))))
    return np.mean([np.abs(np.asarray(after[a], np.float64) - np.asarray(before[a], np.float64)) for a in others],
                   axis=0)


def selection_scores(classifier, candidates: list[np.ndarray], image: np.ndarray, edit: Mapping[str, Any],
                     pixel_weight: float = PIXEL_WEIGHT, off_target_weight: float = OFF_TARGET_WEIGHT) -> np.ndarray:
    """[n_candidates, B] scores of the candidates (each [B,H,W] in [0,1]) of `image` [B,H,W] for `edit`."""
    from cfgen.metrics.image import as_unit_float

    x = as_unit_float(np.asarray(image))
    stacked = np.stack([as_unit_float(np.asarray(c)) for c in candidates])  # [S, B, H, W]
    n_settings, n = stacked.shape[:2]
    before = classifier.predict(x)
    after_all = classifier.predict(stacked.reshape(n_settings * n, *x.shape[1:]))
    targets = edit_targets(edit, [a for a in before if a != "features"])
    effects, off_target = np.zeros((n_settings, n)), np.empty((n_settings, n))
    for s in range(n_settings):
        after = {k: v[s * n:(s + 1) * n] for k, v in after_all.items()}
        effect = effect_score(after, targets)
        effects[s] = 0.0 if effect is None else effect
        off_target[s] = off_target_shift(before, after, list(edit))
    pixels = np.abs(stacked - x[None]).reshape(n_settings, n, -1).mean(axis=2)
    if not targets:
        return -off_target_weight * off_target - pixel_weight * pixels
    reached = effects >= REACHED
    some = reached.any(axis=0)  # [B]: the images some candidate makes the edit of; the others ignore the pixels
    return effects + reached - off_target_weight * off_target - pixel_weight * pixels * some[None]


def classifier_selection(classifier, edits: Sequence[Mapping[str, Any]], pixel_weight: float = PIXEL_WEIGHT,
                         off_target_weight: float = OFF_TARGET_WEIGHT):
    """The engine's `select` callable for `edits` (the engine's edit_index-th prompt list is edits[edit_index]):
    scores every sweep candidate with `selection_scores`, the classifier a loaded `AttributeClassifier`."""
    edits = [dict(e) for e in edits]
    for edit in edits:  # a bad edit value (sex 'X') fails here, not in the middle of a batch
        edit_targets(edit, classifier.attributes)

    def select(candidates: list[np.ndarray], image: np.ndarray, edit_index: int) -> np.ndarray:
        return selection_scores(classifier, candidates, image, edits[edit_index], pixel_weight, off_target_weight)

    return select


def sweep_selection(config, load_classifier):
    """The `select` for an `EditConfig` whose method makes several candidates (`sweep_size` > 1): the attribute
    classifier that `load_classifier()` returns (called only then), scoring them by `selection_scores`. None where
    there is nothing to choose or no classifier (`load_classifier` None), so the engine keeps the most preserving
    candidate."""
    if config.sweep_size < 2 or load_classifier is None:
        return None
    return classifier_selection(load_classifier(), config.edits)
