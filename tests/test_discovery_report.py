"""The discovery report: what a reader must find in it, and that it renders in a real browser on its own."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cfgen.report.discovery import _per_unit_interval, example_panel, write_discovery_report

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCAL = ("file://", "data:", "http://127.0.0.1:")
NAN = float("nan")
SIZE = 32


def _region(intervention, region, *, flagged, null_control=False, effect_size=0.1, **values):
    row = dict(intervention=intervention, attribute=intervention.split("=")[0], region=region, n=40,
               mean_diff=0.02, ci_low=-0.01, ci_high=0.05, p_value=0.2, test="paired-t", effect_size=effect_size,
               per_unit=0.02, unit="per 1", flagged=flagged, null_control=null_control, obs_slope=0.01,
               obs_ci_low=-0.02, obs_ci_high=0.04, obs_p_value=0.4, obs_n=800, reason=None)
    row.update(values)
    return row


def _regions(null_flagged: bool = False) -> pd.DataFrame:
    return pd.DataFrame([
        _region("smoking=1", "lungs", flagged=True, effect_size=0.9, mean_diff=0.08, ci_low=0.05, ci_high=0.11,
                p_value=3.2e-7, per_unit=0.08, obs_slope=0.0, obs_ci_low=-0.01, obs_ci_high=0.01),
        _region("smoking=1", "heart", flagged=False, obs_slope=NAN, obs_ci_low=NAN, obs_ci_high=NAN,
                obs_p_value=NAN, obs_n=NAN),
        _region("smoking=1", "outside_lungs", flagged=False, n=2, mean_diff=NAN, ci_low=NAN, ci_high=NAN,
                p_value=NAN, effect_size=NAN, per_unit=NAN, reason="too few subjects for a test (2 < 3)"),
        _region("age=+0", "lungs", flagged=null_flagged, null_control=True, effect_size=0.01),
    ])


def _block_map(n: int, strength: float) -> dict:
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 0.002, (SIZE, SIZE))
    mean[8:16, 8:16] += strength
    significant = np.zeros((SIZE, SIZE), bool)
    significant[8:16, 8:16] = strength != 0
    return {"n": n, "mean": mean, "q": np.where(significant, 1e-4, 0.9), "significant": significant,
            "mean_factual": np.full((SIZE, SIZE), 0.5)}


def _example(image_id: str, strength: float) -> dict:
    factual = np.full((SIZE, SIZE), 0.4)
    counterfactual = factual.copy()
    counterfactual[8:16, 8:16] += strength
    return {"image_id": image_id, "factual": factual, "counterfactual": counterfactual}


def _entanglement() -> pd.DataFrame:
    rows = []
    for intervened in ("smoking=1", "age=+10", "sex=M"):
        for other in ("smoking", "age", "sex"):
            intended = intervened.split("=")[0] == other
            flagged = (intervened, other) == ("smoking=1", "sex")
            rows.append(dict(intervened=intervened, other=other, n=40,
                             mean_shift=0.6 if intended else (0.2 if flagged else 0.01),
                             ci_low=0.1 if flagged else -0.02, ci_high=0.3 if flagged else 0.04,
                             data_correlation=NAN if (intervened, other) == ("sex=M", "age") else 0.1,
                             expected=intended, flagged=flagged))
    return pd.DataFrame(rows)


META = {"title": "Discovery on phantoms", "model_uri": "s3://models/cxr-sd", "method": "ddpm_edit", "alpha": 0.05,
        "results_uri": "/tmp/results", "seed": NAN}
MAPS = {"smoking=1": _block_map(40, 0.1), "age=+0": _block_map(40, 0.0)}
EXAMPLES = {"smoking=1": [_example("p001", 0.2), _example("p002", 0.1)], "age=+0": [_example("p003", 0.0)]}
# forest plot + one heat map per intervention + one panel per example
EXPECTED_IMAGES = 1 + len(MAPS) + sum(len(v) for v in EXAMPLES.values())


def _write(tmp_path: Path, null_flagged: bool = False, notes=None) -> Path:
    uri = write_discovery_report(str(tmp_path / "discovery"), _regions(null_flagged), MAPS, _entanglement(),
                                 EXAMPLES, META, notes=notes)
    assert uri == str(tmp_path / "discovery" / "report.html")
    return Path(uri)


def _visible(page: str) -> str:
    """The page without its inlined images (base64 may spell anything) and without tags."""
    return re.sub(r"<[^>]+>", " ", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page))


def _section(page: str, title: str) -> str:
    start = page.index(f"<h2>{title}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start:end if end > 0 else None]


def test_the_flagged_finding_is_a_candidate_and_unflagged_regions_are_not(tmp_path):
    findings = _section(_write(tmp_path).read_text(), "Candidate findings")
    assert "<td class=l>smoking=1</td><td>lungs</td>" in findings
    assert "[0.05, 0.11]" in findings and "3.20e-07" in findings
    assert "heart" not in findings and "outside_lungs" not in findings
    # the observational slope's CI covers 0: the data alone do not show this effect
    assert "no clear slope" in findings


def test_candidate_findings_are_ordered_by_absolute_effect_size(tmp_path):
    regions = pd.concat([_regions(), pd.DataFrame([_region("sex=M", "heart", flagged=True, effect_size=-1.5)])])
    uri = write_discovery_report(str(tmp_path), regions, {}, pd.DataFrame(), {}, META)
    findings = _section(Path(uri).read_text(), "Candidate findings")
    assert findings.index("sex=M") < findings.index("smoking=1")


def test_an_unflagged_null_control_is_reported_as_expected(tmp_path):
    findings = _section(_write(tmp_path).read_text(), "Candidate findings")
    assert "<li class=ok>Null control do(age=+0): not flagged in any of its 1 regions, as expected.</li>" in findings


def test_a_flagged_null_control_is_a_red_warning_and_not_a_candidate(tmp_path):
    page = _write(tmp_path, null_flagged=True).read_text()
    findings = _section(page, "Candidate findings")
    assert re.search(r"<li class=bad>Warning: Null control do\(age=\+0\) was flagged in 1 of 1 regions \(lungs\)",
                     findings)
    assert "<td class=l>age=+0</td>" not in findings
    assert "<tr class='flag null'><td class=l>age=+0 (null control)</td>" in page


def test_nan_is_shown_as_a_dash_and_never_as_nan(tmp_path):
    page = _write(tmp_path).read_text()
    assert not re.search(r"\bnan\b", _visible(page), re.IGNORECASE)
    row = re.search(r"<tr class=''><td class=l>smoking=1</td><td class=l>smoking</td><td class=l>outside_lungs</td>"
                    r"(.*?)</tr>", page).group(1)
    # n, then mean difference, CI and p of the test that could not be run
    assert row.startswith("<td>2</td><td>\u2013</td><td>\u2013</td><td>\u2013</td>")
    assert "too few subjects for a test (2 &lt; 3)" in row
    assert "<td class=l>seed</td><td>\u2013</td>" in page  # a NaN in the header table
    assert "r = \u2013" in page  # a NaN data correlation in the entanglement matrix


def test_notes_are_listed_before_the_findings(tmp_path):
    page = _write(tmp_path, notes=["smoking=1: too few subjects for a test (2 < 3)"]).read_text()
    assert "<li>smoking=1: too few subjects for a test (2 &lt; 3)</li>" in page
    assert page.index("Not computed (1)") < page.index("<h2>Candidate findings</h2>")


def test_empty_inputs_render_a_line_for_each_missing_part(tmp_path):
    uri = write_discovery_report(str(tmp_path), pd.DataFrame(), {}, pd.DataFrame(), {}, {"title": "empty"})
    page = Path(uri).read_text()
    for line in ("No region tests were computed, so there are no findings.", "No region tests were computed.",
                 "No heat maps: none were computed.", "No entanglement measurements were computed.",
                 "No examples were given."):
        assert line in page
    assert "<img" not in page


def test_the_counterfactual_ci_is_rescaled_per_unit_for_the_forest_plot():
    row = pd.Series({"mean_diff": 1.0, "ci_low": 0.5, "ci_high": 1.5, "per_unit": 0.1})
    assert np.allclose(_per_unit_interval(row), (0.1, 0.05, 0.15))
    row["per_unit"] = NAN  # without a per-unit estimate the mean difference is plotted as it is
    assert np.allclose(_per_unit_interval(row), (1.0, 0.5, 1.5))


def test_an_example_panel_shows_brighter_pixels_in_red_and_no_change_in_white():
    from PIL import Image

    panel = np.asarray(Image.open(io.BytesIO(base64.b64decode(example_panel(_example("p", 0.2), limit=0.2)))))
    assert panel.shape == (SIZE, 3 * SIZE + 4, 3)
    difference = panel[:, 2 * SIZE + 4:].astype(int)
    red, green, blue = difference[12, 12]
    assert red > 100 and blue < 60 and green < 60  # the planted block, at the full scale
    assert (difference[0, 0] > 240).all()  # unchanged: the colormap's white centre
    assert panel[12, SIZE + 2 + 12, 0] == round(0.6 * 255)  # the counterfactual in grey, not rescaled


@pytest.mark.timeout(120)
def test_the_report_renders_in_headless_chromium_with_every_image_loaded(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    url = _write(tmp_path, null_flagged=True).as_uri()

    errors, requests = [], []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            # a self-contained page asks for nothing over the network; refuse anything but loopback anyway
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(LOCAL)
                       else route.abort())
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url, wait_until="load")
            images = page.evaluate("Array.from(document.images, i => [i.naturalWidth, i.complete, i.alt])")
            cells = page.locator("#entanglement td.cell").count()
            flagged = page.locator("#entanglement td.flag")
            flagged_count = flagged.count()
            weight = flagged.first.evaluate("el => getComputedStyle(el).fontWeight")
            text = page.inner_text("body")
        finally:
            browser.close()

    assert len(images) == EXPECTED_IMAGES
    assert all(width > 0 and complete for width, complete, _ in images), images
    assert all(alt.strip() for _, _, alt in images)
    assert cells == 3 * 3 and flagged_count == 1 and int(weight) >= 700
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert errors == []
    assert all(u.startswith(LOCAL) for u in requests), requests
