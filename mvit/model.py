"""The MViT / MViTv2 model.

One module per architectural piece, all driven by explicit :class:`~mvit.config.BlockSpec`s.
Pooling, attention and the skip path call ``mvit_kernels`` ops: the plain-PyTorch references
(``fused=False``, the ground truth) or the fused kernels (``fused=True``). Both take the same
parameters, so the state_dict never depends on ``fused``.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import mvit_kernels
from mvit_kernels import reference
from mvit_kernels._dispatch import in_functorch_transform
from mvit_kernels.checks import check_flag

from .config import BlockSpec, MViTConfig, Triple, check_q_grid_is_the_skips


def _ops(fused: bool) -> ModuleType:
    return mvit_kernels if fused else reference


# The module (its dispatch rule), not the function of the same name that mvit_kernels exports.
_pooled_projection = importlib.import_module("mvit_kernels.pooled_projection")


class Pool(nn.Module):
    """Pooling of one of q, k, v: owns the pooling window, the depthwise conv weight (mode
    "conv") and the LayerNorm that follows it. The class-token handling lives in the op."""

    def __init__(self, mode: str, head_dim: int, kernel: Triple, stride: Triple, padding: Triple, eps: float):
        super().__init__()
        self.mode = mode
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.eps = eps
        if mode == "conv":
            self.weight = nn.Parameter(torch.empty(head_dim, 1, *kernel))
            # nn.Conv3d's default initialization, as the reference repositories leave it.
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self.norm: Optional[nn.LayerNorm] = nn.LayerNorm(head_dim, eps=eps)
        else:
            self.register_parameter("weight", None)
            self.norm = None

    def params(self, dtype: torch.dtype) -> tuple:
        """(conv weight, norm weight, norm bias) in dtype; None where the mode has none. Under
        autocast the activations may be bf16 while the parameters stay fp32."""
        norm_w, norm_b = (self.norm.weight, self.norm.bias) if self.norm is not None else (None, None)
        return tuple(None if t is None else t.to(dtype) for t in (self.weight, norm_w, norm_b))

    def forward(self, x: torch.Tensor, thw: Triple, has_cls: bool, fused: bool):
        weight, norm_w, norm_b = self.params(x.dtype)
        return _ops(fused).pool3d(
            x, thw, self.kernel, self.stride, self.padding, self.mode, weight, has_cls, norm_w, norm_b, self.eps
        )

    def project(self, x: torch.Tensor, qkv: nn.Linear, which: str, num_heads: int, thw: Triple, has_cls: bool):
        """The fused path's projection + pooling of one of q/k/v straight from the block input
        (``mvit_kernels.pooled_projection``: only the tokens some window reads are projected)."""
        weight, norm_w, norm_b = self.params(x.dtype)
        return mvit_kernels.pooled_projection(
            x, qkv.weight, qkv.bias, which, num_heads, thw, self.kernel, self.stride, self.padding, self.mode,
            weight, has_cls, norm_w, norm_b, self.eps,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode}, kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


class MultiScaleAttention(nn.Module):
    """Multi-head pooling attention (MViT Sec. 3.1; MViTv2 rel-pos and residual pooling)."""

    def __init__(self, spec: BlockSpec, cfg: MViTConfig):
        super().__init__()
        self.num_heads = spec.num_heads
        self.head_dim = spec.head_dim
        self.attn_dim = spec.attn_dim
        self.has_cls = cfg.cls_embed
        self.residual_pooling = cfg.residual_pooling
        # The class token's row of the residual pooling connection (MViTConfig.residual_pooling_cls):
        # the ops leave it out (pySlowFast's rule), and it is added here where a config asks for it.
        self.residual_cls = cfg.residual_pooling and cfg.residual_pooling_cls and cfg.cls_embed
        self.qkv = nn.Linear(spec.dim_in, 3 * spec.attn_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(spec.attn_dim, spec.attn_dim)
        eps = cfg.norm_eps if cfg.pool_norm_eps is None else cfg.pool_norm_eps
        self.pool_q = (
            Pool(cfg.pool_mode, self.head_dim, spec.kernel_q, spec.stride_q, spec.padding_q, eps)
            if spec.pool_q
            else None
        )
        self.pool_k = self.pool_v = None
        if spec.pool_kv:
            self.pool_k = Pool(cfg.pool_mode, self.head_dim, spec.kernel_kv, spec.stride_kv, spec.padding_kv, eps)
            self.pool_v = Pool(cfg.pool_mode, self.head_dim, spec.kernel_kv, spec.stride_kv, spec.padding_kv, eps)
        spatial_len, temporal_len = cfg.rel_pos_lengths(spec)
        self.rel_pos_h = self.rel_pos_w = self.rel_pos_t = None
        if cfg.rel_pos_spatial:
            self.rel_pos_h = nn.Parameter(torch.zeros(spatial_len, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(spatial_len, self.head_dim))
        if cfg.rel_pos_temporal:
            self.rel_pos_t = nn.Parameter(torch.zeros(temporal_len, self.head_dim))
        if not cfg.rel_pos_zero_init:
            for table in (self.rel_pos_h, self.rel_pos_w, self.rel_pos_t):
                if table is not None:
                    nn.init.trunc_normal_(table, std=0.02)

    def _fuses_kv_projection(self, x: torch.Tensor, thw: Triple, fused: bool) -> bool:
        pool = self.pool_k
        return fused and pool is not None and _pooled_projection.saves_projection(
            x, self.qkv.weight, self.num_heads, thw, pool.kernel, pool.stride, pool.padding
        )

    def forward(self, x: torch.Tensor, thw: Triple, fused: bool, cls_only: bool = False) -> tuple[torch.Tensor, Triple]:
        """(output (B, N_q, attn_dim), pooled grid). ``cls_only``: the class token's row alone,
        (B, 1, attn_dim), from k and v of every token (see :meth:`MViT.forward_features`)."""
        B, N, _ = x.shape
        thw_q = thw_kv = thw
        if self._fuses_kv_projection(x, thw, fused):
            # K/V strides larger than the kernel (MViT-B's blocks 0-2: 1x8x8, 1x4x4): k and v are
            # projected only where a window reads (inside the pooling kernel on CUDA, from the
            # gathered tokens elsewhere); q as usual.
            A = self.attn_dim
            q = mvit_kernels.linear(x, self.qkv.weight[:A], None if self.qkv.bias is None else self.qkv.bias[:A])
            q = q.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            k, thw_kv = self.pool_k.project(x, self.qkv, "k", self.num_heads, thw, self.has_cls)
            v, _ = self.pool_v.project(x, self.qkv, "v", self.num_heads, thw, self.has_cls)
        else:
            qkv = _ops(fused).linear(x, self.qkv.weight, self.qkv.bias)
            qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if self.pool_k is not None:
                k, thw_kv = self.pool_k(k, thw, self.has_cls, fused)
                v, _ = self.pool_v(v, thw, self.has_cls, fused)
        if self.pool_q is not None:
            q, thw_q = self.pool_q(q, thw, self.has_cls, fused)
        if cls_only:
            # The class token's row takes no rel-pos bias, and the residual pooling connection only
            # where the config asks (reference.pooling_attention): plain attention of one query
            # over every key.
            if fused and not in_functorch_transform():
                out = F.scaled_dot_product_attention(q[:, :, :1], k, v)
            else:
                # The reference's own ops: SDPA's CPU kernel has no double backward, and the
                # reference path has every order (a gradient penalty, create_graph=True); so has
                # a torch.func transform, which torch.compile differentiates again when it traces.
                out = ((q[:, :, :1] * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
            if self.residual_cls:
                out = out + q[:, :, :1]
            out = out.transpose(1, 2).reshape(B, 1, self.attn_dim)
            # The rel-pos tables then take no part; they get the zero gradient the whole block gives
            # them instead of none, which DistributedDataParallel would refuse ("parameters that were
            # not used in producing loss"). An empty slice sums to 0 whatever the table holds.
            if torch.is_grad_enabled():
                for table in (self.rel_pos_t, self.rel_pos_h, self.rel_pos_w):
                    if table is not None and table.requires_grad:
                        out = out + table[:0].sum()
        else:
            tables = tuple(None if t is None else t.to(q.dtype) for t in (self.rel_pos_t, self.rel_pos_h, self.rel_pos_w))
            out = _ops(fused).pooling_attention(
                q, k, v, thw_q, thw_kv, self.has_cls, *tables, residual_pooling=self.residual_pooling
            )
            if self.residual_cls:
                cls = out[:, :1] + q[:, :, :1].transpose(1, 2).reshape(B, 1, self.attn_dim).to(out.dtype)
                out = torch.cat([cls, out[:, 1:]], dim=1)
        return _ops(fused).linear(out, self.proj.weight, self.proj.bias), thw_q


class Mlp(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        return _ops(fused).mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


def _drop_path_scale(x: torch.Tensor, rate: float, training: bool) -> Optional[torch.Tensor]:
    """Per-sample stochastic-depth factor (B,): 0 or 1/keep; None when it is always 1."""
    if not training or rate <= 0.0:
        return None
    keep = 1.0 - rate
    return torch.empty(x.shape[0], dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)


class MultiScaleBlock(nn.Module):
    """Pre-LN transformer block with pooled attention, pooled skip and channel expansion.

    v1: the MLP expands channels and its skip is Linear(norm2(x)).
    v2 (dim_mul_in_att): attention expands channels and its skip is Linear(norm1(x)), pooled.
    """

    def __init__(self, spec: BlockSpec, cfg: MViTConfig, index: int):
        super().__init__()
        self.spec = spec
        self.index = index  # for errors
        self.has_cls = cfg.cls_embed
        self.dim_mul_in_att = cfg.dim_mul_in_att
        self.drop_path = spec.drop_path
        self.norm1 = nn.LayerNorm(spec.dim_in, eps=cfg.norm_eps)
        self.attn = MultiScaleAttention(spec, cfg)
        self.norm2 = nn.LayerNorm(spec.attn_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(spec.attn_dim, int(spec.attn_dim * cfg.mlp_ratio), spec.dim_out)
        self.proj = nn.Linear(spec.dim_in, spec.dim_out) if spec.dim_in != spec.dim_out else None

    def forward(self, x: torch.Tensor, thw: Triple, fused: bool, cls_only: bool = False) -> tuple[torch.Tensor, Triple]:
        """(output (B, N', dim_out), pooled grid). ``cls_only``: the class token's output alone,
        (B, 1, dim_out), row 0 of the whole output (see :meth:`MViT.forward_features`)."""
        spec = self.spec
        if spec.pool_skip:
            # before any work: with cls_only the skip is never pooled, and the mismatch would pass
            check_q_grid_is_the_skips(self.index, thw, spec.kernel_q, spec.stride_q)
        x_norm = self.norm1(x)
        x_attn, thw_new = self.attn(x_norm, thw, fused, cls_only)
        if cls_only:
            # Every op after the attention acts per token, and the skip pooling passes the class
            # token through: its skip is itself.
            x, x_norm = x[:, :1], x_norm[:, :1]
        if self.dim_mul_in_att and self.proj is not None:
            x = _ops(fused).linear(x_norm, self.proj.weight, self.proj.bias)
        x_attn = x_attn.to(x.dtype)  # autocast may leave the stream and the branch apart
        scale = _drop_path_scale(x, self.drop_path, self.training)
        if spec.pool_skip and not cls_only:
            # The skip is max-pooled onto the query grid and the branch added in one op.
            x = _ops(fused).pool_residual_add(
                x, thw, spec.kernel_skip, spec.stride_q, spec.padding_skip, x_attn, scale, self.has_cls
            )
        else:
            x = x + (x_attn if scale is None else x_attn * scale.view(-1, 1, 1))
        x_norm = self.norm2(x)
        x_mlp = self.mlp(x_norm, fused)
        if not self.dim_mul_in_att and self.proj is not None:
            x = _ops(fused).linear(x_norm, self.proj.weight, self.proj.bias)
        scale = _drop_path_scale(x, self.drop_path, self.training)
        if scale is not None:
            x_mlp = x_mlp * scale.view(-1, 1, 1)
        return x + x_mlp, thw_new


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MViTConfig):
        super().__init__()
        self.is_2d = cfg.patch_2d
        if self.is_2d:
            self.proj: nn.Module = nn.Conv2d(
                cfg.in_chans, cfg.embed_dim, cfg.patch_kernel[1:], cfg.patch_stride[1:], cfg.patch_padding[1:]
            )
        else:
            self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Triple]:
        if self.is_2d:
            x = self.proj(x)
            thw = (1, x.shape[2], x.shape[3])
        else:
            x = self.proj(x)
            thw = (x.shape[2], x.shape[3], x.shape[4])
        return x.flatten(2).transpose(1, 2), thw  # type: ignore[return-value]


def _resize_grid(table: torch.Tensor, src: Triple, dst: Triple, mode: str) -> torch.Tensor:
    """(1, prod(src), C) position table resized to (1, prod(dst), C)."""
    if tuple(src) == tuple(dst):
        return table
    C = table.shape[-1]
    grid = table.reshape(1, *src, C).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid, size=dst, mode=mode)
    return grid.permute(0, 2, 3, 4, 1).reshape(1, -1, C)


def _strided_as_param(grad: torch.Tensor) -> Optional[torch.Tensor]:
    """A gradient hook: the gradient in the usual strides of its shape, those of the parameters.
    Autograd keeps a gradient whose strides differ from its parameter's only in size-1
    dimensions, and DDP then copies it every step and warns ("Grad strides do not match bucket
    view strides"): the class token's and its position entry's came back as slices of larger
    gradients (at batch 1, or always), a conv pooling weight's (d, 1, 3, 3, 3) in the
    channels-last grid's strides, (27, 1, 9, 3, 1), eager or compiled."""
    strides, step = [], 1
    for size in reversed(grad.shape):
        strides.append(step)
        step *= max(size, 1)
    if grad.stride() == tuple(reversed(strides)):
        return None
    return grad.clone(memory_format=torch.contiguous_format)


def _rehook_after_load(model: "MViT", incompatible_keys) -> None:
    """A load_state_dict post-hook: assign=True replaces the parameters, and their hooks with them."""
    model._keep_gradients_strided_as_parameters()


class MViT(nn.Module):
    """Multiscale Vision Transformer (v1 and v2), video or image.

    Input: (B, C, T, H, W) for video presets, (B, C, H, W) (or T = 1) for image presets. Inputs
    at another size than the preset's are accepted: absolute position embeddings are
    interpolated (trilinear, as pySlowFast) and rel-pos tables are interpolated per block.
    """

    def __init__(self, cfg: MViTConfig, fused: bool = False, checkpoint_activations: bool = False):
        super().__init__()
        if not isinstance(cfg, MViTConfig):
            raise TypeError(f"cfg must be an MViTConfig, got {type(cfg).__name__}")
        check_flag(checkpoint_activations, "checkpoint_activations")
        self.cfg = cfg
        self.specs = cfg.block_specs()
        self.fused = False
        self.checkpoint_activations = checkpoint_activations
        self.patch_embed = PatchEmbed(cfg)
        self.grid = cfg.patch_grid
        C = cfg.embed_dim
        t, h, w = self.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C)) if cfg.cls_embed else None
        self.pos_embed_spatial = self.pos_embed_temporal = self.pos_embed_class = self.pos_embed = None
        if cfg.abs_pos == "separate":
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, C))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, C))
            if cfg.cls_embed:
                self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, C))
        elif cfg.abs_pos == "joint":
            self.pos_embed = nn.Parameter(torch.zeros(1, t * h * w + int(cfg.cls_embed), C))
        self.blocks = nn.ModuleList(MultiScaleBlock(spec, cfg, i) for i, spec in enumerate(self.specs))
        dim = self.specs[-1].dim_out
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.head = ClassificationHead(dim, cfg.num_classes, cfg.head_dropout)
        self._init_weights()
        self._keep_gradients_strided_as_parameters()
        self.set_fused(fused)

    def _keep_gradients_strided_as_parameters(self) -> None:
        # Hooks belong to parameter objects, so this runs again wherever parameters can be
        # replaced: _apply (to_empty from the meta device), load_state_dict(assign=True), copy and
        # pickle. It hooks only where the hook is missing, so calling it again adds nothing.
        if _rehook_after_load not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_rehook_after_load)
        for p in self.parameters():
            # only in a size-1 dimension can a gradient's strides differ unseen (_strided_as_param)
            if 1 in p.shape and _strided_as_param not in (p._backward_hooks or {}).values():
                p.register_hook(_strided_as_param)

    def __setstate__(self, state) -> None:
        # copy.deepcopy and pickle make new parameters, without hooks
        super().__setstate__(state)
        self._keep_gradients_strided_as_parameters()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._keep_gradients_strided_as_parameters()
        return self

    def _init_weights(self) -> None:
        # As the reference repositories (facebookresearch/mvit, torchvision): truncated-normal
        # Linear weights with zero bias, unit LayerNorms, truncated-normal embeddings; convs keep
        # PyTorch's default initialization.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.pos_embed, self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def set_fused(self, fused: bool) -> "MViT":
        """Switch between the fused kernels and the reference ops; parameters are untouched."""
        check_flag(fused, "fused")
        if fused:
            mvit_kernels.require_fused()
        self.fused = bool(fused)
        return self

    def no_weight_decay(self) -> set[str]:
        """Position tables and class token: what pySlowFast's MVIT.ZERO_DECAY_POS_CLS exempts from
        weight decay (besides 1-D parameters); the papers' configs turn that option off."""
        names = {"cls_token", "pos_embed", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"}
        return {n for n, _ in self.named_parameters() if n.split(".")[-1] in names or "rel_pos" in n}

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(x).__name__}")
        if cfg.patch_2d:
            if x.dim() == 5 and x.shape[2] == 1:
                x = x.squeeze(2)
            if x.dim() != 4:
                raise ValueError(f"{cfg.name} is an image model: input must be (B, C, H, W), got {tuple(x.shape)}")
        elif x.dim() != 5:
            raise ValueError(f"{cfg.name} is a video model: input must be (B, C, T, H, W), got {tuple(x.shape)}")
        if x.shape[1] != cfg.in_chans:
            raise ValueError(f"input must have {cfg.in_chans} channels in dim 1, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("input batch is empty")
        size = (1, *x.shape[2:]) if cfg.patch_2d else tuple(x.shape[2:])
        if any(g < 1 for g in cfg.grid_for(size)):
            raise ValueError(f"input of {'(H, W)' if cfg.patch_2d else '(T, H, W)'} = {tuple(x.shape[2:])} is smaller "
                             f"than the patch embedding's kernel {cfg.patch_kernel} (padding {cfg.patch_padding})")
        if not x.is_floating_point():
            raise TypeError(
                f"input must be a floating-point tensor (normalized pixels), got {x.dtype}; "
                "convert and normalize first, e.g. (x.float() / 255 - mean) / std"
            )
        weight = self.patch_embed.proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input has dtype {x.dtype} but the model's parameters are {weight.dtype}; "
                f"cast one to the other (x.to({weight.dtype}) or model.to({x.dtype})) or run under torch.autocast"
            )
        if x.device != weight.device:
            raise ValueError(f"input is on {x.device} but the model is on {weight.device}")
        return x

    def _position_embedding(self, thw: Triple) -> Optional[torch.Tensor]:
        if self.pos_embed_spatial is not None:
            t, h, w = self.grid
            spatial = _resize_grid(self.pos_embed_spatial, (1, h, w), (1, thw[1], thw[2]), "trilinear")
            temporal = _resize_grid(self.pos_embed_temporal, (t, 1, 1), (thw[0], 1, 1), "trilinear")
            # Trilinear resizing of the summed table equals resizing each factor: it is linear
            # and its weights sum to one along every axis.
            pos = (temporal[:, :, None, :] + spatial[:, None, :, :]).reshape(1, -1, spatial.shape[-1])
            if self.pos_embed_class is not None:
                pos = torch.cat((self.pos_embed_class, pos), dim=1)
            return pos
        if self.pos_embed is not None:
            s = int(self.cfg.cls_embed)
            pos = _resize_grid(self.pos_embed[:, s:], self.grid, thw, "trilinear")
            return torch.cat((self.pos_embed[:, :s], pos), dim=1)
        return None

    def forward_features(self, x: torch.Tensor, cls_only: bool = False) -> tuple[torch.Tensor, Triple]:
        """Tokens after the last block (before the final norm) and their grid.

        ``cls_only``: only the class token after the last block, (B, 1, C), which is all the
        classifier reads; the last block then computes nothing else (its attention for one
        query, its projection, skip and MLP for one token), the same values as row 0 of the
        whole output. :meth:`forward` asks for it on the fused path: the other tokens of the last
        block take 2.32 of the 69.11 GFLOPs the fused MViT-B 16x4 would otherwise execute a clip
        (MViTv2-S 16x4: 2.32 of 63.17)."""
        cls_only = check_flag(cls_only, "cls_only")  # "no" would be read as True
        if cls_only and not self.cfg.cls_embed:
            raise ValueError(f"cls_only needs a class token; {self.cfg.name} has none (cls_embed=False)")
        x = self._check_input(x)
        x, thw = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        pos = self._position_embedding(thw)
        if pos is not None:
            x = x + pos.to(x.dtype)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            only = cls_only and i == last
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x, thw = torch.utils.checkpoint.checkpoint(block, x, thw, self.fused, only, use_reentrant=False)
            else:
                x, thw = block(x, thw, self.fused, only)
        return x, thw

    def forward(self, x: torch.Tensor, cls_only: Optional[bool] = None) -> torch.Tensor:
        """Logits. ``cls_only`` (models with a class token): whether the last block computes the
        class token alone, all the head reads (:meth:`forward_features`). None: on the fused path
        only, so that the reference path stays the whole computation."""
        if cls_only is None:
            cls_only = self.fused and self.cfg.head_pool == "cls"
        x, _ = self.forward_features(x, cls_only=cls_only)
        x = self.norm(x)
        x = x[:, 0] if self.cfg.head_pool == "cls" else x.mean(1)
        return self.head(x)


class ClassificationHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.dropout(x))


def build_model(
    preset: str | MViTConfig,
    *,
    fused: bool = False,
    checkpoint_activations: bool = False,
    **overrides,
) -> MViT:
    """Build a preset by name (or a config), with optional config field overrides,
    e.g. ``build_model("mvit_b_16x4", num_classes=10, input_size=(16, 256, 256))``."""
    from .presets import get_preset

    if not isinstance(preset, (str, MViTConfig)):
        raise TypeError(f"preset must be a preset name or an MViTConfig, got {preset!r}")
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    if overrides:
        cfg = cfg.replace(**overrides)
    return MViT(cfg, fused=fused, checkpoint_activations=checkpoint_activations)
