"""Mixup / CutMix on a batch of clips, with soft targets (timm / pySlowFast ``MixUp`` semantics).

Per batch: with probability ``prob`` mix at all; then CutMix with probability ``switch_prob`` when
both are enabled, else Mixup. The mixing weight is drawn from Beta(alpha, alpha); for CutMix a box
covering ``1 - lam`` of the frame (the same box on every frame) is pasted from the flipped batch
and ``lam`` is corrected to the box actually pasted after clipping. Targets are
``lam * onehot(y) + (1 - lam) * onehot(y.flip(0))``, each one-hot label-smoothed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed one-hot (B, K); multi-hot (B, K) float input is smoothed the same way."""
    if labels.dim() == 1:
        target = F.one_hot(labels.long(), num_classes).float()
    else:
        target = labels.float()
    return target * (1.0 - smoothing) + smoothing / num_classes


def cutmix_box(h: int, w: int, lam: float, gen: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """Box (y0, y1, x0, x1) of area about (1 - lam) * h * w, centred uniformly, clipped to the frame."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(0, h, (1,), generator=gen))
    cx = int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return y0, y1, x0, x1


class MixupCutmix:
    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1):
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _beta(self, alpha: float, gen) -> float:
        # Beta(a, a) as a ratio of Gammas drawn from torch's RNG (resumable with its state)
        a = torch.full((2,), float(alpha))
        g = torch._standard_gamma(a) if gen is None else torch._standard_gamma(a, generator=gen)
        return float(g[0] / g.sum())

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, gen: torch.Generator | None = None):
        """x: (B, C, ..., H, W); returns (mixed x, soft targets (B, K), lam, used)."""
        target = one_hot(labels, self.num_classes, self.label_smoothing).to(x.device)
        if not self.enabled or float(torch.rand((), generator=gen)) >= self.prob:
            return x, target, 1.0, "none"
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or float(torch.rand((), generator=gen)) < self.switch_prob)
        if use_cutmix:
            lam = self._beta(self.cutmix_alpha, gen)
            h, w = x.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(h, w, lam, gen)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
            kind = "cutmix"
        else:
            lam = self._beta(self.mixup_alpha, gen)
            x = x * lam + x.flip(0) * (1.0 - lam)
            kind = "mixup"
        target = target * lam + target.flip(0) * (1.0 - lam)
        return x, target, lam, kind


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
