"""Counting the UNet's work: the one figure of generation cost no machine's noise changes (DESIGN.md §6).

`CountingUNet` wraps the pipeline's UNet for one engine call and counts the rows (images x guidance branches) it
evaluates forward, and those a backward pass really went through (null-text optimisation), so the engine reports
what it spent rather than what a formula says it should have. Backward rows are counted by a gradient hook on the
output, not at forward time: a forward with gradients enabled whose loss turns out small enough to stop on never
runs backward and is not counted as if it had.
"""

from __future__ import annotations

import torch


class CountingUNet(torch.nn.Module):
    """A transparent wrapper: same call signature and outputs as the UNet, plus `forward_rows` and
    `backward_rows` counters."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.forward_rows = 0
        self.backward_rows = 0

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states=None, **kwargs):
        rows = int(sample.shape[0])
        self.forward_rows += rows
        out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        predicted = out if isinstance(out, torch.Tensor) else out.sample if hasattr(out, "sample") else out[0]
        if predicted.requires_grad:
            predicted.register_hook(lambda grad: self._count_backward(rows))
        return out

    def _count_backward(self, rows: int) -> None:
        self.backward_rows += rows

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    # Prompt-to-Prompt swaps the attention processors of the model inside the wrapper.
    @property
    def attn_processors(self):
        return self.unet.attn_processors

    def set_attn_processor(self, processor) -> None:
        self.unet.set_attn_processor(processor)
