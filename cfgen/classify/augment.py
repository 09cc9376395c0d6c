"""Training augmentation that keeps every attribute the classifier reads.

Small rigid jitter only: shifts up to 4% of the width, rotations up to 5 degrees, zoom 0.95-1.05, the spread of
patient positioning between acquisitions. No horizontal flip: laterality is anatomy (the heart and a pacemaker sit
on the patient's left, an effusion on a named side), so a flipped CXR is not a plausible image of any patient. No
brightness, contrast or gamma change: smoking's effect on the lungs is an intensity shift (DESIGN.md §3), which
intensity augmentation would teach the classifier to ignore.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_rigid(images: torch.Tensor, generator: torch.Generator, shift: float = 0.04, degrees: float = 5.0,
                 zoom: float = 0.05) -> torch.Tensor:
    """images [B,1,H,W] -> the same, each jittered by its own small shift, rotation and zoom (border replicated)."""
    b = images.shape[0]
    u = torch.rand(b, 4, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(degrees)
    scale = 1.0 + u[:, 1] * zoom
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin, u[:, 2] * shift * 2], dim=1),
        torch.stack([sin, cos, u[:, 3] * shift * 2], dim=1),
    ], dim=1).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
