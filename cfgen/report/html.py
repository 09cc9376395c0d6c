"""The run report: one self-contained HTML page (images inlined) that can be opened from a laptop or a bucket.

It shows what a reader needs to judge the run: how many images went in and how many failed and why, the training
loss, the aggregate edit metrics per edit (with the do-nothing baseline next to the counterfactual error), and a
grid of factual | counterfactual | true counterfactual | difference.
"""

from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np
import pandas as pd

from cfgen.config import JobConfig
from cfgen.io.storage import join_uri, pyarrow_filesystem, read_bytes, write_bytes

METRIC_COLUMNS = (
    "cf_error_l1", "identity_error_l1", "effect_ratio", "l1_factual_counterfactual", "reconstruction_l1",
    "autoencoder_l1",
)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img{image-rendering:pixelated;width:512px;border:1px solid #999}
.ex{display:inline-block;margin:6px;vertical-align:top;font-size:12px;width:520px}.note{color:#555}
"""


def read_results(results_uri: str, job: JobConfig) -> pd.DataFrame:
    import pyarrow.dataset as pds

    fs, path = pyarrow_filesystem(results_uri, job.storage)
    return pds.dataset(path, filesystem=fs, format="parquet").to_table().to_pandas()


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per edit: rows, how many edits change the true attributes (phantoms), the mean of each metric over those
    (over all rows where the truth is unknown), and how often the counterfactual beats doing nothing."""
    present = [c for c in METRIC_COLUMNS if c in results.columns]
    effective = results.get("edit_changes_truth", pd.Series(np.nan, index=results.index))
    scored = results[(effective == 1) | effective.isna()]
    table = scored.groupby("edit_name")[present].mean()
    table.insert(0, "rows", results.groupby("edit_name").size())
    table.insert(1, "rows_changing_truth", (effective == 1).groupby(results["edit_name"]).sum())
    if {"cf_error_l1", "identity_error_l1"} <= set(results.columns):
        beats = scored["cf_error_l1"] < scored["identity_error_l1"]
        table["cf_beats_identity"] = beats.groupby(scored["edit_name"]).mean()
    return table.reset_index()


def _table(frame: pd.DataFrame) -> str:
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


def write_report(
    job: JobConfig,
    results_uri: str,
    facts: dict[str, Any] | None = None,
    errors: pd.DataFrame | None = None,
    max_examples: int = 12,
) -> str:
    """Write `<output_uri>/report.html` and return its URI."""
    results = read_results(results_uri, job)
    summary = summarize(results) if len(results) else pd.DataFrame()
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>cfgen report</title><style>{_STYLE}</style>"
             "</head><body><h1>cfgen run report</h1>"]
    if facts:
        parts.append("<h2>Run</h2>" + _table(pd.DataFrame({"what": list(facts), "value": [str(v) for v in
                                                                                           facts.values()]})))
    if errors is not None:
        parts.append(f"<h2>Input errors ({len(errors)})</h2>")
        if len(errors):
            counts = errors.assign(kind=errors["reason"].str.split(":").str[0]).groupby(["stage", "kind"]).size()
            parts.append(_table(counts.rename("rows").reset_index()))
    parts.append(
        "<h2>Edits</h2><p class=note>Means over the edits that change the phantom's true attributes "
        "(rows_changing_truth: a null edit, such as removing a device from a patient without one, is left out); "
        "over all rows when the truth is unknown. cf_error_l1: mean |counterfactual - true counterfactual| "
        "(phantoms only); identity_error_l1: the same error for the unedited image, the baseline a useful edit must "
        "beat; effect_ratio: the edit's mean change where the truth changes, over the true change (1 = the true "
        "effect, 0 = none); reconstruction_l1: the null edit (invert, regenerate with the factual prompt) against the input; "
        "autoencoder_l1: the VAE alone, decode(encode(image)), a floor under every other error. Intensities in "
        "[0,1].</p>"
    )
    parts.append(_table(summary) if len(summary) else "<p>No rows were generated.</p>")
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
