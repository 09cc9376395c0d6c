"""The classifier network: a MONAI DenseNet trunk, one output per attribute, calibrated temperatures.

Built from its config dict alone (no weight download), so a saved folder is its config plus its weights. The
pooled trunk features (`features`) are what realism and minimality compare: a CXR network's view of the image,
since Inception weights cannot be had here (DESIGN.md §2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfgen.metrics.effectiveness import REGRESSION_ATTRIBUTES
from cfgen.config import ClassifierConfig

FORMAT = "cfgen-attribute-classifier"
FORMAT_VERSION = 1


def network_config(cfg: ClassifierConfig, age_mean: float = 55.0, age_sd: float = 15.0) -> dict[str, Any]:
    """Everything needed to rebuild the network: saved as the folder's config.json."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": cfg.architecture,
        "attributes": list(cfg.attributes),
        "init_features": cfg.init_features,
        "growth_rate": cfg.growth_rate,
        "block_config": list(cfg.block_config),
        "dropout": cfg.dropout,
        "image_size": cfg.image_size,
        "age_mean": float(age_mean),
        "age_sd": float(age_sd),
    }


def _trunk(config: dict[str, Any], outputs: int) -> nn.Module:
    from monai.networks.nets import DenseNet, DenseNet121

    if config["architecture"] == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=1, out_channels=outputs, dropout_prob=config["dropout"])
    if config["architecture"] == "densenet":
        return DenseNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=outputs,
            init_features=config["init_features"],
            growth_rate=config["growth_rate"],
            block_config=tuple(config["block_config"]),
            dropout_prob=config["dropout"],
        )
    raise ValueError(f"unknown classifier architecture {config['architecture']!r}: densenet or densenet121")


class AttributeClassifier(nn.Module):
    """images [B,1,H,W] in [0,1] -> logits [B,K]: a logit per binary attribute, standardised years for age.

    `temperature` [K] divides binary logits at prediction time (1 until `calibrate` fits it); it is a buffer, so it
    travels with the weights."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.attributes: list[str] = list(config["attributes"])
        self.net = _trunk(config, len(self.attributes))
        self.register_buffer("temperature", torch.ones(len(self.attributes)))
        self.is_regression = torch.tensor([a in REGRESSION_ATTRIBUTES for a in self.attributes])

    @property
    def feature_dim(self) -> int:
        return int(self.net.class_layers.out.in_features)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        size = int(self.config["image_size"])
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - 0.5) / 0.25

    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features [B, feature_dim] (the layers before the output layer)."""
        h = self.net.features(self._prepare(x))
        for name, layer in self.net.class_layers.named_children():
            if name == "out":
                break
            h = layer(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.class_layers.out(self.trunk_features(x))

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated outputs [B,K], features [B,D]): probabilities for binary attributes, years for age."""
        feats = self.trunk_features(x)
        logits = self.net.class_layers.out(feats)
        probs = torch.sigmoid(logits / self.temperature)
        years = logits * self.config["age_sd"] + self.config["age_mean"]
        return torch.where(self.is_regression.to(logits.device), years, probs), feats

    def image_batches(self, images: np.ndarray, batch_size: int = 256):
        """uint8/uint16/float grayscale images [N,H,W] as [B,1,H,W] float tensors in [0,1] on the model's device."""
        from cfgen.metrics.image import as_unit_float

        device = next(self.parameters()).device
        arr = as_unit_float(np.asarray(images))
        for i in range(0, len(arr), batch_size):
            yield torch.from_numpy(np.ascontiguousarray(arr[i : i + batch_size])).unsqueeze(1).to(device)

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Numpy in, numpy out: {attribute: probability or years [N], "features": [N, D]} for uint8/uint16/float
        grayscale images [N,H,W]."""
        was_training = self.training
        self.eval()
        outs, feats = [], []
        for x in self.image_batches(images, batch_size):
            o, f = self.outputs(x)
            outs.append(o.float().cpu().numpy())
            feats.append(f.float().cpu().numpy())
        self.train(was_training)
        k, d = len(self.attributes), self.feature_dim
        out = np.concatenate(outs) if outs else np.zeros((0, k), np.float32)
        result = {a: out[:, j] for j, a in enumerate(self.attributes)}
        result["features"] = np.concatenate(feats) if feats else np.zeros((0, d), np.float32)
        return result


def masked_loss(
    model: AttributeClassifier, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor,
    pos_weight: torch.Tensor, sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy (rare classes weighted by `pos_weight`) on binary heads, Huber on standardised age,
    each over known labels only (and weighted per image by `sample_weight`); a batch with no known label of an
    attribute contributes nothing for it."""
    reg = model.is_regression.to(logits.device)
    known = known.float()
    age_z = (targets - model.config["age_mean"]) / model.config["age_sd"]
    bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    huber = F.smooth_l1_loss(logits, age_z, reduction="none")
    if sample_weight is not None:
        known = known * sample_weight[:, None]
    per = torch.where(reg, huber, bce) * known
    counts = known.sum(0)
    per_attribute = per.sum(0) / counts.clamp(min=1)
    return per_attribute[counts > 0].sum() / max(1, len(model.attributes))
