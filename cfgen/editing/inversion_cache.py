"""Inversions kept per (image, model version, prompt, settings), so several edits and sweep settings reuse one.

An inversion is the dearest part of an edit (null-text inversion: about 650 of PRISM's 1,700 evaluations at 50
steps, DESIGN.md §6) and depends only on the image, the model, the factual prompt and the inversion's own settings,
never on the edit. Within one engine call every edit of an image shares its inversion by construction; this cache
carries them across calls (Serve requests on one image, benchmark variants, a second list of edits) in an
in-process LRU dict, one entry per image so that it does not matter which batch an image came in.

The model's version is an identity token per loaded module (never reused, unlike `id()`) plus the modules'
parameter version counters, which every in-place weight change (an optimizer step, `load_state_dict`) bumps: a
model trained further in the same process does not reuse inversions made before.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

_module_tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_next_token = itertools.count()


def _module_version(module: torch.nn.Module) -> tuple[int, int]:
    if module not in _module_tokens:
        _module_tokens[module] = next(_next_token)
    # `_version` is torch's per-tensor counter of in-place writes (what autograd checks saved tensors with)
    return _module_tokens[module], sum(p._version for p in module.parameters())


def model_fingerprint(pipe) -> tuple:
    """What an inversion depends on besides the image and the prompt: the UNet, the VAE (it makes the latent), the
    text encoder (it embeds the prompt), their dtype and device, and the noise schedule."""
    schedule = json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str)
    return (
        *(_module_version(m) for m in (pipe.unet, pipe.vae, pipe.text_encoder)),
        str(pipe.unet.dtype), str(pipe.unet.device), hashlib.sha1(schedule.encode()).hexdigest(),
    )


def image_digest(image: np.ndarray) -> str:
    arr = np.ascontiguousarray(image)
    return hashlib.sha1(arr.tobytes() + str((arr.shape, arr.dtype.str)).encode()).hexdigest()


Inversion = dict[str, torch.Tensor]  # one image's tensors (trajectory, null embeddings, noise maps), no batch axis


class InversionCache:
    """An LRU dict of per-image inversions; `max_images=0` keeps nothing (every call inverts)."""

    def __init__(self, max_images: int = 64):
        self.max_images = max_images
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, Inversion] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def per_image(self, keys: list[Hashable], compute: Callable[[list[int]], list[Inversion]]) -> list[Inversion]:
        """The inversion of every key; the missing ones are computed together by `compute(indices)` (one batch)."""
        found: list[Inversion | None] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            found.append(entry)
        # an image that appears twice in one batch is inverted once
        missing = list(dict.fromkeys(keys[i] for i, e in enumerate(found) if e is None))
        self.hits += len(keys) - sum(e is None for e in found)
        self.misses += len(missing)
        if missing:
            first = [keys.index(key) for key in missing]
            computed = dict(zip(missing, compute(first)))
            for key, entry in computed.items():
                self._entries[key] = entry
            while len(self._entries) > self.max_images:
                self._entries.popitem(last=False)
            found = [computed.get(key, e) if e is None else e for key, e in zip(keys, found)]
        return found  # type: ignore[return-value]


_SHARED = InversionCache()


def shared_cache() -> InversionCache:
    """The process's cache, used by the engine unless a call brings its own."""
    return _SHARED


@dataclass
class BatchInversions:
    """The cache seen from one engine call: a key per image of its batch (model version + image bytes)."""

    cache: InversionCache
    image_keys: list[tuple]

    def per_image(self, kind: str, conditions: list[Hashable], settings: dict,
                  compute: Callable[[list[int]], list[Inversion]]) -> list[Inversion]:
        """`kind`: the inversion (its name); `conditions`: what each image's inversion depends on besides the image
        (its factual prompt; DDPM inversion: also its seed); `settings`: what the whole batch's depends on."""
        extra = tuple(sorted(settings.items()))
        keys = [(kind, image, condition, extra) for image, condition in zip(self.image_keys, conditions)]
        return self.cache.per_image(keys, compute)

    def stacked(self, kind: str, conditions: list[Hashable], settings: dict,
                compute: Callable[[list[int]], list[Inversion]]) -> dict[str, torch.Tensor]:
        """`per_image`, with every tensor stacked along a new batch axis 1 (axis 0 is the step)."""
        entries = self.per_image(kind, conditions, settings, compute)
        return {name: torch.stack([e[name] for e in entries], dim=1) for name in entries[0]}


def split_images(batched: dict[str, torch.Tensor]) -> list[Inversion]:
    """[steps, B, ...] tensors -> one `Inversion` per image (the cache's unit)."""
    n = next(iter(batched.values())).shape[1]
    return [{name: t[:, i].clone() for name, t in batched.items()} for i in range(n)]
