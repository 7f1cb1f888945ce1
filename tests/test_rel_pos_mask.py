"""The C++ CPU op ``mvit_kernels::rel_pos_mask`` (query rows of MViTv2's rel-pos bias as SDPA's
additive mask, straight from q and the gathered tables) against the reference bias
(``mvit_kernels.reference.decomposed_rel_pos``, zero-padded for the class token).

Tolerances, against the reference run in float64 on the same values, as a fraction of the mask's
largest magnitude (its entries are sums of dot products, so near-zero entries are cancellations
and a relative tolerance per entry would compare rounding with rounding):
- float64: 1e-13 (only the order of the sums differs);
- float32: 1e-6 (float32 sums of d products);
- bfloat16: 2^-8, float16: 2^-10 (float32 sums, one rounding at the store: half an ulp is
  2^-9 and 2^-11 of the value).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mvit_kernels import _extension, reference
from test_fused_model_cpu import _rel_case

pytestmark = pytest.mark.skipif(not _extension.load(), reason="needs the C++ extension")

TOLS = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}

# (thw_q, thw_kv, axes, has_cls): MViTv2-S's block-1 geometry scaled down (q finer than kv),
# q coarser than kv, spatial or temporal tables only, odd grids, with and without the class token.
CASES = [
    pytest.param((2, 4, 6), (2, 2, 3), "thw", True, id="q-finer-cls"),
    pytest.param((1, 3, 3), (2, 5, 5), "thw", False, id="q-coarser-nocls"),
    pytest.param((3, 5, 5), (1, 5, 5), "hw", False, id="spatial-only"),
    pytest.param((4, 2, 2), (2, 2, 2), "t", True, id="temporal-only"),
    pytest.param((3, 7, 5), (3, 4, 3), "thw", True, id="odd-grids"),
    # Float rows take the dot products in blocks of 8 keys: 2 + 2 + 2 blocks (the most it keeps in
    # registers), and 1 + 3 + 3, past that, where they fall back to one product at a time.
    pytest.param((2, 3, 3), (9, 9, 10), "thw", True, id="six-key-blocks"),
    pytest.param((1, 2, 3), (3, 20, 17), "thw", False, id="seven-key-blocks"),
]


def _inputs(thw_q, thw_kv, axes, has_cls, dtype, B=2, heads=3, d=24, seed=0):
    """q as the model's unpooled q (a strided view of a qkv-like tensor) and the axes' tables
    (``_rel_case``'s), interpolated to the grids' length in float64 before the cast (the op takes
    gathered tables: an interpolation in bf16 would round them before the op sees them, and the
    reference not)."""
    q, _, _, tables = _rel_case(thw_q, thw_kv, axes, has_cls, B, heads, d, seed)
    tables = [None if t is None else reference.interpolate_rel_pos(t, reference.rel_pos_table_length(a, b)).to(dtype)
              for t, a, b in zip(tables, thw_q, thw_kv)]
    return q.to(dtype), tables


def _want(q, thw_q, thw_kv, tables, has_cls):
    bias = reference.decomposed_rel_pos(q.double(), thw_q, thw_kv, *[None if t is None else t.double() for t in tables],
                                        has_cls)
    return F.pad(bias, (1, 0, 1, 0)) if has_cls else bias


def _mask(q, thw_q, thw_kv, tables, has_cls, rows):
    """The whole mask, written chunk by chunk of ``rows`` query rows into buffers of the chunk's shape."""
    gathered = reference.rel_pos_tables(thw_q, thw_kv, *tables)
    n_kv = (1 if has_cls else 0) + thw_kv[0] * thw_kv[1] * thw_kv[2]
    n_q = q.shape[2]
    chunks = []
    for r0 in range(0, n_q, rows):
        out = torch.full((*q.shape[:2], min(rows, n_q - r0), n_kv), float("nan"), dtype=q.dtype)
        torch.ops.mvit_kernels.rel_pos_mask(q, *gathered, list(thw_q), list(thw_kv), has_cls, r0, out)
        chunks.append(out)
    return torch.cat(chunks, dim=2)


@pytest.mark.parametrize("thw_q, thw_kv, axes, has_cls", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 5, None], ids=["rows1", "rows5", "whole"])
def test_matches_reference(thw_q, thw_kv, axes, has_cls, dtype, rows):
    q, tables = _inputs(thw_q, thw_kv, axes, has_cls, dtype)
    got = _mask(q, thw_q, thw_kv, tables, has_cls, rows or q.shape[2])
    want = _want(q, thw_q, thw_kv, tables, has_cls)
    torch.testing.assert_close(got.double(), want, atol=TOLS[dtype] * want.abs().max().item(), rtol=0)


def test_batch1_one_head_contiguous_q_and_mvit_head_dim():
    # MViT's head dim (96) and a contiguous q, batch 1, one head: the vectorized dot products'
    # blocks and tails.
    g = torch.Generator().manual_seed(1)
    thw_q, thw_kv = (2, 6, 6), (2, 3, 3)
    q = torch.randn(1, 1, 1 + 72, 96, generator=g)
    tables = [torch.randn(5, 96, generator=g), torch.randn(11, 96, generator=g), torch.randn(11, 96, generator=g)]
    got = _mask(q, thw_q, thw_kv, tables, True, 7)
    want = _want(q, thw_q, thw_kv, tables, True)
    torch.testing.assert_close(got.double(), want, atol=TOLS[torch.float32] * want.abs().max().item(), rtol=0)


def test_q_with_a_channel_stride():
    # q read through all four strides: here channels are not contiguous (a transposed view).
    g = torch.Generator().manual_seed(2)
    thw_q, thw_kv = (2, 3, 4), (1, 3, 2)
    q = torch.randn(2, 3, 16, 1 + 24, generator=g, dtype=torch.float64).transpose(2, 3)
    assert q.stride(3) != 1
    tables = [torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(5, 16, generator=g, dtype=torch.float64),
              torch.randn(7, 16, generator=g, dtype=torch.float64)]
    got = _mask(q, thw_q, thw_kv, tables, True, 4)
    want = _want(q, thw_q, thw_kv, tables, True)
    torch.testing.assert_close(got, want, atol=TOLS[torch.float64] * want.abs().max().item(), rtol=0)


def _args(thw_q=(2, 4, 6), thw_kv=(2, 2, 3), has_cls=True, rows=None, dtype=torch.float32):
    q, tables = _inputs(thw_q, thw_kv, "thw", has_cls, dtype)
    gathered = list(reference.rel_pos_tables(thw_q, thw_kv, *tables))
    n_kv = (1 if has_cls else 0) + thw_kv[0] * thw_kv[1] * thw_kv[2]
    out = torch.empty(*q.shape[:2], q.shape[2] if rows is None else rows, n_kv, dtype=dtype)
    return [q, *gathered, list(thw_q), list(thw_kv), has_cls, 0, out]


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(8, a[8][:, :, :, :-1].contiguous()), r"out must be \(2, 3, rows, 13\)"),
    (lambda a: a.__setitem__(8, a[8].double()), r"out must have q's dtype"),
    (lambda a: a.__setitem__(8, a[8].transpose(0, 1)), r"out must be contiguous|out must be \("),
    (lambda a: a.__setitem__(7, 1), r"rows \[1, 50\) outside the 49 query rows"),
    (lambda a: a.__setitem__(7, -1), r"outside the 49 query rows"),
    (lambda a: a.__setitem__(4, [2, 4, 5]), r"q has 49 tokens, thw_q \[2, 4, 5\] plus the class token asks for 41"),
    (lambda a: a.__setitem__(4, [2, 4]), r"thw_q must have 3 sizes"),
    (lambda a: a.__setitem__(5, [2, 0, 3]), r"thw_kv sizes must be >= 1"),
    # the product wrapped to 0 in int64, and a 1-column mask passed the shape check
    (lambda a: (a.__setitem__(5, [2**62, 2, 2]), a.__setitem__(1, None), a.__setitem__(8, a[8][..., :1].contiguous())),
     r"thw_kv must hold at most 2\^31 - 1 positions, got \[4611686018427387904, 2, 2\]"),
    (lambda a: a.__setitem__(2, a[2][:, :-1]), r"table_h must be the gathered table \(4, 2, 24\)"),
    (lambda a: a.__setitem__(3, None), r"table_h and table_w come together"),
    (lambda a: (a.__setitem__(1, None), a.__setitem__(2, None), a.__setitem__(3, None)), r"needs table_t or"),
    (lambda a: a.__setitem__(0, a[0][0]), r"q must be \(B, heads, N_q, d\)"),
    (lambda a: (a.__setitem__(0, a[0].long()), a.__setitem__(8, a[8].long())), r"q must be float32, float64"),
    # an integer table was cast and read (another floating dtype is: autocast leaves tables float32)
    (lambda a: a.__setitem__(1, a[1].long()), r"table_t must be float32, float64, bfloat16 or float16, got Long"),
])
def test_bad_arguments_are_named(change, match):
    args = _args()
    change(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mvit_kernels.rel_pos_mask(*args)


def test_empty_rows_write_nothing():
    args = _args(rows=0)
    torch.ops.mvit_kernels.rel_pos_mask(*args)  # a chunk of no rows: nothing to write, no error
    assert args[8].shape[2] == 0


def test_opcheck_and_flop_count():
    # The schema (out mutated in place), the fake implementation and the FLOP formula: the axes'
    # dot products, 2 d (kt + kh + kw) per grid row, as the reference's einsums count them.
    args = _args()
    torch.library.opcheck(torch.ops.mvit_kernels.rel_pos_mask.default, tuple(args))
    args[7], args[8] = 0, args[8][:, :, :10].contiguous()
    with FlopCounterMode(display=False) as counter:
        torch.ops.mvit_kernels.rel_pos_mask(*args)
    assert counter.get_total_flops() == 2 * 2 * 3 * 9 * 24 * (2 + 2 + 3)


def test_one_or_two_threads_write_the_same_mask():
    # Each row's sums do not depend on how the rows are split. That the op does split them over
    # torch's threads is checked by tests/test_pool3d.py::test_cpu_kernels_run_on_torch_threads,
    # and its portable (non-AVX2) build by test_cpu_default_isa_path_matches_reference there.
    args = _args(thw_q=(3, 7, 5), thw_kv=(3, 4, 3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.ops.mvit_kernels.rel_pos_mask(*args)
        one = args[8].clone()
        torch.set_num_threads(2)
        torch.ops.mvit_kernels.rel_pos_mask(*args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(args[8], one, atol=0, rtol=0)
