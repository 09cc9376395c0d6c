"""A classifier is a folder: `config.json` (the network's config, see `network_config`) and `model.safetensors`.

It loads from a local folder, an `s3://`/`gs://` folder (copied once to the local cache) or the MLflow registry
(`models:/cfgen-classifier@champion`). A folder that is missing, not a classifier, or of another architecture
than asked for fails at once with a message that says what was found.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from cfgen.classify.network import FORMAT, FORMAT_VERSION, AttributeClassifier
from cfgen.config import StorageConfig, TrackingConfig
from cfgen.models.cache import local_copy, put_folder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_classifier(model: AttributeClassifier, uri: str, storage: StorageConfig | None = None,
                    extra: dict | None = None) -> str:
    """Write the folder (plus `extra` JSON files, e.g. the evaluation) locally or to object storage."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, CONFIG_FILE).write_text(json.dumps(model.config, indent=2, sort_keys=True))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(tmp, WEIGHTS_FILE)))
        for name, payload in (extra or {}).items():
            Path(tmp, name).write_text(json.dumps(payload, indent=2, default=float))
        if "://" not in uri or uri.startswith("file://"):
            Path(uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        return put_folder(tmp, uri, storage)


def read_classifier_config(folder: str) -> dict:
    path = Path(folder, CONFIG_FILE)
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"no classifier folder at {folder}")
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a cfgen classifier folder: it has no {CONFIG_FILE}")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder}/{CONFIG_FILE} is not a cfgen attribute classifier (format "
                         f"{config.get('format')!r}, expected {FORMAT!r})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{folder}: classifier format version {config['format_version']} is newer than this cfgen "
                         f"reads ({FORMAT_VERSION}); upgrade cfgen")
    return config


def resolve_classifier_uri(uri: str, storage: StorageConfig | None, tracking: TrackingConfig | None) -> str:
    """A local folder for `uri` (registry aliases and object storage are downloaded once)."""
    if uri.startswith("models:/"):
        from cfgen.tracking.runs import download_model

        if tracking is None:
            raise ValueError(f"{uri}: a registry URI needs the tracking config")
        return download_model(tracking, uri, marker=CONFIG_FILE)
    return local_copy(uri, storage)


def load_classifier(
    uri: str,
    storage: StorageConfig | None = None,
    tracking: TrackingConfig | None = None,
    device: str | torch.device = "cpu",
    architecture: str | None = None,
) -> AttributeClassifier:
    """Load a classifier folder; `architecture`, when given, must match the folder's."""
    from safetensors.torch import load_file

    folder = resolve_classifier_uri(uri, storage, tracking)
    config = read_classifier_config(folder)
    if architecture is not None and config["architecture"] != architecture:
        raise ValueError(f"classifier at {uri} is a {config['architecture']!r}, the config asks for "
                         f"{architecture!r}: retrain, or set classifier.architecture to {config['architecture']!r}")
    model = AttributeClassifier(config)
    state = load_file(str(Path(folder, WEIGHTS_FILE)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"classifier weights at {uri} do not fit its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}): the folder is damaged or mixed from two models")
    return model.to(device).eval()
