"""Regions a discovery statistic is measured in: the lungs, each lung, its upper / middle / lower zone, the rest.

Radiologists describe a frontal CXR by zones: each lung divided into thirds from apex to base. Here the thirds are
taken per lung over the rows its mask spans. Lungs are told apart as the two largest connected parts of the mask;
a mask in one piece is split at the midline of its extent. Frontal CXRs are displayed with the patient's right on
the viewer's left (PA and AP alike), so the part on the image's left is the right lung.

`outside_lungs` is everything beyond the lung mask grown by a margin (the soft lung edge belongs to neither): a
control region for effects that should stay inside the lungs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ZONES = ("upper", "middle", "lower")
#: pixels the lung mask is grown by before its complement becomes `outside_lungs`
OUTSIDE_MARGIN = 2


def split_lungs(lungs: np.ndarray) -> dict[str, np.ndarray]:
    """{"right_lung", "left_lung"} of a boolean lung mask (patient's sides, image shown in radiological
    convention). An empty mask gives two empty masks."""
    from scipy.ndimage import label

    lungs = np.asarray(lungs, dtype=bool)
    empty = np.zeros_like(lungs)
    if not lungs.any():
        return {"right_lung": empty, "left_lung": empty.copy()}
    labels, count = label(lungs)
    if count >= 2:
        sizes = np.bincount(labels.ravel())[1:]
        a, b = (np.argsort(sizes)[::-1][:2] + 1).tolist()
        parts = [labels == a, labels == b]
        # small fragments join the nearer of the two lungs, so no lung pixel is lost from the zones
        rest = lungs & ~parts[0] & ~parts[1]
        if rest.any():
            cols = np.arange(lungs.shape[1])
            centres = [cols[p.any(axis=0)].mean() for p in parts]
            rest_cols = np.nonzero(rest)[1]
            to_first = np.abs(rest_cols - centres[0]) <= np.abs(rest_cols - centres[1])
            rows = np.nonzero(rest)[0]
            parts[0][rows[to_first], rest_cols[to_first]] = True
            parts[1][rows[~to_first], rest_cols[~to_first]] = True
    else:
        cols = np.nonzero(lungs.any(axis=0))[0]
        middle = (cols.min() + cols.max() + 1) / 2.0
        grid = np.arange(lungs.shape[1])[None, :]
        parts = [lungs & (grid < middle), lungs & (grid >= middle)]
    centre = [np.nonzero(p)[1].mean() if p.any() else np.inf for p in parts]
    right, left = (parts[0], parts[1]) if centre[0] <= centre[1] else (parts[1], parts[0])
    return {"right_lung": right, "left_lung": left}


def zones(lung: np.ndarray) -> dict[str, np.ndarray]:
    """Upper, middle and lower thirds of one lung's mask, by the rows it spans."""
    lung = np.asarray(lung, dtype=bool)
    rows = np.nonzero(lung.any(axis=1))[0]
    if rows.size == 0:
        return {z: np.zeros_like(lung) for z in ZONES}
    top, bottom = rows.min(), rows.max() + 1
    edges = top + (bottom - top) * np.arange(4) / 3.0
    r = np.arange(lung.shape[0])[:, None]
    return {z: lung & (r >= edges[i]) & (r < edges[i + 1]) for i, z in enumerate(ZONES)}


def lung_regions(lungs: np.ndarray) -> dict[str, np.ndarray]:
    """Every lung region: `lungs`, each lung, each lung's three zones (`right_lung_upper`, …), `outside_lungs`."""
    from scipy.ndimage import binary_dilation

    lungs = np.asarray(lungs, dtype=bool)
    out = {"lungs": lungs}
    for side, mask in split_lungs(lungs).items():
        out[side] = mask
        out.update({f"{side}_{z}": m for z, m in zones(mask).items()})
    grown = binary_dilation(lungs, iterations=OUTSIDE_MARGIN) if lungs.any() else lungs
    out["outside_lungs"] = ~grown
    return out


def region_masks(masks: Mapping[str, np.ndarray | None], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """All regions of one image from its named masks ({"lungs": …, "heart": …, user masks}): the lung mask
    expands into `lung_regions`, any other mask is a region of its own, and `image` is the whole image. A mask
    of another shape than the image is a ValueError naming it (a caller's mistake, not a row's)."""
    out = {"image": np.ones(shape, dtype=bool)}
    for name, mask in masks.items():
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.shape != tuple(shape):
            raise ValueError(f"region mask {name!r} has shape {mask.shape}, the image {tuple(shape)}: masks must be "
                             "decoded to the image's size (data.decode.size)")
        mask = mask > 0.5 if mask.dtype.kind == "f" else mask.astype(bool)
        out.update(lung_regions(mask) if name == "lungs" else {name: mask})
    return out


def region_means(image: np.ndarray, regions: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean intensity of `image` in each region; NaN for an empty region (no pixels: nothing to measure)."""
    image = np.asarray(image, dtype=np.float64)
    return {name: float(image[m].mean()) if m.any() else float("nan") for name, m in regions.items()}
