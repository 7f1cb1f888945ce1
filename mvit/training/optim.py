"""AdamW with the papers' weight-decay exemptions, layer-wise LR decay, and the LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise LR decay: embeddings 0, block i -> i + 1, head depth + 1."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 zero_decay_pos_cls: bool = True) -> list[dict]:
    """Groups for AdamW: no decay for 1-D parameters (biases, norms), nor, with
    ``zero_decay_pos_cls`` (pySlowFast's MVIT.ZERO_DECAY_POS_CLS, which the papers' configs turn
    off), for ``model.no_weight_decay()`` (position embeddings, class token, rel-pos tables); with
    ``layer_decay < 1`` each group also carries ``lr_scale = layer_decay ** (depth + 1 - layer)``."""
    skip = set(model.no_weight_decay()) if zero_decay_pos_cls and hasattr(model, "no_weight_decay") else set()
    depth = len(getattr(model, "blocks", []))
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip
        layer = layer_id(name, depth) if layer_decay < 1.0 else 0
        key = (no_decay, layer)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer) if layer_decay < 1.0 else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


#: ``--optimizer`` choices: pySlowFast's SOLVER.OPTIMIZING_METHOD values the MViT configs use.
OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0,
                    betas=(0.9, 0.999), zero_decay_pos_cls: bool = True, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (Kinetics, ImageNet) or SGD with Nesterov momentum 0.9 (Something-Something), as
    pySlowFast builds them: SOLVER.MOMENTUM 0.9, DAMPENING 0, NESTEROV true."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    groups = param_groups(model, weight_decay, layer_decay, zero_decay_pos_cls)
    names = [g.pop("names") for g in groups]
    if kind == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    opt.group_names = names  # kept for inspection and tests, not saved
    return opt


@dataclass
class WarmupCosine:
    """Linear warmup from ``start_lr`` to ``peak_lr`` over ``warmup_steps``, then a half-period
    cosine down to ``end_lr`` at ``total_steps``; set every iteration (pySlowFast ``cosine``)."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    start_lr: float = 1e-6
    end_lr: float = 1e-6
    step_count: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_lr + (self.peak_lr - self.start_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.step_count = step
        return lr

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
