"""Counting the UNet's work: the one figure of generation cost no machine's noise changes (DESIGN.md §6).

`CountingUNet` wraps the pipeline's UNet for one engine call and counts the rows (images x guidance branches) it
evaluates forward, and those a backward pass went through (null-text optimisation), so the engine reports what it
spent rather than what a formula says it should have.
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
        if torch.is_grad_enabled() and (sample.requires_grad or (encoder_hidden_states is not None and
                                                                encoder_hidden_states.requires_grad)):
            self.backward_rows += rows
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device
