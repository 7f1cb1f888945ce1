"""Multiscale Vision Transformers (MViT v1 and v2): model, presets, converters, tools."""

from .config import BlockSpec, MViTConfig
from .model import MViT, build_model
from .presets import PAPER_FIGURES, PRESETS, get_preset

__all__ = ["MViT", "MViTConfig", "BlockSpec", "build_model", "PRESETS", "PAPER_FIGURES", "get_preset"]
