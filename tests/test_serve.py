"""The Serve app on a real local Ray Serve on 127.0.0.1, over HTTP: happy paths for PNG and DICOM, every bad input
with its status (and the replica still answering after them), bearer-token auth, the web page in a real browser,
and a bounded schemathesis run against the served OpenAPI schema that must find no 5xx."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TOKEN = "test-token-5f2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from cfgen.config import PhantomConfig
    from cfgen.phantoms.writers import write_phantoms

    folder = tmp_path_factory.mktemp("ph")
    write_phantoms(PhantomConfig(n=2, size=64, seed=4, formats=["dicom", "png"], missing_fraction=0.0), str(folder))
    dcm = (folder / "images" / "PH000000.dcm").read_bytes()
    png = (folder / "images" / "PH000001.png").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(dcm))
    ds.PatientName, ds.PatientID, ds.InstitutionName = "Doe^John", "MRN-0042", "Example General"
    buf = io.BytesIO()
    ds.save_as(buf)
    return {"dicom": buf.getvalue(), "png": png, "png_path": folder / "images" / "PH000001.png"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_local):
    """The app deployed on Serve (HTTP on 127.0.0.1, a free port), a tiny model and classifier from configs."""
    import torch
    from ray import serve

    from cfgen.classify.network import AttributeClassifier, network_config
    from cfgen.classify.store import save_classifier
    from cfgen.config import ClassifierConfig, JobConfig, ModelConfig
    from cfgen.models.sd import build_tiny_pipeline, save_pipeline
    from cfgen.serve.deployment import run

    folder = tmp_path_factory.mktemp("serve")
    save_pipeline(build_tiny_pipeline(ModelConfig(), seed=0), str(folder / "sd"))
    torch.manual_seed(0)
    clf = ClassifierConfig(attributes=["support_devices", "smoking"])
    save_classifier(AttributeClassifier(network_config(clf)), str(folder / "clf"))
    port = _free_port()
    job = JobConfig.model_validate({
        "model": {"pretrained": str(folder / "sd")},
        "classifier": {"pretrained": str(folder / "clf"), "attributes": ["support_devices", "smoking"]},
        # directed ddpm, a sweep of two scales that the classifier chooses between per request
        "edit": {"method": "ddpm", "num_inference_steps": 4, "edit_guidance": [1.5, 3.0], "edit_threshold": 0.5},
        "serve": {"port": port, "auth_token": TOKEN, "max_upload_mb": 1, "max_pixels": 1_000_000,
                  "max_steps": 8, "max_batch_size": 4, "num_cpus": 0.5, "max_ongoing_requests": 8},
        "tracking": {"tracking_uri": f"sqlite:///{folder}/mlflow.db"},
    })
    run(job, blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{base}/v1/ready", headers=AUTH, timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        raise AssertionError("the Serve app never became ready")
    yield base
    serve.shutdown()


def _post(base, files=None, data=None, params=None, headers=AUTH, timeout=120):
    return requests.post(f"{base}/v1/counterfactual", files=files, data=data, params=params, headers=headers,
                         timeout=timeout)


def _spec(**kw):
    return json.dumps({"set": {"smoking": 1}, "steps": 2, **kw})


def test_health_readiness_model_info_and_auth(server):
    assert requests.get(f"{server}/v1/health", timeout=10).json() == {"status": "ok"}  # liveness needs no token
    assert requests.get(f"{server}/v1/model", timeout=10).status_code == 401
    wrong = requests.get(f"{server}/v1/model", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and TOKEN not in wrong.text
    info = requests.get(f"{server}/v1/model", headers=AUTH, timeout=30).json()
    assert info["attributes"]["smoking"] == {"type": "binary", "values": [0, 1]}
    assert "ddpm" in info["methods"] and info["limits"]["max_steps"] == 8 and info["model_version"]
    assert requests.get(f"{server}/v1/ready", headers=AUTH, timeout=10).json() == {"status": "ready"}
    schema = requests.get(f"{server}/openapi.json", timeout=10).json()
    assert "/v1/counterfactual" in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/v1/counterfactual"]["post"]["requestBody"]["content"]


def test_a_png_upload_gets_a_counterfactual_with_prompts_and_metrics(server, phantom):
    from cfgen.serve.app import png_of

    r = _post(server, files={"file": ("x.png", phantom["png"], "image/png")},
              data={"spec": _spec(factual={"sex": "F", "age": 61, "smoking": 0})})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["factual_prompt"].startswith("a chest x-ray of a 61 year old female patient")
    assert "non-smoker" in out["factual_prompt"] and "non-smoker" not in out["counterfactual_prompt"]
    assert out["method"] == "ddpm" and out["unet_evaluations"] > 0 and out["model"]["model_version"]
    assert out["edit_setting"]["edit_guidance"] in (1.5, 3.0)  # the sweep's scale the classifier kept
    cf, factual = png_of(out["images"]["counterfactual"]), png_of(out["images"]["factual"])
    assert cf.shape == factual.shape == (64, 64)
    m = out["metrics"]
    assert 0 <= m["difference"]["mean_abs"] <= 1 and 0 <= m["preservation"]["null_ssim"] <= 1
    assert set(m["effectiveness"]) == {"smoking"} and 0 <= m["effectiveness"]["smoking"]["after"] <= 1
    again = _post(server, files={"file": ("x.png", phantom["png"], "image/png")},
                  data={"spec": _spec(factual={"sex": "F", "age": 61, "smoking": 0})}).json()
    assert again["images"]["counterfactual"] == out["images"]["counterfactual"]  # deterministic per image + seed


def test_a_raw_dicom_gets_a_png_and_a_deidentified_derived_dicom(server, phantom):
    r = _post(server, data=phantom["dicom"], params={"spec": _spec(), "format": "png"},
              headers={**AUTH, "Content-Type": "application/dicom"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.asarray(Image.open(io.BytesIO(r.content))).shape == (64, 64)
    facts = json.loads(__import__("base64").b64decode(r.headers["x-cfgen-facts"]))
    assert facts["input"] == "dicom" and facts["factual_prompt"].startswith("a chest x-ray of a ")
    d = _post(server, data=phantom["dicom"], params={"spec": _spec(), "format": "dicom"},
              headers={**AUTH, "Content-Type": "application/dicom"})
    assert d.status_code == 200 and d.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(d.content))
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and "SourceImageSequence" in ds
    assert "Doe" not in str(ds) and "MRN-0042" not in str(ds) and "Example General" not in str(ds)


@pytest.mark.parametrize("case, status", [
    ("malformed_dicom", 422), ("wrong_content_type", 415), ("unknown_attribute", 422), ("absurd_steps", 422),
    ("absurd_guidance", 422), ("bad_json", 400), ("too_large", 413), ("decompression_bomb", 413),
    ("no_token", 401), ("text_as_png", 422), ("empty", 422), ("bad_value", 422),
])
def test_bad_input_gets_a_clear_4xx_and_the_replica_keeps_serving(server, phantom, case, status):
    png = ("x.png", phantom["png"], "image/png")
    if case == "malformed_dicom":
        r = _post(server, data=b"\x00" * 128 + b"DICM" + os.urandom(300), params={"spec": _spec()},
                  headers={**AUTH, "Content-Type": "application/dicom"})
    elif case == "wrong_content_type":
        r = _post(server, data=b"hello", params={"spec": _spec()}, headers={**AUTH, "Content-Type": "text/plain"})
    elif case == "unknown_attribute":
        r = _post(server, files={"file": png}, data={"spec": json.dumps({"set": {"weight": 1}})})
    elif case == "absurd_steps":
        r = _post(server, files={"file": png}, data={"spec": _spec(steps=10**6)})
    elif case == "absurd_guidance":
        r = _post(server, files={"file": png}, data={"spec": _spec(guidance=1e9)})
    elif case == "bad_json":
        r = _post(server, files={"file": png}, data={"spec": "{set: smoking"})
    elif case == "too_large":
        r = _post(server, files={"file": ("big.png", b"\x89PNG\r\n\x1a\n" + os.urandom(2 * 2**20), "image/png")},
                  data={"spec": _spec()})
    elif case == "decompression_bomb":
        buf = io.BytesIO()
        Image.new("L", (4000, 4000)).save(buf, format="PNG")  # 16 MP declared, a few kB on the wire
        r = _post(server, files={"file": ("bomb.png", buf.getvalue(), "image/png")}, data={"spec": _spec()})
    elif case == "no_token":
        r = _post(server, files={"file": png}, data={"spec": _spec()}, headers={})
    elif case == "text_as_png":
        r = _post(server, files={"file": ("x.png", b"not an image at all", "image/png")}, data={"spec": _spec()})
    elif case == "empty":
        r = _post(server, files={"file": ("x.png", b"", "image/png")}, data={"spec": _spec()})
    else:  # bad_value
        r = _post(server, files={"file": png}, data={"spec": json.dumps({"set": {"smoking": 3}})})
    assert r.status_code == status, (case, r.status_code, r.text)
    assert r.json().get("error") or r.json().get("detail")  # a message, not an empty body
    ok = _post(server, files={"file": png}, data={"spec": _spec()})
    assert ok.status_code == 200  # the replica is not wedged


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_the_web_page_uploads_a_phantom_and_shows_the_counterfactual(server, phantom):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server + "/", timeout=60_000)
        page.fill("#token", TOKEN)
        page.click("text=Connect")
        page.wait_for_function("document.querySelectorAll('#attribute option').length > 0", timeout=60_000)
        page.select_option("#attribute", "smoking")
        page.fill("#steps", "2")
        page.set_input_files("#file", str(phantom["png_path"]))
        page.click("#run")
        page.wait_for_selector("#panels:not([hidden])", timeout=120_000)
        width = page.evaluate("document.getElementById('counterfactual').naturalWidth")
        assert width == 64  # the image decoded and rendered
        assert "counterfactual prompt" in page.inner_text("#facts")
        assert page.inner_text("#status") == "done"
        browser.close()


def test_schemathesis_finds_no_server_error(server):
    st = Path(sys.executable).parent / "schemathesis"
    out = subprocess.run(
        [str(st), "run", f"{server}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "25",
         "--header", f"Authorization: Bearer {TOKEN}", "--request-timeout", "120", "--workers", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
