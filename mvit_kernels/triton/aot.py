"""Ahead-of-time compilation of every Triton kernel config the dispatchers can pick (pooling
attention and the pooled projection), for each tile rule's target (sm_80, sm_86, sm_90), without
a GPU; reads registers / spills / shared memory from the cubin with the cuobjdump that ships in
the Triton wheel.

Runs with the interpreter off (``TRITON_INTERPRET=0``; under the interpreter ``@triton.jit``
functions cannot be compiled), so callers in an interpreter process use a subprocess:
``python -m mvit_kernels.triton.aot [--json PATH]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile

from .pooling_attention import RULES

#: One target per tile rule (sm_80, sm_86, sm_90), each with its rule's shared memory limit
#: (opt-in maximum per block, bytes).
SMEM_LIMIT = RULES
TARGETS = tuple(sorted(RULES))
#: STACK is the per-thread stack frame, where ptxas puts spilled registers (cuobjdump's LOCAL
#: counts explicit local arrays, which these kernels have none of, so it is checked too). Up to
#: 16 bytes (four 32-bit values, touched outside the inner loop in the configs that show it,
#: sm_80 at the register ceiling) costs nothing measurable; the configs that spilled more (184 to
#: 1,240 bytes before their tiles were narrowed) are exactly what this bound catches.
STACK_LIMIT = 16

#: The configs with no tile free of stack use under every Triton release the project supports,
#: and the stack they may use, by (kernel, mode, dtype, dot, d_pad, target, constant head dim):
#: IEEE fp32 (TF32 off, an accuracy mode) conv at head 128 on sm_80 puts 32 B there under Triton
#: 3.6 with the one tile clean under 3.8; every other tile tried spilled 100-800 B under one of
#: them. At MViTv2-L's head 72 the same config takes 56 B under 3.8 (one to three stages, 4 or 8
#: warps: 56-488 B).
STACK_EXCEPTIONS = {("proj_bwd", "conv", "float32", "ieee", 128, "sm_80", None): 32,
                    ("proj_bwd", "conv", "float32", "ieee", 128, "sm_80", 72): 56}
#: The head dims that are no multiple of 16 (compiled in as HEAD_DIM, pooling_attention.
#: head_dim_constexpr) which the AOT check compiles: MViTv2-L's, at its padded tile, with no
#: stride known to be a multiple of 16 (the worst case of its layouts).
UNALIGNED_HEAD_DIMS = {72: 128}

_TL_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# Argument kinds per kernel: "p:<dtype>" pointer, "i" int32, "f" fp32, "c" constexpr.
_SIGS = {
    "fwd": [
        ("Q", "*q"), ("K", "*q"), ("V", "*q"), ("R", "*fp32"), ("IDX_T", "*i32"), ("IDX_H", "*i32"),
        ("IDX_W", "*i32"), ("Out", "*q"), ("Lse", "*fp32"), ("Rel", "*fp32"), ("OAttn", "*q"),
    ],
    "bwd_delta": [("DO", "*q"), ("OA", "*q"), ("Delta", "*fp32")],
    "bwd_dkdv": [
        ("Q", "*q"), ("K", "*q"), ("V", "*q"), ("DO", "*q"), ("Lse", "*fp32"), ("Delta", "*fp32"),
        ("Rel", "*fp32"), ("DK", "*q"), ("DV", "*q"),
    ],
    "bwd_dq": [
        ("Q", "*q"), ("K", "*q"), ("V", "*q"), ("DO", "*q"), ("Lse", "*fp32"), ("Delta", "*fp32"),
        ("Rel", "*fp32"), ("R", "*fp32"), ("IDX_T", "*i32"), ("IDX_H", "*i32"), ("IDX_W", "*i32"),
        ("DQ", "*q"), ("DRel", "*fp32"),
    ],
    "proj": [
        ("X", "*q"), ("W", "*q"), ("Bias", "*q"), ("PW", "*q"), ("NW", "*q"), ("NB", "*q"), ("Y", "*q"),
    ],
    "proj_bwd": [
        ("X", "*q"), ("W", "*q"), ("Bias", "*q"), ("PW", "*q"), ("NW", "*q"), ("DY", "*q"), ("DX", "*fp32"),
        ("DW", "*fp32"), ("DBias", "*fp32"), ("DPW", "*fp32"), ("DNW", "*fp32"), ("DNB", "*fp32"),
    ],
}
#: fp32 scalar arguments (every other non-pointer, non-constexpr argument is int32).
_FLOAT_ARGS = ("sm_scale", "inv_count", "eps")
#: int arguments the launchers pass as multiples of 16 at every MViT shape (the padded head dim's
#: source D = 96 / 64, the channels C = 96 * 2^k, the qkv weight's row offset W_ROW0 of k or v, a
#: multiple of heads * head dim), which Triton specializes as divisible by 16 like the strides.
#: That changes register allocation: the projection's backward spilled 488-536 B per thread with C
#: and W_ROW0 marked, and nothing without.
_ALIGNED_INTS = ("D", "C", "W_ROW0")
_STRIDES = ["stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
            "stride_vb", "stride_vh", "stride_vn"]


def _kernel(name):
    from . import pooled_projection as p
    from . import pooling_attention as k

    return {
        "proj": p.pooled_projection_fwd_kernel,
        "proj_bwd": p.pooled_projection_bwd_kernel,
        "fwd": k.pooling_attention_fwd_kernel,
        "bwd_delta": k.pooling_attention_bwd_delta_kernel,
        "bwd_dkdv": k.pooling_attention_bwd_dkdv_kernel,
        "bwd_dq": k.pooling_attention_bwd_dq_kernel,
    }[name]


def all_configs(kernels=None):
    """Every (kernel, dtype, d_pad) the dispatcher can launch, with the config select_config
    gives it, compiled with every feature on and, for the kernels with a rel tile, at every
    R_PAD select_r_pad can pick (the widest is not the worst case: at R_PAD 16 and 32 the dq
    kernel spilled up to 1,920 B where 64 spilled nothing). ``kernels``: only these."""
    import torch

    from . import pooling_attention as k

    out = []
    for kernel in k.KERNELS:
        for dtype in k.DTYPES:
            for d_pad in k.D_PADS:
                # fp32 runs its dots as tf32 or, with torch's TF32 switch off, IEEE fp32.
                for precision in ("tf32", "ieee") if dtype == torch.float32 else ("tf32",):
                    # dk/dv split over queries writes fp32 partials: another pointer type for
                    # half-precision inputs (fp32 inputs write fp32 either way).
                    partials = (False, True) if kernel == "bwd_dkdv" and dtype != torch.float32 else (False,)
                    for partial in partials:
                        for cc in TARGETS:
                            cfg = k.select_config(kernel, dtype, d_pad, cc, precision)
                            # every rel tile width select_r_pad can pick for this dtype and target
                            r_pads = sorted({k.select_r_pad(r, dtype, cc) for r in k.R_PADS})
                            for r_pad in r_pads if "R_PAD" in _kernel(kernel).arg_names else (None,):
                                out.append(dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""), d_pad=d_pad,
                                                precision=precision, partials=partial, r_pad=r_pad, cc=cc, **vars(cfg)))
    out += projection_configs()
    out += unaligned_configs(out)
    return [e for e in out if kernels is None or e["kernel"] in kernels]


def unaligned_configs(aligned: list) -> list:
    """The configs of ``aligned`` at each UNALIGNED_HEAD_DIMS padded tile again, for that head dim
    as a constant, with the tiles select_config gives a head dim that is no multiple of 16."""
    import torch

    from . import pooled_projection as p
    from . import pooling_attention as k

    out = []
    for head_dim, d_pad in UNALIGNED_HEAD_DIMS.items():
        for e in aligned:
            if e["d_pad"] != d_pad:
                continue
            dtype = getattr(torch, e["dtype"])
            if e["kernel"] in k.KERNELS:
                cfg = vars(k.select_config(e["kernel"], dtype, d_pad, e["cc"], e["precision"], aligned=False))
            elif e["kernel"] == "proj_bwd":
                cfg = vars(p.select_bwd_config(dtype, d_pad, e["cc"], e["precision"], e["mode"], aligned=False))
            else:  # the projection forward's tiles do not depend on it
                cfg = {f: e[f] for f in ("block_m", "block_k", "num_warps", "num_stages")}
            out.append(dict(e, head_dim=head_dim, **cfg))
    return out


def projection_configs():
    """Every (dtype, d_pad, dot precision, pooling mode) the pooled-projection launcher can pick
    (the mode is a constexpr: three kernels each), with select_config's tiles; compiled with the
    class token, bias and LayerNorm on."""
    import torch

    from . import pooled_projection as p

    out = []
    for dtype in p.DTYPES:
        for d_pad in p.D_PADS:
            for precision in ("tf32", "ieee") if dtype == torch.float32 else ("tf32",):
                for mode in p.MODES:
                    for cc in TARGETS:
                        cfg = p.select_config(dtype, d_pad, cc, precision)
                        out.append(dict(kernel="proj", dtype=str(dtype).replace("torch.", ""), d_pad=d_pad,
                                        precision=precision, partials=False, mode=mode, cc=cc, **vars(cfg)))
                        cfg = p.select_bwd_config(dtype, d_pad, cc, precision, mode)
                        out.append(dict(kernel="proj_bwd", dtype=str(dtype).replace("torch.", ""), d_pad=d_pad,
                                        precision=precision, partials=False, mode=mode, cc=cc, **vars(cfg)))
    return out


def compile_one(entry: dict, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _kernel(entry["kernel"])
    q = _TL_DTYPE[entry["dtype"]]
    signature, attrs = {}, {}
    for name, ty in _SIGS[entry["kernel"]]:
        signature[name] = ty.replace("*q", "*" + q)
    if entry.get("partials"):
        signature["DK"] = signature["DV"] = "*fp32"
    for param in fn.params:
        if param.name in signature:
            continue
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in _FLOAT_ARGS:
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
    # What the launcher specializes at MViT shapes: 16-byte aligned pointers, strides and
    # _ALIGNED_INTS multiples of 16; with a constant head dim that is none, neither D nor any stride.
    head_dim = entry.get("head_dim")
    for i, name in enumerate(fn.arg_names):
        unaligned = head_dim is not None and (name == "D" or name.startswith("stride"))
        if signature[name].startswith("*") or (not unaligned and (name.startswith("stride") or name in _ALIGNED_INTS)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = dict(
        HAS_CLS=True, HAS_REL=True, HAS_T=True, HAS_HW=True, RESIDUAL=True, STORE_REL=True, STORE_OATTN=True,
        BLOCK_M=entry["block_m"], BLOCK_N=entry.get("block_n"), D_PAD=entry["d_pad"], R_PAD=entry.get("r_pad"),
        DOT_PRECISION=entry["precision"], MODE=entry.get("mode"), HAS_BIAS=True, HAS_NORM=True,
        BLOCK_K=entry.get("block_k"), HEAD_DIM=head_dim or 0,
    )
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", cc, 32),
        options=dict(num_warps=entry["num_warps"], num_stages=entry["num_stages"]),
    )
    usage = resource_usage(compiled.asm["cubin"])
    entry = {k: v for k, v in entry.items() if k != "cc"}
    return dict(entry, target=f"sm_{cc}", shared_triton=compiled.metadata.shared, **usage)


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL|CONSTANT\[\d+\]|TEXTURE|SURFACE|SAMPLER):(\d+)", text))
    return dict(reg=int(fields["REG"]), stack=int(fields["STACK"]), shared=int(fields["SHARED"]), local=int(fields["LOCAL"]))


def _job(args):
    entry, cc = args
    return compile_one(entry, cc)


def compile_all(workers: int = 2, kernels=None) -> list[dict]:
    jobs = [(e, e["cc"]) for e in all_configs(kernels)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_job, jobs))


def check(row: dict) -> list[str]:
    """Problems with one compiled config (empty when it is fine)."""
    cc = int(row["target"].split("_")[1])
    smem = max(row["shared"], row["shared_triton"])
    problems = []
    if row["local"] > 0:
        problems.append(f"spills: LOCAL={row['local']}")
    limit = STACK_EXCEPTIONS.get((row["kernel"], row.get("mode"), row["dtype"], row["precision"], row["d_pad"],
                                  row["target"], row.get("head_dim")), STACK_LIMIT)
    if row["stack"] > limit:
        problems.append(f"STACK={row['stack']} > {limit}")
    if smem > SMEM_LIMIT[cc]:
        problems.append(f"shared {smem} B > {SMEM_LIMIT[cc]} B")
    return problems


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Triton kernels (pooling attention, pooled projection): AOT resource usage",
        "",
        "Every config `select_config` can pick, compiled without a GPU (`python -m mvit_kernels.triton.aot`),",
        "all features on, at every rel tile width R_PAD, with the channels and head dims of MViT (multiples",
        "of 16) specialized as the launchers do; and at d_pad 128 again for head 72 (MViTv2-L; column",
        "`head`), compiled in as a constant with no stride a multiple of 16. REG/STACK/LOCAL/SHARED from `cuobjdump",
        "--dump-resource-usage`; shared is the larger of cuobjdump's static figure and Triton's dynamic",
        f"`metadata.shared`. Limits: LOCAL 0, STACK <= {STACK_LIMIT} B (but STACK_EXCEPTIONS), shared <= "
        + " / ".join(f"{SMEM_LIMIT[cc] // 1024} KB (sm_{cc})" for cc in TARGETS) + ".",
        "",
        "| kernel | dtype | dot | partials | d_pad | head | R_PAD | BLOCK_M | BLOCK_N | warps | stages | target | REG | STACK | LOCAL | shared (B) | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kernel"] in ("proj", "proj_bwd"):
            continue
        smem = max(r["shared"], r["shared_triton"])
        ok = "; ".join(check(r)) or "yes"
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['precision']} | {'yes' if r['partials'] else ''} | {r['d_pad']} | {r.get('head_dim') or ''} | {r.get('r_pad') or ''} | {r['block_m']} | {r['block_n']} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['target']} | {r['reg']} | {r['stack']} | {r['local']} | {smem} | {ok} |"
        )
    for kernel, name in (("proj", "pooled_projection_fwd_kernel"), ("proj_bwd", "pooled_projection_bwd_kernel")):
        proj = [r for r in rows if r["kernel"] == kernel]
        if not proj:
            continue
        lines += [
            "",
            f"## Pooled projection (`{name}`): class token, bias and LayerNorm on",
            "",
            "| mode | dtype | dot | d_pad | head | BLOCK_M | BLOCK_K | warps | stages | target | REG | STACK | LOCAL | shared (B) | ok |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in proj:
            smem = max(r["shared"], r["shared_triton"])
            ok = "; ".join(check(r)) or "yes"
            lines.append(
                f"| {r['mode']} | {r['dtype']} | {r['precision']} | {r['d_pad']} | {r.get('head_dim') or ''} | "
                f"{r['block_m']} | {r['block_k']} | "
                f"{r['num_warps']} | {r['num_stages']} | {r['target']} | {r['reg']} | {r['stack']} | {r['local']} | {smem} | {ok} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--markdown", help="write the Markdown table here")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kernels", nargs="+", choices=sorted(_SIGS), default=None,
                        help="compile only these kernels (when re-tuning one rule)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run with TRITON_INTERPRET unset or 0 (the interpreter cannot compile)", file=sys.stderr)
        return 2
    rows = compile_all(args.workers, args.kernels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))
    print(markdown(rows))
    return 1 if any(check(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
