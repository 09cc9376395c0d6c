"""Engine calls of one fixed shape, so that an image's counterfactual is the same to the bit in any batch.

Measured on CPU (bench/RESULTS.md, `bench_edit_gpu.py --batch-check`): an image edited in a batch of the same size
gives the same counterfactual to the bit, whatever the other images are and wherever it sits, while a batch of
another size changes it by rounding (the kernels a matrix product or a convolution takes depend on its shape; on
a GPU in bf16, and with guidance, far more than on CPU). A job's batches are not all full: the last one of a
stream, the groups a batch splits into by rule and edits, a resumed run's leftovers, the single-image retries
after a failure. Padding every call to `pad_to` images with filler images, and dropping their results, gives every
call the same shapes. The fillers cost their UNet rows (reported in the result's per-counterfactual figures).

What still changes shapes: inversions reused from an earlier call (only the missing images would be inverted, in
a smaller batch), so a padded call keeps none across calls; and null-text inversion's early stop, which leaves
converged images out of the optimised batch (on CPU that has not changed a bit: bench/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable

import numpy as np

from cfgen.editing.engine import EngineResult, counterfactuals
from cfgen.editing.inversion_cache import InversionCache


def fillers(image: np.ndarray, n: int) -> np.ndarray:
    """`n` images of `image`'s shape and dtype, each its own however many (two alike would share one inversion and
    shrink the batch): mid grey, with the filler's number written in base 256 (uint8) or 65536 (uint16) into the
    first pixels, or as a fraction into the first pixel of a float image."""
    out = np.empty((n, *image.shape), dtype=image.dtype)
    flat = out.reshape(n, -1)
    if np.issubdtype(image.dtype, np.integer):
        base = int(np.iinfo(image.dtype).max) + 1
        flat[:] = base // 2
        number, digit = np.arange(n), 0
        while digit == 0 or number.any():
            flat[:, digit] = number % base
            number, digit = number // base, digit + 1
    else:
        flat[:] = 0.5
        flat[:, 0] = np.arange(n) / n
    return out


def _pad(items: list, n: int) -> list:
    return list(items) + [items[0]] * n


def counterfactuals_padded(pipe, images: np.ndarray, factual_prompts: list[str],
                           counterfactual_prompts: list[list[str]], pad_to: int, *, masks: np.ndarray | None = None,
                           seeds: list[int] | None = None, hold_prompts: list[list[list[str]]] | None = None,
                           **options) -> EngineResult:
    """`cfgen.editing.engine.counterfactuals` over `images` in calls of exactly `pad_to` images: chunks of
    `pad_to`, the last one padded with fillers (they take its first image's prompts, mask and seed) whose results
    are dropped; `options` are the engine's other keywords."""
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    if options.get("inversion_cache") is not None:
        raise ValueError("a padded call keeps no inversions across calls (a reused one was made in another shape)")
    images = np.asarray(images)
    if not len(images):  # nothing to pad: the engine's own error
        return counterfactuals(pipe, images, factual_prompts, counterfactual_prompts, masks=masks, seeds=seeds,
                               hold_prompts=hold_prompts, **options)
    seeds = list(seeds) if seeds is not None else list(range(len(images)))
    parts = []
    for start in range(0, len(images), pad_to):
        rows = slice(start, start + pad_to)
        parts.append(_padded_call(
            pipe, images[rows], factual_prompts[rows], [p[rows] for p in counterfactual_prompts], pad_to,
            None if masks is None else masks[rows], seeds[rows],
            None if hold_prompts is None else [[p[rows] for p in per_edit] for per_edit in hold_prompts], options))
    return parts[0] if len(parts) == 1 else _joined(parts)


def _padded_call(pipe, images, factual_prompts, counterfactual_prompts, pad_to, masks, seeds, hold_prompts,
                 options) -> EngineResult:
    n = len(images)
    extra = pad_to - n
    result = counterfactuals(
        pipe,
        np.concatenate([images, fillers(images[0], extra)]) if extra else images,
        _pad(factual_prompts, extra),
        [_pad(prompts, extra) for prompts in counterfactual_prompts],
        masks=None if masks is None else np.concatenate([masks, np.repeat(masks[:1], extra, axis=0)]),
        seeds=_pad(seeds, extra),
        hold_prompts=None if hold_prompts is None else [[_pad(p, extra) for p in per_edit] for per_edit in hold_prompts],
        inversion_cache=InversionCache(max_images=0),
        **options,
    )
    if not extra:
        return result
    spent = pad_to / n  # the fillers' UNet rows, charged to the real counterfactuals
    return replace(
        result,
        counterfactuals=[c[:n] for c in result.counterfactuals],
        null_edit=None if result.null_edit is None else result.null_edit[:n],
        autoencoded=result.autoencoded[:n],
        raw_counterfactuals=[c[:n] for c in result.raw_counterfactuals],
        unet_forward=result.unet_forward * spent,
        unet_backward=result.unet_backward * spent,
        unet_forward_per_image=int(round(result.unet_forward_per_image * spent)),
        settings=[s[:n] for s in result.settings],
        null_edits=None if result.null_edits is None else [c[:n] for c in result.null_edits],
    )


def _joined(parts: list[EngineResult]) -> EngineResult:
    """The chunks' results as one call's: images concatenated, UNet figures averaged over the images."""
    sizes = np.array([len(p.autoencoded) for p in parts], dtype=np.float64)

    def per_edit(name: str) -> list[np.ndarray] | None:
        lists = [getattr(p, name) for p in parts]
        return None if lists[0] is None else [np.concatenate(e) for e in zip(*lists)]

    def mean(name: str) -> float:
        return float(np.dot([getattr(p, name) for p in parts], sizes) / sizes.sum())

    return EngineResult(
        counterfactuals=per_edit("counterfactuals"),
        null_edit=None if parts[0].null_edit is None else np.concatenate([p.null_edit for p in parts]),
        autoencoded=np.concatenate([p.autoencoded for p in parts]),
        raw_counterfactuals=per_edit("raw_counterfactuals"),
        unet_forward=mean("unet_forward"), unet_backward=mean("unet_backward"),
        unet_forward_per_image=int(round(mean("unet_forward_per_image"))),
        settings=[sum(e, []) for e in zip(*(p.settings for p in parts))],
        null_edits=per_edit("null_edits"),
    )


def engine_call(pad_to: int | None) -> Callable[..., EngineResult]:
    """`counterfactuals`, or its padded form when `pad_to` is set (`EditConfig.pad_batches`): one signature."""
    return counterfactuals if pad_to is None else partial(counterfactuals_padded, pad_to=pad_to)
