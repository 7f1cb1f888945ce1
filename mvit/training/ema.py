"""Exponential moving average of the weights (``--ema-decay``), kept in float32 on the model's device."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = list(self.module.state_dict().values())
        cur = list(model.state_dict().values())
        floats = [(e, c) for e, c in zip(ema, cur) if e.dtype.is_floating_point]
        others = [(e, c) for e, c in zip(ema, cur) if not e.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [c.detach() for _, c in floats], 1.0 - self.decay)
        for e, c in others:
            e.copy_(c)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
