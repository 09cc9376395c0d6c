"""Deployment files parse and match what they claim: KubeRay CRD schemas, and cfgen's own config model."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from cfgen.config import load_config

CRDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "kuberay-crds"


def _schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", sorted(Path("k8s").glob("*.yaml")), ids=str)
def test_manifests_validate_against_kuberay_crds(path):
    if not CRDS.exists():
        pytest.skip("the KubeRay CRDs live in ../shared/data")
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == "ray.io/v1"
        jsonschema.validate(doc, _schema(doc["kind"]))


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=str)
def test_shipped_configs_load(path):
    job = load_config(path)
    assert job.edit.edits


def test_cluster_config_is_a_gpu_config():
    job = load_config("configs/cluster.yaml")
    assert job.train.use_gpu and job.train.precision == "bf16" and job.edit.gpus_per_actor == 1


def _serve_apps():
    docs = [yaml.safe_load(Path("configs/serve/demo.yaml").read_text())]
    service = yaml.safe_load(Path("k8s/rayservice.yaml").read_text())
    docs.append(yaml.safe_load(service["spec"]["serveConfigV2"]))
    return [app for doc in docs for app in doc["applications"]]


@pytest.mark.parametrize("app", _serve_apps(), ids=lambda a: a["args"]["config"])
def test_serve_configs_point_at_the_app_builder_with_a_config_that_loads(app):
    assert app["import_path"] == "cfgen.serve.deployment:app_builder"
    job = load_config(app["args"]["config"], app["args"].get("overrides", "").split())
    assert job.serve.port == 8000 and job.serve.autoscaling.max_replicas >= 1
