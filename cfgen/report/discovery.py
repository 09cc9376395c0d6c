"""The discovery report: one self-contained HTML page (images inlined) that shows what the discovery module found.

A reader should be able to judge, top to bottom: what was run (header), what could not be computed (notes), what
is worth a second look (candidate findings, with the null controls that say whether to trust them), the evidence
per (intervention, region) as a table and as a forest plot (the counterfactual estimate beside the observational
slope, so a hidden effect, one the data alone does not show, stands out from a spurious one), where in the image
each intervention acts (heat maps), which other attributes an intervention drags along (the entanglement matrix),
and a few examples.

Images in the page: one forest plot (when there are region rows), one heat map per intervention in `maps`, and one
factual | counterfactual | difference panel per example.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
import pandas as pd

from cfgen.io.storage import join_uri, write_bytes
from cfgen.report.html import STYLE, html_table

REGION_COLUMNS = (
    "intervention", "attribute", "region", "n", "mean_diff", "ci_low", "ci_high", "p_value", "test", "effect_size",
    "per_unit", "unit", "flagged", "null_control", "obs_slope", "obs_ci_low", "obs_ci_high", "obs_p_value", "obs_n",
    "reason",
)
ENTANGLEMENT_COLUMNS = (
    "intervened", "other", "n", "mean_shift", "ci_low", "ci_high", "data_correlation", "expected", "flagged",
)

# Counterfactual and observational estimates in the forest plot; also used for the legend in the page text.
_CF_COLOUR = "#1f5fa8"
_OBS_COLOUR = "#d9730d"
_DIVERGING = "RdBu_r"  # red = brighter / more likely, blue = darker / less likely, white = no change

_DISCOVERY_STYLE = STYLE + """
img.fig{image-rendering:auto;width:auto;max-width:100%}img.panel{width:510px}
.wide{overflow-x:auto}.wide td,.wide th{white-space:nowrap}tr.flag td{background:#fff3c4}tr.null td{color:#555;font-style:italic}tr.flag.null td{background:#fdd;color:#a00}
.notes{background:#fff3c4;border-left:6px solid #e0a800;padding:.5em 1em}.bad{color:#b00;font-weight:bold}
.ok{color:#276927}table.ent td{text-align:center;min-width:6em}table.ent td.flag{outline:3px solid #000;
outline-offset:-3px;box-shadow:inset 0 0 0 5px #fff;font-weight:bold}table.ent td.diag{border:2px dashed #666}table.ent small{display:block;
font-size:10px;font-weight:normal}
"""

_DASH = "\u2013"


# --- formatting: every number goes through here, so a NaN is always shown as a dash ---------------------------

def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    try:
        return bool(isinstance(value, (float, np.floating)) and math.isnan(value))
    except TypeError:
        return False


def _truthy(value: Any) -> bool:
    return False if _missing(value) else bool(value)


def _num(value: Any, digits: int = 4) -> str:
    if _missing(value):
        return _DASH
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):
            return "\u221e" if value > 0 else "-\u221e"
        return f"{value:.{digits}g}"
    return str(value)


def _count(value: Any) -> str:
    """A count such as n, which a column holding NaN turns into a float."""
    return _DASH if _missing(value) else str(int(value))


def _p(value: Any) -> str:
    return _DASH if _missing(value) else f"{float(value):.2e}"


def _ci(low: Any, high: Any) -> str:
    if _missing(low) and _missing(high):
        return _DASH
    return f"[{_num(low)}, {_num(high)}]"


def _text(value: Any) -> str:
    return _DASH if _missing(value) else str(value)


def _png(figure) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _img(png_b64: str, alt: str, css_class: str) -> str:
    return f"<img class={css_class} alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{png_b64}'>"


def _attribute_of(intervention: str) -> str:
    """'smoking=1' -> 'smoking', 'age=+10' -> 'age': the attribute an intervention sets."""
    return str(intervention).split("=", 1)[0].strip()


def _is_diagonal(intervened: Any, other: Any) -> bool:
    """Whether `other` is the attribute `intervened` sets: the intended shift, not entanglement."""
    return str(intervened) == str(other) or _attribute_of(intervened) == str(other)


# --- sections -------------------------------------------------------------------------------------------------

def header_section(meta: dict[str, Any]) -> str:
    rows = pd.DataFrame({"what": list(meta), "value": [_num(v) for v in meta.values()]})
    return "<h2>Run</h2>" + html_table(rows) if len(rows) else ""


def notes_section(notes: list[str] | None) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(str(n))}</li>" for n in notes)
    return (f"<div class=notes><h2>Not computed ({len(notes)})</h2><p>These parts of the analysis are missing from "
            f"the tables and figures below:</p><ul>{items}</ul></div>")


def _observational_agreement(row: pd.Series) -> str:
    """How the observational slope compares with a flagged counterfactual effect."""
    low, high, estimate = row["obs_ci_low"], row["obs_ci_high"], row["per_unit"]
    if _missing(estimate):
        estimate = row["mean_diff"]
    if _missing(low) or _missing(high) or _missing(estimate):
        return _DASH
    if low <= 0 <= high:
        return "no clear slope"
    return "same direction" if (low > 0) == (estimate > 0) else "opposite direction"


def findings_section(regions: pd.DataFrame, alpha: float) -> str:
    parts = ["<h2>Candidate findings</h2>"]
    if not len(regions):
        return parts[0] + "<p>No region tests were computed, so there are no findings.</p>"
    flagged = regions[regions["flagged"].map(_truthy) & ~regions["null_control"].map(_truthy)]
    margin = float(regions["min_effect"].iloc[0]) if "min_effect" in regions else 0.0
    parts.append(f"<p class=note>Region effects whose {100 * (1 - alpha):g}% CI excludes 0 at the FDR level, and "
                 f"lies wholly beyond the minimum effect set before the run (&plusmn;{margin:g}) and beyond what a "
                 "null control of this run found in the same region; largest |effect size| first. 'In the data': "
                 "whether the observational slope of the factual region statistic on the attribute points the same "
                 "way (an effect the data does not show may be hidden by confounding, one it shows the other way "
                 "deserves suspicion).</p>")
    if len(flagged):
        flagged = flagged.sort_values("effect_size", key=lambda e: e.abs(), ascending=False, na_position="last")
        table = pd.DataFrame([{
            "intervention": _text(r["intervention"]), "region": _text(r["region"]), "n": _count(r["n"]),
            "mean difference": _num(r["mean_diff"]), "CI": _ci(r["ci_low"], r["ci_high"]), "p": _p(r["p_value"]),
            "effect size": _num(r["effect_size"]), "per unit": f"{_num(r['per_unit'])} {_text(r['unit'])}",
            "observational slope": f"{_num(r['obs_slope'])} {_ci(r['obs_ci_low'], r['obs_ci_high'])}",
            "in the data": _observational_agreement(r),
        } for _, r in flagged.iterrows()])
        parts.append(f"<div class=wide>{html_table(table)}</div>")
    else:
        parts.append("<p>No region effect was flagged.</p>")
    if "significant" in regions:
        quiet = regions[regions["significant"].map(_truthy) & ~regions["flagged"].map(_truthy)
                        & ~regions["null_control"].map(_truthy)]
        if len(quiet):
            rows = ", ".join(f"{html.escape(_text(r['intervention']))} / {html.escape(_text(r['region']))} "
                             f"({_num(r['mean_diff'])})" for _, r in quiet.head(12).iterrows())
            parts.append(f"<p class=note>Significant but within the margin (not findings): {len(quiet)} rows, "
                         f"e.g. {rows}.</p>")
    controls = regions[regions["null_control"].map(_truthy)]
    if not len(controls):
        parts.append("<p class=note>No null control was run: there is nothing to say how often this analysis "
                     "flags an effect that is not there.</p>")
    lines = []
    for name, rows in controls.groupby("intervention", sort=False):
        hit = rows[rows["flagged"].map(_truthy)]
        label = f"Null control do({html.escape(str(name))})"
        if len(hit):
            where = ", ".join(html.escape(_text(r)) for r in hit["region"])
            lines.append(f"<li class=bad>Warning: {label} was flagged in {len(hit)} of {len(rows)} regions "
                         f"({where}). A control that should find nothing found something, so the candidate findings "
                         "above may be artefacts of the model or the test.</li>")
        else:
            lines.append(f"<li class=ok>{label}: not flagged in any of its {len(rows)} regions, as expected.</li>")
    if lines:
        parts.append("<ul>" + "".join(lines) + "</ul>")
    return "".join(parts)


def region_table(regions: pd.DataFrame, alpha: float) -> str:
    """All (intervention, region) rows; flagged rows highlighted, null controls in italics (red when flagged)."""
    ci = f"{100 * (1 - alpha):g}% CI"
    head = ["intervention", "attribute", "region", "n", "mean difference", ci, "p", "test", "effect size", "per unit",
            "unit", "obs. slope", f"obs. {ci}", "obs. p", "obs. n", "reason"]
    body = []
    for _, r in regions.iterrows():
        classes = " ".join(c for c, on in (("flag", _truthy(r["flagged"])), ("null", _truthy(r["null_control"])))
                           if on)
        name = _text(r["intervention"]) + (" (null control)" if _truthy(r["null_control"]) else "")
        cells = [name, _text(r["attribute"]), _text(r["region"]), _count(r["n"]), _num(r["mean_diff"]),
                 _ci(r["ci_low"], r["ci_high"]), _p(r["p_value"]), _text(r["test"]), _num(r["effect_size"]),
                 _num(r["per_unit"]), _text(r["unit"]), _num(r["obs_slope"]), _ci(r["obs_ci_low"], r["obs_ci_high"]),
                 _p(r["obs_p_value"]), _count(r["obs_n"]), _text(r["reason"])]
        tds = "".join(f"<td class=l>{html.escape(c)}</td>" if i < 3 or i == len(cells) - 1
                      else f"<td>{html.escape(c)}</td>" for i, c in enumerate(cells))
        body.append(f"<tr class='{classes}'>{tds}</tr>")
    ths = "".join(f"<th class=l>{html.escape(h)}</th>" if i < 3 or i == len(head) - 1 else f"<th>{html.escape(h)}</th>"
                  for i, h in enumerate(head))
    return f"<div class=wide><table id=regions><tr>{ths}</tr>{''.join(body)}</table></div>"


def _per_unit_interval(row: pd.Series) -> tuple[float, float, float]:
    """The counterfactual estimate and CI per unit of the attribute, on the observational slope's scale: the
    analysis's `per_unit_ci_low/high` where it gives them; else the mean difference's CI rescaled by
    per_unit / mean_diff; without a usable per_unit, the mean difference itself."""
    def value(c: str) -> float:
        return float(row[c]) if c in row and not _missing(row[c]) else math.nan

    estimate, low, high = value("mean_diff"), value("ci_low"), value("ci_high")
    per_unit = value("per_unit")
    if math.isfinite(per_unit) and math.isfinite(value("per_unit_ci_low")) and math.isfinite(
            value("per_unit_ci_high")):
        return per_unit, value("per_unit_ci_low"), value("per_unit_ci_high")
    if math.isfinite(per_unit) and math.isfinite(estimate) and estimate != 0:
        scale = per_unit / estimate
        low, high = sorted((low * scale, high * scale))
        estimate = per_unit
    return estimate, low, high


def forest_plot(regions: pd.DataFrame) -> str:
    """One row per (intervention, region): the counterfactual estimate with its CI and the observational slope CI."""
    from matplotlib.figure import Figure

    rows = list(regions.iterrows())
    figure = Figure(figsize=(8, 1.2 + 0.32 * len(rows)))
    ax = figure.add_subplot()
    labels = []
    for y, (_, r) in enumerate(rows):
        estimate, low, high = _per_unit_interval(r)
        if math.isfinite(estimate):
            err = [[max(estimate - low, 0) if math.isfinite(low) else 0],
                   [max(high - estimate, 0) if math.isfinite(high) else 0]]
            ax.errorbar([estimate], [y], xerr=err, fmt="o", color=_CF_COLOUR, ms=5, capsize=3,
                        label="counterfactual" if "counterfactual" not in labels else None)
            labels.append("counterfactual")
        obs = [float(r[c]) if not _missing(r[c]) else math.nan for c in ("obs_slope", "obs_ci_low", "obs_ci_high")]
        if all(math.isfinite(v) for v in obs[1:]):
            centre = obs[0] if math.isfinite(obs[0]) else (obs[1] + obs[2]) / 2
            ax.errorbar([centre], [y + 0.3], xerr=[[max(centre - obs[1], 0)], [max(obs[2] - centre, 0)]], fmt="s",
                        color=_OBS_COLOUR, ms=4, capsize=3,
                        label="observational slope" if "observational" not in labels else None)
            labels.append("observational")
    ax.axvline(0, color="#444", lw=1)
    ax.set_yticks(range(len(rows)))
    ticks = ax.set_yticklabels([f"{r['intervention']} \u00b7 {r['region']}"
                                + (f" ({r['unit']})" if not _missing(r["unit"]) else "")
                                + (" [null]" if _truthy(r["null_control"]) else "") for _, r in rows])
    for tick, (_, r) in zip(ticks, rows):
        if _truthy(r["flagged"]):
            tick.set_fontweight("bold")
            tick.set_color("#b00" if _truthy(r["null_control"]) else "#000")
        elif _truthy(r["null_control"]):
            tick.set_color("#666")
    ax.set_ylim(len(rows) - 0.4, -0.7)
    ax.set_xlabel("effect on the region statistic per unit of the attribute")
    if labels:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", color="#ddd")
    return _png(figure)


def heat_map(name: str, entry: dict[str, Any], alpha: float) -> str:
    """The mean counterfactual - factual difference over the mean factual CXR, FDR-significant pixels contoured."""
    from matplotlib.figure import Figure

    mean = np.asarray(entry["mean"], dtype=np.float64)
    significant = np.asarray(entry.get("significant", np.zeros(mean.shape, bool)), dtype=bool)
    finite = np.abs(mean[np.isfinite(mean)])
    # symmetric limits centre the diverging colormap on "no change"
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    figure = Figure(figsize=(5, 4.4))
    ax = figure.add_subplot()
    if entry.get("mean_factual") is not None:
        ax.imshow(np.asarray(entry["mean_factual"], dtype=np.float64), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
    shown = ax.imshow(mean, cmap=_DIVERGING, vmin=-limit, vmax=limit, alpha=0.6, interpolation="nearest")
    if significant.any() and not significant.all():  # contour needs both sides of the level
        ax.contour(significant.astype(np.float64), levels=[0.5], colors="k", linewidths=1)
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="mean counterfactual - factual")
    ax.set_title(f"do({name}): n={_count(entry.get('n'))}, {significant.mean():.1%} of pixels q < {alpha:g}",
                 fontsize=10)
    ax.set_axis_off()
    return _png(figure)


def heat_map_section(maps: dict[str, dict[str, Any]], alpha: float) -> str:
    parts = ["<h2>Where each intervention acts</h2>"]
    if not maps:
        return parts[0] + "<p>No heat maps: none were computed.</p>"
    parts.append("<p class=note>Mean counterfactual - factual per pixel over the mean factual image (red: brighter, "
                 f"blue: darker); black contours: pixels significant after Benjamini-Hochberg at q &lt; {alpha:g}."
                 "</p>")
    for name, entry in maps.items():
        significant = np.asarray(entry.get("significant", []), dtype=bool)
        share = f"{significant.mean():.1%}" if significant.size else _DASH
        alt = (f"Heat map of the mean difference under do({name}), n={_count(entry.get('n'))}, "
               f"{share} of pixels significant")
        parts.append(f"<div class=ex>{_img(heat_map(name, entry, alpha), alt, 'fig')}</div>")
    return "".join(parts)


def _diverging_rgb(values: np.ndarray, limit: float) -> np.ndarray:
    import matplotlib

    scaled = np.clip(np.nan_to_num(values) / limit * 0.5 + 0.5, 0, 1)
    return (matplotlib.colormaps[_DIVERGING](scaled)[..., :3] * 255).astype(np.uint8)


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    grey = (np.clip(np.nan_to_num(image), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def example_panel(example: dict[str, Any], limit: float) -> str:
    """factual | counterfactual | difference, at the images' own resolution (no resampling, no figure)."""
    from PIL import Image

    factual = np.asarray(example["factual"], dtype=np.float64)
    counterfactual = np.asarray(example["counterfactual"], dtype=np.float64)
    gap = np.full((factual.shape[0], 2, 3), 255, np.uint8)
    panel = np.concatenate([_grey_rgb(factual), gap, _grey_rgb(counterfactual), gap,
                            _diverging_rgb(counterfactual - factual, limit)], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(panel).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def examples_section(examples: dict[str, list[dict[str, Any]]]) -> str:
    parts = ["<h2>Examples</h2>"]
    if not any(examples.values()):
        return parts[0] + "<p>No examples were given.</p>"
    parts.append("<p class=note>factual | counterfactual | difference (red: brighter, blue: darker, white: no change;"
                 " one scale per intervention, given in its heading)</p>")
    for name, items in examples.items():
        if not items:
            continue
        diffs = [np.abs(np.asarray(e["counterfactual"], np.float64) - np.asarray(e["factual"], np.float64))
                 for e in items]
        peak = max((float(np.nanmax(d)) for d in diffs if np.isfinite(d).any()), default=0.0)
        limit = peak if peak > 0 else 1.0
        parts.append(f"<h3>do({html.escape(name)}) <small class=note>difference scale \u00b1{limit:.3g}</small></h3>")
        for e in items:
            image_id = str(e.get("image_id", ""))
            alt = f"{image_id} under do({name}): factual, counterfactual and their difference"
            parts.append(f"<div class=ex>{_img(example_panel(e, limit), alt, 'panel')}<br><b>"
                         f"{html.escape(image_id)}</b></div>")
    return "".join(parts)


def _cell_colour(value: float, limit: float) -> tuple[str, str]:
    """Background and text colour for a mean shift on the diverging scale."""
    import matplotlib

    if not math.isfinite(value):
        return "#eee", "#222"
    r, g, b, _ = matplotlib.colormaps[_DIVERGING](min(max(value / limit * 0.5 + 0.5, 0.0), 1.0))
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}", "#fff" if luminance < 0.5 else "#111"


def entanglement_section(entanglement: pd.DataFrame) -> str:
    parts = ["<h2>Entanglement</h2>"]
    if not len(entanglement):
        return parts[0] + "<p>No entanglement measurements were computed.</p>"
    parts.append("<p class=note>The classifier's mean change of P(column) under do(row). Diagonal cells (dashed): the "
                 "intended attribute (colour saturated: the scale is set by the other cells). Outlined, bold: moved although the causal graph says it should not. Small: the "
                 "correlation of the two attributes in the training data, beside which an entangled model moves the "
                 "other attribute.</p>")
    intervened = list(dict.fromkeys(entanglement["intervened"]))
    others = list(dict.fromkeys(entanglement["other"]))
    cells = {(r["intervened"], r["other"]): r for _, r in entanglement.iterrows()}
    # the colour scale is set by the off-diagonal shifts, the entanglement this table is for; the intended shifts,
    # usually far larger, saturate rather than wash everything else out
    diagonal = entanglement.apply(lambda r: _is_diagonal(r["intervened"], r["other"]), axis=1).astype(bool)
    shifts = np.abs(pd.to_numeric(entanglement["mean_shift"], errors="coerce").to_numpy(np.float64))
    shifts = shifts[np.isfinite(shifts) & (~diagonal.to_numpy() if (~diagonal).any() else True)]
    limit = float(shifts.max()) if shifts.size and shifts.max() > 0 else 1.0
    head = "<th class=l>do(\u2193) \\ P(\u2192)</th>" + "".join(f"<th>{html.escape(str(o))}</th>" for o in others)
    body = []
    for row_name in intervened:
        tds = [f"<th class=l>{html.escape(str(row_name))}</th>"]
        for other in others:
            r = cells.get((row_name, other))
            diagonal = _is_diagonal(row_name, other)
            classes = ["cell"] + (["diag"] if diagonal else [])
            if r is None:
                tds.append(f"<td class='{' '.join(classes)}' style='background:#eee'>{_DASH}</td>")
                continue
            shift = float(r["mean_shift"]) if not _missing(r["mean_shift"]) else math.nan
            background, colour = _cell_colour(shift, limit)
            if _truthy(r["flagged"]):
                classes.append("flag")
            title = (f"do({row_name}) on P({other}): {_num(r['mean_shift'])} {_ci(r['ci_low'], r['ci_high'])}, "
                     f"n={_count(r['n'])}, {'expected' if _truthy(r['expected']) else 'not expected'} by the graph"
                     + (", intended" if diagonal else ""))
            sign = "+" if math.isfinite(shift) and shift > 0 else ""
            tds.append(f"<td class='{' '.join(classes)}' style='background:{background};color:{colour}' "
                       f"title='{html.escape(title, quote=True)}'>{sign}{html.escape(_num(r['mean_shift'], 3))}"
                       f"<small>r = {html.escape(_num(r['data_correlation'], 2))}</small></td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    parts.append(f"<table id=entanglement class=ent><tr>{head}</tr>{''.join(body)}</table>")
    flagged = entanglement[entanglement["flagged"].map(_truthy)]
    if len(flagged):
        items = "".join(f"<li class=bad>do({html.escape(_text(r['intervened']))}) moved P({html.escape(_text(r['other']))})"
                        f" by {html.escape(_num(r['mean_shift'], 3))} {html.escape(_ci(r['ci_low'], r['ci_high']))} "
                        f"although the causal graph says it should not (data correlation "
                        f"{html.escape(_num(r['data_correlation'], 2))}).</li>" for _, r in flagged.iterrows())
        parts.append(f"<ul>{items}</ul>")
    else:
        parts.append("<p class=ok>No unexpected shift was flagged.</p>")
    return "".join(parts)


def write_discovery_report(
    out_uri: str,
    regions: pd.DataFrame,
    maps: dict[str, dict[str, Any]],
    entanglement: pd.DataFrame,
    examples: dict[str, list[dict[str, Any]]],
    meta: dict[str, Any],
    notes: list[str] | None = None,
    storage=None,
) -> str:
    """Write `<out_uri>/report.html`, self-contained, and return its URI.

    `regions`: one row per (intervention, region) with the columns in `REGION_COLUMNS`; `maps`: per intervention its
    pixel maps ("n", "mean", "q", "significant", "mean_factual"); `entanglement`: one row per (intervened, other)
    with `ENTANGLEMENT_COLUMNS`; `examples`: per intervention a few {"image_id", "factual", "counterfactual"};
    `meta`: the header table ("title", "model_uri", "method", "alpha", ...); `notes`: what could not be computed.
    Missing columns are read as missing values, and empty inputs give a line saying so.
    """
    # by position from here on: callers concatenate frames, and repeated index labels must not repeat rows
    regions = regions.reset_index(drop=True)
    entanglement = entanglement.reset_index(drop=True)
    regions = regions.reindex(columns=list(REGION_COLUMNS) + [c for c in regions.columns if c not in REGION_COLUMNS])
    entanglement = entanglement.reindex(columns=list(ENTANGLEMENT_COLUMNS)
                                        + [c for c in entanglement.columns if c not in ENTANGLEMENT_COLUMNS])
    alpha = float(meta.get("alpha", 0.05)) if not _missing(meta.get("alpha")) else 0.05
    title = html.escape(str(meta.get("title", "cfgen discovery report")))
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title><style>{_DISCOVERY_STYLE}"
             f"</style></head><body><h1>{title}</h1>",
             header_section(meta), notes_section(notes), findings_section(regions, alpha),
             "<h2>All region tests</h2>"]
    if len(regions):
        parts.append(f"<p class=note>Highlighted: flagged (the {100 * (1 - alpha):g}% CI excludes 0). Italic: null "
                     "controls, red when flagged. Observational columns: the slope of the factual region statistic "
                     "on the attribute, per unit, over the training data.</p>")
        parts.append(region_table(regions, alpha))
        parts.append("<h2>Forest plot</h2><p class=note>Per unit of the attribute: the counterfactual estimate "
                     f"(<span style='color:{_CF_COLOUR}'>circles</span>) and the observational slope "
                     f"(<span style='color:{_OBS_COLOUR}'>squares</span>) with their CIs.</p>")
        parts.append(_img(forest_plot(regions), "Forest plot of the counterfactual estimate and the observational "
                                                "slope per intervention and region", "fig"))
    else:
        parts.append("<p>No region tests were computed.</p>")
    parts.append(heat_map_section(maps, alpha))
    parts.append(entanglement_section(entanglement))
    parts.append(examples_section(examples))
    parts.append("</body></html>")
    uri = join_uri(out_uri, "report.html")
    write_bytes(uri, "\n".join(parts).encode(), storage)
    return uri
