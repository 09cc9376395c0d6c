"""The run report: one self-contained HTML page (images inlined) that can be opened from a laptop or a bucket.

It shows what a reader needs to judge the run: how many images went in and how many failed and why, the training
loss, the aggregate edit metrics per edit (with the do-nothing baseline next to the counterfactual error), and a
grid of factual | counterfactual | true counterfactual | difference.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

import numpy as np
import pandas as pd

from cfgen.config import JobConfig
from cfgen.io.storage import join_uri, pyarrow_filesystem, read_bytes, write_bytes

METRIC_COLUMNS = (
    "cf_error_l1", "identity_error_l1", "effect_ratio", "l1_factual_counterfactual", "reconstruction_l1",
    "autoencoder_l1", "null_ssim", "l1_outside_region", "reversibility_l1", "unet_forward", "unet_backward",
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img{image-rendering:pixelated;width:512px;border:1px solid #999}
.ex{display:inline-block;margin:6px;vertical-align:top;font-size:12px;width:520px}.note{color:#555}
"""


def read_results(results_uri: str, job: JobConfig, keys_uri: str | None = None) -> pd.DataFrame:
    """The generation rows, only those of the key table at `keys_uri` where given (a folder rerun with other
    settings holds the earlier settings' rows too)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    fs, path = pyarrow_filesystem(results_uri, job.storage)
    dataset = pds.dataset(path, filesystem=fs, format="parquet")
    if not keys_uri:
        return dataset.to_table().to_pandas()
    keys_fs, keys_path = pyarrow_filesystem(keys_uri, job.storage)
    keys = pds.dataset(keys_path, filesystem=keys_fs, format="parquet").to_table(columns=["key"]).column("key")
    return dataset.to_table(filter=pc.field("key").isin(keys)).to_pandas()


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per edit: rows, how many edits change the true attributes (phantoms), the mean of each metric over those
    (over all rows where the truth is unknown), how often the counterfactual beats doing nothing, and what the
    attribute classifier reads (flip rate toward the target, mean shift, largest off-target shift, realism)."""
    present = [c for c in METRIC_COLUMNS if c in results.columns]
    effective = results.get("edit_changes_truth", pd.Series(np.nan, index=results.index))
    scored = results[(effective == 1) | effective.isna()]
    table = scored.groupby("edit_name")[present].mean()
    table.insert(0, "rows", results.groupby("edit_name").size())
    table.insert(1, "rows_changing_truth", (effective == 1).groupby(results["edit_name"]).sum())
    if {"cf_error_l1", "identity_error_l1"} <= set(results.columns):
        beats = scored["cf_error_l1"] < scored["identity_error_l1"]
        table["cf_beats_identity"] = beats.groupby(scored["edit_name"]).mean()
        # the verdict a user reads first: is this edit, on average, closer to the truth than not editing at all?
        table["beats_doing_nothing"] = np.where(table["cf_error_l1"] < table["identity_error_l1"], "yes", "no")
    if "method" in results.columns:
        table.insert(0, "method", results.groupby("edit_name")["method"].first())
    if "clf_needs_change" in results.columns:
        clf = pd.DataFrame([classifier_summary(group) for _, group in results.groupby("edit_name")],
                           index=[name for name, _ in results.groupby("edit_name")])
        table = table.join(clf)
    return table.reset_index()


def classifier_summary(rows: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """The classifier's reading of one edit's rows: over the rows whose factual state differs from the target,
    the flip rate, the mean shift toward the target, the largest mean off-target shift, and the realism distance
    of their counterfactuals' features to real images already at the target (with the real-vs-real baseline)."""
    from cfgen.metrics.effectiveness import summarize_scores
    from cfgen.metrics.realism import realism_against

    needs = rows["clf_needs_change"] == 1
    cols = {"needs_change": needs.to_numpy(), "reached_target": rows["clf_reached_target"].to_numpy(),
            "target_shift": rows["clf_target_shift"].to_numpy()}
    edited = json.loads(rows["edit"].iloc[0])
    heads = [c.removeprefix("p_after__") for c in rows.columns if c.startswith("p_after__")]
    for head in heads:
        if head not in edited:
            cols[f"shift__{head}"] = (rows[f"p_after__{head}"] - rows[f"p_before__{head}"]).to_numpy()
    summary = summarize_scores(cols)
    out = {"clf_flip_rate": summary["flip_rate"], "clf_mean_target_shift": summary["mean_target_shift"],
           "clf_max_off_target_shift": summary["max_off_target_shift"]}
    if "counterfactual_features" in rows.columns and len(edited) == 1:
        (name, value), = edited.items()
        from cfgen.metrics.effectiveness import target_value

        at_target = rows["factual_state"] == target_value(name, value)
        cf = np.stack(rows.loc[needs, "counterfactual_features"].to_numpy()) if needs.any() else np.zeros((0, 1))
        real = np.stack(rows.loc[at_target, "factual_features"].to_numpy()) if at_target.any() else np.zeros((0, 1))
        # matched on the other attributes (the counterfactuals keep their subjects'): labels, else the reads
        from cfgen.classify.labels import matching_covariates

        reads = {h: rows[f"p_before__{h}"].to_numpy(np.float64) for h in heads}
        cov = matching_covariates(reads, rows, name)
        distance, baseline, n = realism_against(real, cf, seed=seed, real_covariates=cov[at_target.to_numpy()],
                                                generated_covariates=cov[needs.to_numpy()])
        out.update(clf_realism_fd=distance, clf_realism_real_baseline=baseline, clf_realism_n=n)
    return out


def html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th class=l>{html.escape(str(c))}</th>" if i == 0 else f"<th>{html.escape(str(c))}</th>"
                   for i, c in enumerate(frame.columns))
    body = []
    for _, row in frame.iterrows():
        cells = []
        for i, v in enumerate(row):
            text = f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v)
            cells.append(f"<td class=l>{html.escape(text)}</td>" if i == 0 else f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def classifier_section(evaluation: dict[str, Any]) -> str:
    """Held-out performance of the attribute classifier every clf_* figure is read off."""
    rows = []
    for name, v in evaluation["attributes"].items():
        if "auroc" in v:
            rows.append({"attribute": name, "n": v["n"], "positives": v["positives"], "AUROC": v["auroc"],
                         "95% CI": f"{v['auroc_ci_low']:.3f}-{v['auroc_ci_high']:.3f}",
                         "temperature": evaluation.get("calibration", {}).get(name, {}).get("temperature", 1.0)})
        else:
            rows.append({"attribute": f"{name} (MAE, years)", "n": v["n"], "positives": "", "AUROC": v["mae_years"],
                         "95% CI": "", "temperature": ""})
    note = (f"<p class=note>{evaluation.get('architecture', '')} trained on {evaluation.get('n_train')} images, "
            f"temperatures fitted on {evaluation.get('n_validate')} validate images, scored on "
            f"{evaluation.get('n_test')} test images (bootstrap 95% CI); uncertain labels: "
            f"{evaluation.get('uncertain_policy')}.</p>")
    return "<h2>Attribute classifier</h2>" + note + html_table(pd.DataFrame(rows))


def calibration_section(rows: list[dict[str, Any]]) -> str:
    """The instrument read on true, do-nothing and other-subject counterfactuals (phantoms)."""
    keep = ["set", "edit", "n", "flip_rate", "mean_target_shift", "max_off_target_shift", "off_target_attribute",
            "l1_outside_region", "ssim_to_input", "realism_distance", "realism_real_baseline", "realism_n"]
    frame = pd.DataFrame(rows)
    frame = frame[keep + (["note"] if "note" in frame and frame["note"].astype(bool).any() else [])]
    return ("<h2>Instrument calibration</h2><p class=note>true: the phantom's true counterfactual; nothing: the "
            "input itself; other: another subject with the target attribute. A sound instrument reads true as "
            "flipped with no off-target shift and real-looking, nothing as unflipped, other as flipped but far from "
            "the input.</p>" + html_table(frame))


def write_report(
    job: JobConfig,
    results_uri: str,
    facts: dict[str, Any] | None = None,
    errors: pd.DataFrame | None = None,
    max_examples: int = 12,
    classifier: dict[str, Any] | None = None,
    calibration: list[dict[str, Any]] | None = None,
    keys_uri: str | None = None,
) -> str:
    """Write `<output_uri>/report.html` and return its URI. `classifier`: the classifier's evaluation (held-out
    AUROC, age MAE); `calibration`: the instrument's calibration table (`cfgen.pipeline.instrument`); `keys_uri`:
    the run's key table, whose rows alone are reported."""
    results = read_results(results_uri, job, keys_uri)
    summary = summarize(results) if len(results) else pd.DataFrame()
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>cfgen report</title><style>{STYLE}</style>"
             "</head><body><h1>cfgen run report</h1>"]
    if facts:
        parts.append("<h2>Run</h2>" + html_table(pd.DataFrame({"what": list(facts), "value": [str(v) for v in
                                                                                           facts.values()]})))
    if errors is not None:
        parts.append(f"<h2>Input errors ({len(errors)})</h2>")
        if len(errors):
            counts = errors.assign(kind=errors["reason"].str.split(":").str[0]).groupby(["stage", "kind"]).size()
            parts.append(html_table(counts.rename("rows").reset_index()))
    if classifier:
        parts.append(classifier_section(classifier))
    if calibration:
        parts.append(calibration_section(calibration))
    parts.append(
        "<h2>Edits</h2><p class=note>Means over the edits that change the phantom's true attributes "
        "(rows_changing_truth: a null edit, such as removing a device from a patient without one, is left out); "
        "over all rows when the truth is unknown. cf_error_l1: mean |counterfactual - true counterfactual| "
        "(phantoms only); identity_error_l1: the same error for the unedited image, the baseline a useful edit must "
        "beat; effect_ratio: the edit's mean change where the truth changes, over the true change (1 = the true "
        "effect, 0 = none); reconstruction_l1: the null edit (invert, regenerate with the factual prompt) against the input; "
        "autoencoder_l1: the VAE alone, decode(encode(image)), a floor under every other error; null_ssim: "
        "SSIM of the null edit to the input; l1_outside_region: the change outside the edit region (the true change "
        "on phantoms, the lung mask elsewhere); reversibility_l1: edit, then edit back, against the input. clf_*: "
        "the attribute classifier's reading over the rows whose factual state differs from the target: flip rate "
        "toward it, mean calibrated shift toward it, the largest mean shift of another attribute, and realism as "
        "the Frechet distance on the classifier's features to real images at the target, beside the distance of "
        "a real sample of the same size (clf_realism_real_baseline). Intensities in [0,1].</p>"
    )
    parts.append(html_table(summary) if len(summary) else "<p>No rows were generated.</p>")
    parts.append("<h2>Examples</h2><p class=note>factual | counterfactual | true counterfactual (grey when "
                 "unknown) | difference (grey = no change, bright = brighter)</p>")
    for _, row in results.sort_values(["edit_name", "image_id"]).groupby("edit_name").head(
        max(1, max_examples // max(1, results["edit_name"].nunique()))
    ).iterrows():
        png = base64.b64encode(read_bytes(row["panel_uri"], job.storage)).decode()
        caption = (f"<b>{html.escape(str(row['image_id']))}</b> do({html.escape(str(row['edit_name']))})<br>"
                   f"{html.escape(str(row['prompt']))}<br>&rarr; {html.escape(str(row['counterfactual_prompt']))}"
                   f"<br>cf error {row.get('cf_error_l1', float('nan')):.4f}, identity "
                   f"{row.get('identity_error_l1', float('nan')):.4f}")
        parts.append(f"<div class=ex><img src='data:image/png;base64,{png}'><br>{caption}</div>")
    parts.append("</body></html>")
    uri = join_uri(job.output_uri, "report.html")
    write_bytes(uri, "\n".join(parts).encode(), job.storage)
    return uri
