"""The web page the app serves at /: upload an X-ray, choose attributes the model knows, see factual,
counterfactual and difference side by side with the metrics, download. Plain HTML and a little JavaScript against
the same /v1 API a program uses (no second path into the engine), no external scripts or fonts."""

from __future__ import annotations

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cfgen: counterfactual chest X-rays</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1b1b1b; max-width: 70rem; }
 h1 { font-size: 1.4rem; } fieldset { border: 1px solid #bbb; margin-bottom: 1rem; }
 label { display: inline-block; margin: 0.3rem 1rem 0.3rem 0; }
 .panels { display: flex; gap: 1rem; flex-wrap: wrap; } figure { margin: 0; text-align: center; }
 figure img { width: 256px; height: 256px; image-rendering: pixelated; border: 1px solid #999; background: #000; }
 table { border-collapse: collapse; margin-top: 1rem; } td, th { border: 1px solid #ccc; padding: 0.2rem 0.5rem; }
 #status[data-kind=error] { color: #a00000; } #status { min-height: 1.4em; }
</style></head><body>
<h1>cfgen: counterfactual chest X-rays</h1>
<p>Upload a chest X-ray (DICOM, PNG or JPEG), set attributes, and the model shows the same image with them changed.
Uploads are edited in memory and not stored.</p>
<form id="form">
<fieldset><legend>Image</legend>
 <label>X-ray <input type="file" id="file" name="file" accept=".dcm,.dicom,image/png,image/jpeg" required></label>
 AUTH_FIELD
</fieldset>
<fieldset><legend>Edit</legend>
 <label>Attribute <select id="attribute" name="attribute"></select></label>
 <label>Value <select id="value" name="value"></select></label>
 <label>Method <select id="method" name="method"></select></label>
 <label>Steps <input type="number" id="steps" name="steps" min="1" value="20" style="width:4rem"></label>
 <label>Seed <input type="number" id="seed" name="seed" min="0" value="0" style="width:5rem"></label>
</fieldset>
<button type="submit" id="run">Make counterfactual</button>
</form>
<p id="status" role="status"></p>
<div class="panels" id="panels" hidden>
 <figure><img id="factual" alt="factual image as the model saw it"><figcaption>factual</figcaption></figure>
 <figure><img id="counterfactual" alt="counterfactual image"><figcaption>counterfactual</figcaption></figure>
 <figure><img id="difference" alt="difference, grey is no change"><figcaption>difference (grey: none)</figcaption></figure>
</div>
<p id="downloads" hidden><a id="download-png" download="counterfactual.png">Download PNG</a> &middot;
 <a href="#" id="download-dicom">Download derived DICOM</a></p>
<table id="facts" hidden><tbody></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
let info = null;
function headers() {
  const t = $("token") ? $("token").value : "";
  return t ? {"Authorization": "Bearer " + t} : {};
}
function status(text, kind) { $("status").textContent = text; $("status").dataset.kind = kind || "info"; }
function option(select, value, text) { const o = document.createElement("option"); o.value = value;
  o.textContent = text; select.appendChild(o); }
function fillValues() {
  const a = info.attributes[$("attribute").value]; const v = $("value"); v.innerHTML = "";
  if (a.type === "years") { [-10, 10, 20].forEach(s => option(v, JSON.stringify({shift: s}),
      (s > 0 ? "+" : "") + s + " years")); }
  else { a.values.forEach(x => option(v, JSON.stringify(x), String(x))); }
}
async function loadInfo() {
  const r = await fetch("v1/model", {headers: headers()});
  if (!r.ok) { status("model info: " + r.status + " " + (await r.text()), "error"); return; }
  info = await r.json();
  $("attribute").innerHTML = ""; $("method").innerHTML = "";
  Object.keys(info.attributes).forEach(a => option($("attribute"), a, a.replaceAll("_", " ")));
  info.methods.forEach(m => option($("method"), m, m));
  $("method").value = info.default_method; $("steps").value = info.default_steps;
  $("steps").max = info.limits.max_steps; fillValues();
  status("model " + (info.model_version || info.model_uri) + " ready");
}
function spec() {
  const set = {}; set[$("attribute").value] = JSON.parse($("value").value);
  return JSON.stringify({set: set, method: $("method").value, steps: Number($("steps").value),
                         seed: Number($("seed").value)});
}
async function post(format) {
  const body = new FormData(); body.append("file", $("file").files[0]); body.append("spec", spec());
  return fetch("v1/counterfactual?format=" + format, {method: "POST", body: body, headers: headers()});
}
$("attribute").addEventListener("change", fillValues);
$("form").addEventListener("submit", async (e) => {
  e.preventDefault(); if (!info) { await loadInfo(); if (!info) return; }
  status("editing…"); $("run").disabled = true;
  try {
    const r = await post("json"); const out = await r.json();
    if (!r.ok) { status(r.status + ": " + (out.error || JSON.stringify(out.detail)), "error"); return; }
    for (const k of ["factual", "counterfactual", "difference"]) $(k).src = "data:image/png;base64," + out.images[k];
    $("download-png").href = $("counterfactual").src;
    $("panels").hidden = false; $("downloads").hidden = false;
    const rows = [["factual prompt", out.factual_prompt], ["counterfactual prompt", out.counterfactual_prompt],
      ["method", out.method + ", " + out.steps + " steps, seed " + out.seed +
        (Object.keys(out.edit_setting || {}).length ? ", " + JSON.stringify(out.edit_setting) : "")],
      ["UNet evaluations", out.unet_evaluations], ["model version", out.model.model_version],
      ["mean |difference|", out.metrics.difference.mean_abs.toFixed(4)],
      ["changed pixels", (100 * out.metrics.difference.changed_fraction).toFixed(1) + "%"]];
    if (out.metrics.preservation) rows.push(["null-edit SSIM", out.metrics.preservation.null_ssim.toFixed(3)]);
    for (const [k, v] of Object.entries(out.metrics.effectiveness || {}))
      rows.push(["classifier " + k, v.before.toFixed(2) + " -> " + v.after.toFixed(2)]);
    const tb = $("facts").querySelector("tbody"); tb.innerHTML = "";
    rows.forEach(([k, v]) => { const tr = tb.insertRow(); tr.insertCell().textContent = k;
                               tr.insertCell().textContent = v; });
    $("facts").hidden = false; status("done", "ok");
  } catch (err) { status("request failed: " + err, "error"); } finally { $("run").disabled = false; }
});
$("download-dicom").addEventListener("click", async (e) => {
  e.preventDefault(); const r = await post("dicom");
  if (!r.ok) { status("DICOM: " + r.status, "error"); return; }
  const url = URL.createObjectURL(await r.blob()); const a = document.createElement("a");
  a.href = url; a.download = "counterfactual.dcm"; a.click(); URL.revokeObjectURL(url);
});
loadInfo();
</script></body></html>
"""

_AUTH = ('<label>Access token <input type="password" id="token" name="token" autocomplete="off"></label>'
         '<button type="button" onclick="loadInfo()">Connect</button>')


def page_html(auth: bool = False) -> str:
    return _PAGE.replace("AUTH_FIELD", _AUTH if auth else "")
