"""Checkpoint converters: torchvision and pySlowFast / facebookresearch/mvit weights into :class:`MViT`.

- torchvision ``mvit_v1_b`` / ``mvit_v2_s`` state_dicts (``source="torchvision"``);
- pySlowFast model-zoo checkpoints (``source="pyslowfast"``): fused ``qkv`` or separate
  ``q``/``k``/``v`` projections, ``model_state`` nesting, DDP ``module.`` prefixes, and the older
  MViT-B checkpoints whose stride-1 blocks have no K/V pooling (SlowFast#456): those blocks are
  detected from the missing keys and built without K/V pooling;
- facebookresearch/mvit image checkpoints (``source="mvit"``): same layout with 2-D convs;
- timm ``mvitv2_*`` image models (``source="timm"``: its ``stages.S.blocks.B`` layout, e.g. the
  authors' weights as timm's ``model.safetensors``); the architecture is read from the weights;
- pytorchvideo's MViT-B models (``source="pytorchvideo"``: ``mvit_base_16x4``, ``mvit_base_32x3``,
  ``mvit_base_16`` of its model zoo); the architecture is read from the weights.

Every converter maps names and shapes, then checks the result against the model's own
state_dict: missing, unexpected or mis-shaped keys raise one error that lists all of them.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Mapping, Optional, Union

import torch

from .config import MViTConfig
from .model import MViT
from .presets import PRESETS, get_preset, mvitv2_image
from .training.checkpoint import load_checked

StateDict = dict[str, torch.Tensor]
SOURCES = ("mvit_kernels", "torchvision", "pyslowfast", "mvit", "timm", "pytorchvideo")


class CheckpointMismatchError(ValueError):
    """The converted state_dict does not fit the model; the message lists every problem."""


def _unwrap(checkpoint: Mapping) -> StateDict:
    """The state_dict inside a checkpoint file (pySlowFast nests it under 'model_state')."""
    for key in ("model_state", "model", "state_dict", "model_ema"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _shape(src: Mapping[str, torch.Tensor], key: str, ndim: int, source: str) -> tuple:
    """The shape of ``src[key]``, which must have ``ndim`` dimensions of at least 1 (a tensor of
    another rank failed later with an IndexError or a ZeroDivisionError, naming no key)."""
    shape = tuple(src[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointMismatchError(f"not a {source} state_dict: {key} has shape {shape}, expected {ndim} "
                                      "non-empty dimensions")
    return shape


# --- torchvision ------------------------------------------------------------------------------

_TV_RULES = [
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^blocks\.(\d+)\.attn\.project\.0\.", r"blocks.\1.attn.proj."),
    (r"^blocks\.(\d+)\.attn\.pool_([qkv])\.pool\.weight$", r"blocks.\1.attn.pool_\2.weight"),
    (r"^blocks\.(\d+)\.attn\.pool_([qkv])\.norm_act\.0\.", r"blocks.\1.attn.pool_\2.norm."),
    (r"^blocks\.(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.3\.", r"blocks.\1.mlp.fc2."),
    (r"^blocks\.(\d+)\.project\.", r"blocks.\1.proj."),
    (r"^head\.1\.", "head.projection."),
]
_TV_POS = {
    "pos_encoding.class_token": "cls_token",
    "pos_encoding.spatial_pos": "pos_embed_spatial",
    "pos_encoding.temporal_pos": "pos_embed_temporal",
    "pos_encoding.class_pos": "pos_embed_class",
}


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def convert_torchvision(state: Mapping[str, torch.Tensor]) -> StateDict:
    """torchvision ``MViT`` names and shapes -> this project's."""
    out: StateDict = {}
    for key, value in _unwrap(state).items():
        if key in _TV_POS:
            # torchvision keeps (C,) / (L, C) tables; here they are (1, 1, C) / (1, L, C).
            if value.dim() not in (1, 2) or value.numel() == 0:
                raise CheckpointMismatchError(f"not a torchvision MViT state_dict: {key} has shape "
                                              f"{tuple(value.shape)}, expected (C,) or (L, C)")
            out[_TV_POS[key]] = value.reshape(1, -1, value.shape[-1])
        else:
            out[_rename(key, _TV_RULES)] = value
    return out


def torchvision_config(state: Mapping[str, torch.Tensor]) -> MViTConfig:
    """The preset a torchvision state_dict was built from (v2 has rel-pos tables)."""
    state = _unwrap(state)
    name = "mvitv2_s_16x4" if any("rel_pos" in k for k in state) else "mvit_b_16x4"
    cfg = get_preset(name)
    if "head.1.weight" in state:
        cfg = cfg.replace(num_classes=_shape(state, "head.1.weight", 2, "torchvision MViT")[0])
    if "pos_encoding.spatial_pos" in state and "pos_encoding.temporal_pos" in state:
        side = _square_side(_shape(state, "pos_encoding.spatial_pos", 2, "torchvision MViT")[0])
        frames = _shape(state, "pos_encoding.temporal_pos", 2, "torchvision MViT")[0]
        t, h, w = cfg.patch_grid
        if (frames, side) != (t, h):
            cfg = cfg.replace(input_size=(frames * 2, side * 4, side * 4))
    return cfg


# --- pySlowFast / facebookresearch/mvit -------------------------------------------------------

_PYSF_RULES = [
    (r"^blocks\.(\d+)\.attn\.norm_([qkv])\.", r"blocks.\1.attn.pool_\2.norm."),
]


def convert_pyslowfast(state: Mapping[str, torch.Tensor], cfg: Optional[MViTConfig] = None) -> StateDict:
    """pySlowFast (and facebookresearch/mvit) names and shapes -> this project's.

    Separate ``q``/``k``/``v`` projections are concatenated into ``qkv``; 2-D pooling convs of the
    image repository become (d, 1, 1, kH, kW); a 3-D patch conv with one frame loads into a
    2-D patch embedding."""
    src = _unwrap(state)
    out: StateDict = {}
    for key, value in src.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.([qkv])\.(weight|bias)$", key)
        if m:
            continue  # merged below
        new = _rename(key, _PYSF_RULES)
        if re.match(r"^blocks\.\d+\.attn\.pool_[qkv]\.weight$", new) and value.dim() == 4:
            value = value.unsqueeze(2)  # Conv2d (d, 1, kH, kW) -> (d, 1, 1, kH, kW)
        out[new] = value
    blocks = {int(m.group(1)) for k in src for m in [re.match(r"^blocks\.(\d+)\.attn\.q\.weight$", k)] if m}
    for b in sorted(blocks):
        for part in ("weight", "bias"):
            pieces = [src.get(f"blocks.{b}.attn.{n}.{part}") for n in "qkv"]
            if all(p is not None for p in pieces):
                out[f"blocks.{b}.attn.qkv.{part}"] = torch.cat(pieces, dim=0)
            elif any(p is not None for p in pieces):
                missing = [n for n, p in zip("qkv", pieces) if p is None]
                raise CheckpointMismatchError(
                    f"block {b}: separate q/k/v projection is missing {', '.join(missing)}.{part}"
                )
    if cfg is not None and cfg.patch_2d:
        w = out.get("patch_embed.proj.weight")
        if w is not None and w.dim() == 5 and w.shape[2] == 1:
            out["patch_embed.proj.weight"] = w.squeeze(2)
    return out


def pyslowfast_config(state: Mapping[str, torch.Tensor], cfg: MViTConfig) -> MViTConfig:
    """Adapt a preset to what a pySlowFast checkpoint holds: the number of classes, where the
    channels grow, and the blocks of old checkpoints that have no K/V pooling (SlowFast#456)."""
    src = _unwrap(state)
    blocks = {int(m.group(1)) for k in src for m in [re.match(r"^blocks\.(\d+)\.", k)] if m}
    if blocks and len(blocks) != cfg.depth:
        # a wrong guess from the file's name (pySlowFast's MVIT_B_32x3_CONV config is 24 blocks
        # deep: mvit_b24_32x3, not mvit_b_32x3): name the presets that have the checkpoint's depth
        fits = sorted(name for name, p in PRESETS.items() if p.depth == len(blocks) and p.patch_2d == cfg.patch_2d)
        raise CheckpointMismatchError(
            f"the checkpoint has {len(blocks)} blocks, preset {cfg.name} has {cfg.depth}"
            + (f": try {' or '.join(fits)}" if fits else ""))
    if "head.projection.weight" in src:
        classes = _shape(src, "head.projection.weight", 2, "pySlowFast MViT")[0]
        if classes != cfg.num_classes:
            cfg = cfg.replace(num_classes=classes)
    in_att = _channels_grow_in_attention(src, cfg)
    if in_att is not None and in_att != cfg.dim_mul_in_att:
        cfg = cfg.replace(dim_mul_in_att=in_att)
    # A block that exists in the checkpoint but has no pool_k although the grammar gives it K/V
    # pooling was built by the old kernel = stride + 1 rule (stride 1 -> no pooling). Only a
    # stride-1 block can be one; elsewhere a missing pool_k is a checkpoint that does not fit,
    # which check_state_dict then reports (it loaded as another architecture, silently).
    no_kv = tuple(
        i
        for i, spec in enumerate(cfg.block_specs())
        if spec.pool_kv
        and spec.stride_kv == (1, 1, 1)
        and cfg.pool_mode == "conv"
        and f"blocks.{i}.attn.pool_k.weight" not in src
        and f"blocks.{i}.norm1.weight" in src
    )
    if no_kv:
        cfg = cfg.replace(no_kv_pool_blocks=tuple(sorted(set(cfg.no_kv_pool_blocks) | set(no_kv))))
    return cfg


def _channels_grow_in_attention(src: Mapping[str, torch.Tensor], cfg: MViTConfig) -> Optional[bool]:
    """Whether a checkpoint widens the stream in attention at each stage's first block
    (DIM_MUL_IN_ATT) or in the MLP of the block before it, from which blocks hold the shortcut
    projection (``blocks.i.proj``): facebookresearch/mvit's MViTv2-L is released both ways (IN-1K
    in the MLP, IN-21K in attention). None where the keys do not say (no widening block found)."""
    votes = set()
    for i, mul in cfg.dim_mul:
        if mul == 1.0 or not 0 < i < cfg.depth:
            continue
        at_stage, before = f"blocks.{i}.proj.weight" in src, f"blocks.{i - 1}.proj.weight" in src
        if at_stage != before:
            votes.add(at_stage)
    return votes.pop() if len(votes) == 1 else None


# --- timm ---------------------------------------------------------------------------------------

_TIMM_RULES = [
    # timm's transition blocks name the shortcut projection by where channels grow; here it is
    # ``proj`` either way (facebookresearch/mvit's name), and the config says where they grow.
    (r"^blocks\.(\d+)\.shortcut_proj_(?:attn|mlp)\.", r"blocks.\1.proj."),
    (r"^head\.fc\.", "head.projection."),
]


#: timm's block keys: stages.<stage>.blocks.<block in the stage>.<rest>
_TIMM_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$")


def _timm_stage_depths(state: Mapping[str, torch.Tensor]) -> list[int]:
    depths: dict[int, int] = {}
    for key in state:
        m = _TIMM_BLOCK.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    if sorted(depths) != list(range(len(depths))) or not depths:
        raise CheckpointMismatchError(
            f"not a timm MViTv2 state_dict: expected keys stages.<s>.blocks.<b>.*, found stages {sorted(depths)}"
        )
    return [depths[s] for s in range(len(depths))]


def convert_timm(state: Mapping[str, torch.Tensor], cfg: Optional[MViTConfig] = None) -> StateDict:
    """timm ``MultiScaleVit`` names and shapes -> this project's: blocks numbered across stages,
    then the facebookresearch/mvit rules (pooling norms, 2-D pooling convs)."""
    src = _unwrap(state)
    depths = _timm_stage_depths(src)
    first = [sum(depths[:s]) for s in range(len(depths))]
    flat: StateDict = {}
    for key, value in src.items():
        m = _TIMM_BLOCK.match(key)
        if m:
            key = f"blocks.{first[int(m.group(1))] + int(m.group(2))}.{m.group(3)}"
        flat[_rename(key, _TIMM_RULES)] = value
    return convert_pyslowfast(flat, cfg)


def timm_config(state: Mapping[str, torch.Tensor]) -> MViTConfig:
    """The architecture a timm MViTv2 state_dict holds: blocks per stage, width, heads, class
    token, where channels grow, classes, input size. A preset where the architecture is one (with
    its name and training settings), else a config named after its blocks per stage."""
    src = _unwrap(state)
    depths = _timm_stage_depths(src)

    def shape(key, ndim):
        if key not in src:
            raise CheckpointMismatchError(f"not a timm MViTv2 state_dict: no {key}")
        return _shape(src, key, ndim, "timm MViTv2")

    embed_dim = shape("patch_embed.proj.weight", 4)[0]
    head_dim = shape("stages.0.blocks.0.attn.pool_q.weight", 4)[0]
    if embed_dim % head_dim:
        raise CheckpointMismatchError(f"width {embed_dim} is not a multiple of the head dim {head_dim}")
    fields = dict(
        embed_dim=embed_dim,
        num_heads=embed_dim // head_dim,
        cls_embed="cls_token" in src,
        residual_pooling_cls="cls_token" in src,  # timm adds q to every row, as facebookresearch/mvit
        # Channels grow in attention at a stage's first block (shortcut_proj_attn), or in the MLP
        # at the previous stage's last block (shortcut_proj_mlp: MViTv2-L).
        dim_mul_in_att=not any(".shortcut_proj_mlp." in k for k in src),
        abs_pos="joint" if "pos_embed" in src else "none",
    )
    if "head.fc.weight" in src:
        fields["num_classes"] = shape("head.fc.weight", 2)[0]
    rel = src.get("stages.0.blocks.0.attn.rel_pos_h")
    if rel is not None:  # 2 * side - 1 rows at block 0 (queries unpooled there), side = size / 4
        side = (shape("stages.0.blocks.0.attn.rel_pos_h", 2)[0] + 1) // 2
        fields["input_size"] = (1, side * 4, side * 4)
    elif "pos_embed" in src:  # one row per token (and the class token's)
        side = _square_side(shape("pos_embed", 3)[1] - int(fields["cls_embed"]))
        fields["input_size"] = (1, side * 4, side * 4)
    fields["rel_pos_spatial"] = rel is not None
    cfg = mvitv2_image("mvitv2_image_" + "-".join(map(str, depths)), tuple(depths), **fields)
    return _as_preset(cfg, num_classes=cfg.num_classes, input_size=cfg.input_size)


def _square_side(n: int) -> int:
    side = int(round(n**0.5))
    if side * side != n:
        raise CheckpointMismatchError(f"a position table of {n} tokens is not a square grid")
    return side


def _as_preset(cfg: MViTConfig, **own) -> MViTConfig:
    """The preset whose architecture ``cfg`` is (under its name, with its training settings and
    the checkpoint's ``own`` fields), or ``cfg`` itself where none is. A preset of the same input
    size first (mvit_b_32x3 rather than mvit_b_16x4 at 32 frames)."""
    for same_size in (True, False):
        for preset in PRESETS.values():
            if same_size and preset.input_size != cfg.input_size:
                continue
            # the same architecture: training settings and what the data's clips are (their stride and
            # normalization: the preset's, the published weights') aside
            same = dict(name=cfg.name, drop_path_rate=cfg.drop_path_rate, head_dropout=cfg.head_dropout,
                        sampling_rate=cfg.sampling_rate, input_mean=cfg.input_mean, input_std=cfg.input_std)
            if preset.replace(**same, **own) == cfg:
                return preset.replace(**own)
    return cfg


# --- pytorchvideo ----------------------------------------------------------------------------------

_PTV_RULES = [
    (r"^patch_embed\.patch_model\.", "patch_embed.proj."),
    (r"^cls_positional_encoding\.", ""),
    (r"^norm_embed\.", "norm."),
    (r"^head\.proj\.", "head.projection."),
]


def convert_pytorchvideo(state: Mapping[str, torch.Tensor], cfg: Optional[MViTConfig] = None) -> StateDict:
    """pytorchvideo ``create_multiscale_vision_transformers`` names -> this project's, then the
    pySlowFast rules (separate q/k/v, norm_k). Separate position tables go into one joint table
    where ``cfg`` has one (its image MViT-B keeps them separate over its single frame)."""
    out = convert_pyslowfast({_rename(k, _PTV_RULES): v for k, v in _unwrap(state).items()}, cfg)
    separate = ("pos_embed_spatial", "pos_embed_temporal")
    if cfg is not None and cfg.abs_pos == "joint" and all(k in out for k in separate):
        spatial, temporal = out.pop("pos_embed_spatial"), out.pop("pos_embed_temporal")
        joint = spatial.repeat(1, temporal.shape[1], 1) + temporal.repeat_interleave(spatial.shape[1], dim=1)
        if "pos_embed_class" in out:
            joint = torch.cat([out.pop("pos_embed_class"), joint], dim=1)
        out["pos_embed"] = joint
    return out


#: pytorchvideo builds its pooling LayerNorms with torch's default eps (its other norms: 1e-6).
PYTORCHVIDEO_POOL_NORM_EPS = 1e-5


def pytorchvideo_config(state: Mapping[str, torch.Tensor]) -> MViTConfig:
    """The MViT-B a pytorchvideo state_dict holds (its model zoo has the 16x4 and 32x3 Kinetics
    models and the ImageNet one): video or image from the patch conv, input size from the position
    tables, classes from the head. pytorchvideo's pooling LayerNorms use eps 1e-5."""
    src = _unwrap(state)
    patch = src.get("patch_embed.patch_model.weight")
    if patch is None:
        raise CheckpointMismatchError("not a pytorchvideo MViT state_dict: no patch_embed.patch_model.weight")
    cfg = get_preset("mvit_b16_image" if patch.dim() == 4 else "mvit_b_16x4")
    own = dict(pool_norm_eps=PYTORCHVIDEO_POOL_NORM_EPS, cls_embed="cls_positional_encoding.cls_token" in src)
    if "head.proj.weight" in src:
        own["num_classes"] = _shape(src, "head.proj.weight", 2, "pytorchvideo MViT")[0]
    spatial, temporal = "cls_positional_encoding.pos_embed_spatial", "cls_positional_encoding.pos_embed_temporal"
    if spatial in src and temporal in src:
        side = _square_side(_shape(src, spatial, 3, "pytorchvideo MViT")[1]) * cfg.patch_stride[1]
        frames = 1 if cfg.patch_2d else _shape(src, temporal, 3, "pytorchvideo MViT")[1] * cfg.patch_stride[0]
        own["input_size"] = (frames, side, side)
    cfg = cfg.replace(**own)
    # Another frame count is another preset (mvit_b_32x3): its name and training settings.
    return _as_preset(cfg, **own)


# --- checking and loading ---------------------------------------------------------------------

def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one error listing every missing, unexpected, mis-shaped and mis-typed key (a value
    that is no tensor, one on the meta device, which holds no values, or an integer tensor where
    the model has floats: load_state_dict would have cast it silently)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = set(expected) & set(state)
    mistyped = sorted(
        f"{k}: {type(state[k]).__name__ if not isinstance(state[k], torch.Tensor) else 'meta tensor'}"
        for k in common
        if not isinstance(state[k], torch.Tensor) or state[k].is_meta
    )
    mistyped += sorted(
        f"{k}: checkpoint {state[k].dtype} vs model {expected[k].dtype}"
        for k in common
        if isinstance(state[k], torch.Tensor) and not state[k].is_meta
        and expected[k].is_floating_point() and not state[k].is_floating_point()
    )
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in common
        if isinstance(state[k], torch.Tensor) and tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or misshaped or mistyped:
        parts = [f"{source} checkpoint does not fit the model {getattr(model, 'cfg', None) and model.cfg.name}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped),
                             ("mis-typed keys", mistyped)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise CheckpointMismatchError("\n".join(parts))


def from_pretrained(
    path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    source: str = "mvit_kernels",
    preset: Union[str, MViTConfig, None] = None,
    fused: bool = False,
    **overrides,
) -> MViT:
    """Build an :class:`MViT` and load weights into it.

    source: "mvit_kernels" (this project's own checkpoints, e.g. from ``mvit train``),
    "torchvision" (``mvit_v1_b`` / ``mvit_v2_s``; the preset is inferred), "pyslowfast" or
    "mvit" (facebookresearch/mvit image models): these two need ``preset`` naming the
    architecture (e.g. "mvit_b_16x4", "mvitv2_s_image"); the class count and where channels grow
    are read from the weights, and for "mvit" whether there is a class token (its IN-21K models
    have one).
    "timm" (timm ``mvitv2_*``) and "pytorchvideo" (its MViT-B models): the architecture is read
    from the weights unless ``preset`` names it. A path ending in ``.safetensors`` is read with
    safetensors (timm's weights on the hub).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if preset is not None and not isinstance(preset, (str, MViTConfig)):
        raise TypeError(f"preset must be a preset name, an MViTConfig or None, got {preset!r}")
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        # a missing file, one that is no checkpoint, or a pickle of something else: errors naming it
        raw = load_checked(os.fspath(path_or_state_dict), "", required=())
    else:
        raw = path_or_state_dict
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a state_dict or a checkpoint dict, got {type(raw).__name__}")

    cfg: Optional[MViTConfig] = get_preset(preset) if isinstance(preset, str) else preset
    if source == "torchvision":
        cfg = cfg or torchvision_config(raw)
        state = convert_torchvision(raw)
    elif source in ("pyslowfast", "mvit"):
        if cfg is None:
            raise ValueError(f"source={source!r} needs preset=... naming the architecture of the checkpoint")
        cfg = pyslowfast_config(raw, cfg)
        if source == "mvit":
            # facebookresearch/mvit: a class token where the checkpoint has one (its IN-21K
            # models), which also takes the residual pooling connection there.
            has_cls = "cls_token" in _unwrap(raw)
            cfg = cfg.replace(cls_embed=has_cls, residual_pooling_cls=has_cls and cfg.residual_pooling)
        state = convert_pyslowfast(raw, cfg)
    elif source == "timm":
        inferred = timm_config(raw)
        if cfg is not None:  # timm's semantics whatever the preset: q added to the class row too
            cfg = cfg.replace(num_classes=inferred.num_classes, residual_pooling_cls=cfg.cls_embed and cfg.residual_pooling)
        cfg = cfg or inferred
        state = convert_timm(raw, cfg)
    elif source == "pytorchvideo":
        inferred = pytorchvideo_config(raw)
        if cfg is not None:
            cfg = cfg.replace(num_classes=inferred.num_classes, pool_norm_eps=inferred.pool_norm_eps)
        cfg = cfg or inferred
        state = convert_pytorchvideo(raw, cfg)
    else:
        # "model_config": the key `mvit train` writes its checkpoints with.
        stored = raw.get("config", raw.get("model_config"))
        if isinstance(stored, Mapping):
            stored = MViTConfig.from_dict(stored)
        cfg = cfg or (stored if isinstance(stored, MViTConfig) else None)
        if cfg is None:
            raise ValueError("this checkpoint stores no config: pass preset=...")
        state = _unwrap(raw)
    if overrides:
        cfg = cfg.replace(**overrides)
    model = MViT(cfg, fused=fused)
    check_state_dict(model, state, source)
    not_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if not_finite:  # a diverged run's checkpoint, or a corrupted download: the logits will be NaN
        warnings.warn(f"{source} checkpoint: {len(not_finite)} tensor(s) hold NaN or inf values: "
                      f"{', '.join(not_finite[:5])}{', ...' if len(not_finite) > 5 else ''}")
    model.load_state_dict(state)
    return model
