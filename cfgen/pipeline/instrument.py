"""The instrument's own test: does the classifier-based scoring read perfect counterfactuals as perfect and useless
ones as useless? Only phantoms can say, because only there the true counterfactual exists.

For each edit do(A=a) over the test split, three sets of "counterfactuals" are scored exactly as the generation
job scores an edit:

- ``true``: the phantom SCM's true counterfactual (same exogenous noise, A set to a), preprocessed like a decoded
  image: must flip, move nothing else, and look as real as real images;
- ``nothing``: the input itself: must not flip;
- ``other``: a different test subject whose true A is a: flips, but keeps nothing of the input.

Realism is the Frechet distance on classifier features to real target-group images of the validate split (other
subjects), matched to the edited subjects' other attributes (`cfgen.metrics.realism.matched_realism`), beside the
distance of an equally large, equally matched real target-group sample from the test split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfgen.config import DecodeConfig
from cfgen.metrics.effectiveness import edit_target, row_scores, summarize_scores
from cfgen.metrics.image import change_region, l1, ssim
from cfgen.classify.labels import matching_covariates
from cfgen.metrics.realism import matched_realism

SETS = ("true", "nothing", "other")
_NUMBERS = ("flip_rate", "mean_target_shift", "max_off_target_shift", "l1_to_input", "l1_outside_region",
            "ssim_to_input", "l1_to_truth", "realism_distance", "realism_real_baseline", "realism_n")
#: The interventions the instrument is checked on: one per planted mechanism of the phantoms.
INSTRUMENT_EDITS = ({"support_devices": 0}, {"pleural_effusion": 1}, {"cardiomegaly": 1}, {"smoking": 1})


def true_counterfactuals(scm, indices: np.ndarray, edit: dict[str, Any], decode: DecodeConfig) -> np.ndarray:
    """The SCM's true counterfactual images of subjects `indices` under do(edit), as uint8 decoded images."""
    from cfgen.phantoms.truth import true_counterfactual

    return np.stack([true_counterfactual(scm, int(i), edit, decode) for i in indices])


def _true_states(scm, indices: np.ndarray, name: str) -> np.ndarray:
    from cfgen.metrics.effectiveness import target_value

    return np.array([target_value(name, getattr(scm.subject(int(i)), name)) for i in indices], dtype=np.float64)


def calibration_table(
    model,
    scm,
    test: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    edits: list[dict[str, Any]],
    decode: DecodeConfig,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (set, edit) with flip rate, off-target shifts, minimality, preservation and realism.

    `test` / `reference`: decoded "image" [N,H,W], "phantom_index" [N] and the label columns (what the manifest
    says; the realism match uses them) of the test and validate splits."""
    rng = np.random.default_rng(seed)
    factual = np.asarray(test["image"])
    index = np.asarray(test["phantom_index"]).astype(np.int64)
    before = model.predict(factual)
    ref_images = np.asarray(reference["image"])
    ref_index = np.asarray(reference["phantom_index"]).astype(np.int64)
    ref_reads = model.predict(ref_images)
    rows = []
    for edit in edits:
        name, target = edit_target(edit, model.attributes)
        state = _true_states(scm, index, name)
        needs = state != target
        donors = np.flatnonzero(state == target)
        if needs.sum() < 2 or len(donors) < 2:
            # too small a test split to say anything: a row that says so, not a crash or a silent gap
            note = (f"{int(needs.sum())} test subjects need do({name}={target:g}) and {len(donors)} have it "
                    "already: too few to score")
            rows.extend({"set": set_name, "edit": ",".join(f"{k}={v}" for k, v in edit.items()), "n": int(needs.sum()),
                         **{key: float("nan") for key in _NUMBERS}, "off_target_attribute": "", "note": note}
                        for set_name in SETS)
            continue
        truth = true_counterfactuals(scm, index, edit, decode)
        regions = [change_region(factual[i], truth[i]) for i in range(len(factual))]
        other = factual[[rng.choice(donors[donors != i]) if (donors != i).any() else donors[0]
                         for i in range(len(factual))]]
        at_target = _true_states(scm, ref_index, name) == target
        ref_features = ref_reads["features"][at_target]
        ref_cov = matching_covariates(ref_reads, reference, name)[at_target]
        cov = matching_covariates(before, test, name)
        for set_name, images in (("true", truth), ("nothing", factual), ("other", other)):
            after = model.predict(images)
            cols = row_scores(before, after, edit, factual_state=state)
            summary = summarize_scores(cols)
            # the set keeps its subjects' other attributes: the reference and the real sample are matched to them
            distance, baseline, n_real = matched_realism(
                after["features"][needs], cov[needs], ref_features, ref_cov,
                before["features"][donors], cov[donors], seed=seed)
            rows.append({
                "set": set_name,
                "edit": ",".join(f"{k}={v}" for k, v in edit.items()),
                **summary,
                "l1_to_input": float(np.mean([l1(factual[i], images[i]) for i in np.flatnonzero(needs)])),
                "l1_outside_region": float(np.mean([l1(factual[i], images[i], ~regions[i])
                                                    for i in np.flatnonzero(needs)])),
                "ssim_to_input": float(np.mean([ssim(factual[i], images[i]) for i in np.flatnonzero(needs)])),
                "l1_to_truth": float(np.mean([l1(truth[i], images[i]) for i in np.flatnonzero(needs)])),
                "realism_distance": distance,
                "realism_real_baseline": baseline,
                "realism_n": n_real,
                "realism_reference_n": int(len(ref_features)),
                "note": "",
            })
    return rows


def check_calibration(rows: list[dict[str, Any]], min_flip: float = 0.9, max_nothing_flip: float = 0.1,
                      max_off_target: float = 0.1, realism_factor: float = 1.5) -> list[str]:
    """What the table says is wrong with the instrument (empty when it reads truth as truth and nothing as nothing).

    The thresholds are the acceptance of the instrument's issue; a miss is reported, never hidden."""
    problems = []
    for r in rows:
        tag = f"{r['set']} do({r['edit']})"
        if r.get("note"):
            problems.append(f"{tag}: {r['note']}")
            continue
        if r["set"] == "true":
            if not r["flip_rate"] >= min_flip:
                problems.append(f"{tag}: flip rate {r['flip_rate']:.3f} < {min_flip}")
            if not r["max_off_target_shift"] <= max_off_target:
                problems.append(f"{tag}: off-target shift {r['max_off_target_shift']:.3f} of "
                                f"{r['off_target_attribute']} > {max_off_target}")
            if not r["realism_distance"] <= realism_factor * r["realism_real_baseline"]:
                problems.append(f"{tag}: realism {r['realism_distance']:.3f} > {realism_factor} x real baseline "
                                f"{r['realism_real_baseline']:.3f}")
        elif r["set"] == "nothing" and not r["flip_rate"] <= max_nothing_flip:
            problems.append(f"{tag}: flip rate {r['flip_rate']:.3f} > {max_nothing_flip}")
    return problems


def phantom_calibration(job, classifier_uri: str, decoded_uri: str, edits=INSTRUMENT_EDITS) -> list[dict[str, Any]]:
    """The calibration table for a phantom data set ingested at `decoded_uri` (test split scored, validate split
    as the realism reference); the benchmark and the demo both call this."""
    from cfgen.classify.store import load_classifier
    from cfgen.phantoms.scm import PhantomSCM
    from cfgen.pipeline.classify import split_arrays
    from cfgen.pipeline.workflows import phantom_config_for

    phantoms = phantom_config_for(job)
    if phantoms is None:
        raise ValueError(f"{job.data.manifest_uri} is not a phantom data set (no phantom_config.json beside it): "
                         "the instrument can only be checked where the true counterfactuals exist")
    model = load_classifier(classifier_uri, job.storage, job.tracking)
    test = split_arrays(job, decoded_uri, "test", extra=("phantom_index",))
    reference = split_arrays(job, decoded_uri, "validate", extra=("phantom_index",))
    return calibration_table(model, PhantomSCM(phantoms), test, reference, list(edits), job.data.decode,
                             seed=job.classifier.train.seed)
