"""Inference and training throughput, step time and peak memory of every variant, side by side.

    python bench/throughput.py --models mvit_b_16x4 --batch-sizes 1 --modes infer   # CPU target
    python bench/throughput.py                                                     # GPU: all

Variants (same weights everywhere; torchvision's through the converter):
  ours-fused, ours-ref        this project with fused=True / fused=False
  ours-ref-sdpa               the reference path with SDPA in place of its matmul attention
  torchvision                 torchvision mvit_v1_b / mvit_v2_s (eager)
  pytorchvideo                pytorchvideo mvit_base_16x4 / mvit_base_16 (eager), where installed:
                              MViT-B 16x4 and the image MViT-B, the latter's only peer; its own
                              random weights (the time of these ops does not depend on the values)
  each of the above "+compile": torch.compile of the same module
  ours-fused / torchvision "+compile-cudagraphs" (CUDA, only when named in --variants):
                              torch.compile(mode="reduce-overhead"), which replays CUDA graphs and
                              so takes the host's per-op launch cost out of the step
  ours-fused-timeonly         (only when named) fused=True with per-shape tuning deciding by
                              time alone (MVIT_KERNELS_AUTOTUNE_MEMORY=any): beside ours-fused, what
                              the default memory policy costs a training step and saves in memory
Timing: warm-up excluded, the median of --repeats timed runs, spread (min-max) printed. GPU runs
use bf16 autocast; CPU runs float32 with --threads threads. On CPU the variants of a
model/mode/batch are timed in turns, one step each, round and round (measure_interleaved;
--sequential times each variant's runs together, as on GPU). Ratios are against torchvision eager
and against the best peer (the fastest variant that is not ours) measured in the same run; timed in
turns, each of our variants also gets its per-round speedups over both (the peer's step over ours
within one round, median and quartiles over the rounds), which a drift of the machine's speed
between rounds does not move (:func:`paired_ratios`).
Writes bench/results/throughput_<device>.md/.json and a PNG of throughput against batch size,
with the per-shape choices ours-fused made (``mvit_kernels.tuning``: on CUDA each fused op is
timed against its alternative on first use, inside the warm-up; compiled graphs keep the fused
ops).

On CPU each row also gets its arithmetic floor: the multiply-adds the variant executes
(``mvit.flops.count_model``: the fused model's own count for ours-fused, the reference's for
the others; a training step counted as 3 forwards) at the fastest float32 matrix-product rate
this machine reaches with the same threads, measured at the start of the run
(:func:`cpu_matmul_rate`). MViT on a CPU is bound by its matrix products, so the floor says
how far each variant is from the hardware and, against torchvision's step, the largest speedup
over torchvision any implementation of the same arithmetic could show on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mvit_kernels  # noqa: E402
from mvit import build_model  # noqa: E402
from mvit_kernels.pooling_attention import _sdpa_pooling_attention  # noqa: E402
from mvit_kernels import reference, tuning  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TORCHVISION = {"mvit_b_16x4": "mvit_v1_b", "mvitv2_s_16x4": "mvit_v2_s"}
PYTORCHVIDEO = {"mvit_b_16x4": "mvit_base_16x4", "mvit_b16_image": "mvit_base_16"}
#: label suffix -> torch.compile mode (None: eager).
COMPILE_MODES = {"": None, "+compile": "default", "+compile-cudagraphs": "reduce-overhead"}


def _sdpa_reference_attention(q, k, v, thw_q, thw_kv, has_cls=True, rel_pos_t=None, rel_pos_h=None, rel_pos_w=None,
                              residual_pooling=False):
    """The reference's pooling attention in the SDPA formulation (same math)."""
    return _sdpa_pooling_attention(
        q, k, v, tuple(thw_q), tuple(thw_kv), has_cls, rel_pos_t, rel_pos_h, rel_pos_w, residual_pooling
    )


@contextlib.contextmanager
def sdpa_in_reference():
    """Swap the reference's matmul attention for the SDPA formulation. Always the same function
    object: a graph compiled inside the context guards on it, and interleaved timing enters the
    context once per step."""
    original = reference.pooling_attention
    reference.pooling_attention = _sdpa_reference_attention
    try:
        yield
    finally:
        reference.pooling_attention = original


def _torchvision_model(name: str, state):
    import torchvision

    from mvit.convert import convert_torchvision

    tv = getattr(torchvision.models.video, TORCHVISION[name])()
    # Load our weights into torchvision's model by inverting the converter's mapping: the
    # converter is tested to give identical logits, so the two run the same function.
    ours_from_tv = convert_torchvision(tv.state_dict())
    inverse = {}
    tv_keys = list(tv.state_dict().keys())
    for tv_key, our_key in zip(tv_keys, ours_from_tv.keys()):
        inverse[tv_key] = state[our_key].reshape(tv.state_dict()[tv_key].shape)
    tv.load_state_dict(inverse)
    return tv


def _pytorchvideo_model(name: str, num_classes: int):
    """pytorchvideo's build of the preset (the same architecture: tests/test_convert.py)."""
    from pytorchvideo.models.hub import vision_transformers

    return getattr(vision_transformers, PYTORCHVIDEO[name])(head_num_classes=num_classes)


def _has_pytorchvideo() -> bool:
    import importlib.util

    return importlib.util.find_spec("pytorchvideo") is not None


def _variants(name: str, device: torch.device, want: set[str], **overrides):
    """label -> (make, context, compile mode (None: eager), state to load or None). ``overrides``
    (config fields, e.g. input_size) leave torchvision out: its builders fix the input size. The
    CUDA-graph variants are built only when ``want`` names them (their compile is the slowest), the
    time-only tuning variant likewise."""
    base = build_model(name, **overrides).to(device)
    state = base.state_dict()
    variants = {}
    if mvit_kernels.load_extension():
        make_fused = lambda: build_model(name, fused=True, **overrides).to(device)  # noqa: E731
        variants["ours-fused"] = (make_fused, None)
        if "ours-fused-timeonly" in want:  # opt-in; where tuning is off (CPU default) it is ours-fused
            variants["ours-fused-timeonly"] = (make_fused, lambda: tuning.using(tuning.mode(), memory="any"))
    variants["ours-ref"] = (lambda: build_model(name, **overrides).to(device), None)
    variants["ours-ref-sdpa"] = (lambda: build_model(name, **overrides).to(device), sdpa_in_reference)
    if name in TORCHVISION and not overrides:
        variants["torchvision"] = (lambda: _torchvision_model(name, state).to(device), None)
    if name in PYTORCHVIDEO and not overrides and _has_pytorchvideo():
        num_classes = base.cfg.num_classes
        variants["pytorchvideo"] = (lambda: _pytorchvideo_model(name, num_classes).to(device), None)
    out = {}
    for key, (make, ctx) in variants.items():
        for suffix, compile_mode in COMPILE_MODES.items():
            label = key + suffix
            if want and label not in want:
                continue
            if compile_mode == "reduce-overhead" and (label not in want or device.type != "cuda"
                                                      or key not in ("ours-fused", "torchvision")):
                continue
            out[label] = (make, ctx, compile_mode, state if key.startswith("ours") else None)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, warmup: int, repeats: int, after_warmup=None) -> list[float]:
    """Seconds of each of ``repeats`` runs of fn after ``warmup`` untimed ones; ``after_warmup``
    (e.g. resetting the peak-memory counter) is called between the two."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def make_step(name, spec, device, batch, mode, dtype_ctx, **overrides):
    """(model, step): the variant's model, set to train or eval, and one inference (no_grad) or
    training step (forward, cross-entropy, backward, AdamW) on a random batch, in dtype_ctx."""
    make, ctx, compile_mode, state = spec
    model = make()
    if state is not None:
        model.load_state_dict(state)
    cfg = build_model(name, **overrides).cfg
    shape = (batch, 3) + ((cfg.input_size[1], cfg.input_size[2]) if cfg.patch_2d else tuple(cfg.input_size))
    x = torch.randn(shape, device=device)
    target = torch.randint(0, cfg.num_classes, (batch,), device=device)
    run_model = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if mode == "train" else None

    def step():
        if mode == "infer":
            with torch.no_grad(), dtype_ctx():
                run_model(x)
        else:
            with dtype_ctx():
                loss = torch.nn.functional.cross_entropy(run_model(x).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model.train(mode == "train")
    return model, step


def measure(name, label, spec, device, batch, mode, warmup, repeats, dtype_ctx):
    ctx = spec[1]
    model, step = make_step(name, spec, device, batch, mode, dtype_ctx)
    with (ctx() if ctx else contextlib.nullcontext()):
        # The peak of the timed steps only: warm-up also holds what compilation and the fused
        # model's per-shape tuning (each candidate's outputs and gradients) need once, not per step.
        reset = torch.cuda.reset_peak_memory_stats if device.type == "cuda" else None
        times = _time(step, device, warmup, repeats, after_warmup=reset)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _timing_row(name, label, mode, batch, times, peak)


def _timing_row(name, label, mode, batch, times, peak_gib, **extra) -> dict:
    """A result row from the timed runs' seconds."""
    med = statistics.median(times)
    return {"model": name, "variant": label, "mode": mode, "batch": batch, "step_s": med, "min_s": min(times),
            "max_s": max(times), "clips_per_s": batch / med, "peak_gib": peak_gib, **extra}


def cpu_matmul_rate(repeats: int = 5) -> dict:
    """The fastest float32 matrix-product rate (FLOP/s, 2 per multiply-add) this CPU reaches with
    the current thread count, as the best of: ``torch.mm`` of two 2048x2048 matrices (the BLAS
    torch was built with) and oneDNN's linear on (8192, 1024) x (1024, 1024) (what the fused
    model's inference runs); the median of ``repeats`` runs of each after a warm-up. The best
    one, so that the floor it gives is a true lower bound."""
    rates = {}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    products = {"torch.mm 2048^3": (lambda: torch.mm(a, b), 2 * 2048**3)}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available():
        x, w = torch.randn(8192, 1024), torch.randn(1024, 1024)
        products["oneDNN linear 8192x1024x1024"] = (
            lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), 2 * 8192 * 1024 * 1024)
    for name, (fn, flop) in products.items():
        try:
            times = _time(fn, torch.device("cpu"), warmup=2, repeats=repeats)
        except RuntimeError:  # a build without that kernel
            continue
        rates[name] = flop / statistics.median(times)
    best = max(rates, key=rates.get)
    return {"flop_per_s": rates[best], "best": best, "rates": rates}


def executed_gflops(name: str, variant: str) -> float:
    """Multiply-adds (G) of one clip's forward as the variant executes it: the fused model's own
    count (it skips the K/V projection of tokens no pooling window reads) for ours-fused*, the
    reference's for the others (torchvision and pytorchvideo run the same arithmetic: the
    converter tests)."""
    return _model_gflops(name, variant.startswith("ours-fused"))


@functools.lru_cache(maxsize=None)
def _model_gflops(name: str, fused: bool) -> float:
    """count_model's figure, once per model and path (every row of a group asks for one of two)."""
    from mvit.flops import count_model
    from mvit.presets import get_preset

    return count_model(get_preset(name), fused=fused).gflops


def floor_seconds(gflops: float, batch: int, mode: str, flop_per_s: float) -> float:
    """The step's arithmetic at ``flop_per_s``: 2 FLOPs a multiply-add, a training step as 3
    forwards (the backward computes two products per forward one)."""
    return 2e9 * gflops * batch * (3 if mode == "train" else 1) / flop_per_s


def measure_interleaved(name, specs, device, batch, mode, warmup, repeats, dtype_ctx) -> list[dict]:
    """Rows for every variant in ``specs`` (label -> spec) of one model/mode/batch, timed in turns:
    each is built and warmed up, then the timed runs go round the variants (1, 2, ..., 1, 2, ...),
    each inside its own context. A shared machine whose speed drifts over minutes (the CPU VMs
    here: one variant's median moved by 15% between runs) then slows every variant alike, and
    the ratios stay side by side. CPU only: the CUDA peak-memory column needs the variants apart.
    A variant that fails is an error row; the others go on."""
    live, rows = {}, {}
    for label, spec in specs.items():
        ctx = spec[1] or contextlib.nullcontext
        try:
            model, step = make_step(name, spec, device, batch, mode, dtype_ctx)
            with ctx():
                for _ in range(warmup):
                    step()
            live[label] = (model, step, ctx, [])
        except Exception as exc:
            traceback.print_exc()
            rows[label] = _error_row(name, label, mode, batch, exc)
    for _ in range(repeats):
        for label, (model, step, ctx, times) in list(live.items()):
            try:
                with ctx():
                    start = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - start)
            except Exception as exc:
                traceback.print_exc()
                rows[label] = _error_row(name, label, mode, batch, exc)
                del live[label]
    for label, (_, _, _, times) in live.items():
        # times_s kept in round order: round i of every variant is index i (paired_ratios)
        rows[label] = _timing_row(name, label, mode, batch, times, None, interleaved=True, times_s=times)
    live.clear()
    gc.collect()
    return [rows[label] for label in specs]


def _error_row(name, label, mode, batch, exc) -> dict:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return {"model": name, "variant": label, "mode": mode, "batch": batch, "error": "OOM"}
    return {"model": name, "variant": label, "mode": mode, "batch": batch,
            "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}".replace("|", "/")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    parser.add_argument("--models", nargs="+", default=["mvit_b_16x4", "mvitv2_s_16x4", "mvit_b16_image"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--variants", nargs="*", default=[], help="only these labels (default: all)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--suffix", default="", help="appended to the output names (throughput_<device><suffix>.md): "
                        "runs with other variants or batches, e.g. bench/gpu_suite.py's compiled step, keep their own files")
    parser.add_argument("--sequential", action="store_true",
                        help="CPU: time each variant's runs together instead of in turns (measure_interleaved); "
                        "CUDA runs are always sequential")
    return parser


#: Every label _variants can build somewhere (another device, a model with a torchvision or
#: pytorchvideo build).
ALL_VARIANTS = {key + suffix
                for key in ("ours-fused", "ours-fused-timeonly", "ours-ref", "ours-ref-sdpa", "torchvision", "pytorchvideo")
                for suffix in COMPILE_MODES}


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, least in (("warmup", 0), ("repeats", 1), ("threads", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be >= {least}, got {getattr(args, name)}")
    if args.batch_sizes and min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    unknown = sorted(set(args.variants) - ALL_VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {', '.join(unknown)}; known: {', '.join(sorted(ALL_VARIANTS))}")


def _report_unbuilt(parser, variants: dict, wanted: list[str]) -> None:
    """Say which asked-for variants this machine or model cannot build (torchvision has no build of
    the tiny and image presets, pytorchvideo only MViT-B's and may not be installed; CUDA graphs
    need CUDA; the fused ones the extension); stop when nothing is left to measure, instead of
    writing an empty table."""
    for name, built in variants.items():
        missing = [label for label in wanted if label not in built]
        if missing:
            print(f"{name}: not available here: {', '.join(missing)}", file=sys.stderr, flush=True)
    if not any(variants.values()):
        parser.error("none of the asked variants can run here (see above)")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        dtype_ctx = contextlib.nullcontext
        batches = args.batch_sizes or [1]
        device_name = f"CPU {platform.processor() or platform.machine()}, {args.threads} threads, float32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        dtype_ctx = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        batches = args.batch_sizes or [1, 8, 32]
        device_name = f"{torch.cuda.get_device_name()}, bf16 autocast"

    rows = []
    text = ""
    ceiling = None
    if device.type == "cpu":
        ceiling = cpu_matmul_rate()
        print(f"fp32 matrix products, {args.threads} threads: " + ", ".join(
            f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in ceiling["rates"].items()), flush=True)
    variants = {name: _variants(name, device, set(args.variants)) for name in args.models}
    _report_unbuilt(parser, variants, args.variants)

    def record(row):
        nonlocal text
        if ceiling is not None and "error" not in row:
            row["gflops"] = executed_gflops(row["model"], row["variant"])
            row["floor_s"] = floor_seconds(row["gflops"], row["batch"], row["mode"], ceiling["flop_per_s"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        # rewritten after every row: a run cut short still leaves its results
        text = _write(rows, device, device_name, args.out, args.suffix, ceiling)

    if device.type == "cpu" and not args.sequential:
        for name in args.models:
            for mode in args.modes:
                for batch in batches:
                    for row in measure_interleaved(name, variants[name], device, batch, mode, args.warmup,
                                                   args.repeats, dtype_ctx):
                        record(row)
        print(text)
        _print_written(device, args)
        return 0
    # Every eager variant first, then the compiled ones: compiling takes minutes a graph, and a
    # run cut short by a time limit (the lent GPU machines allow 10 minutes a command) should
    # still have every eager row, torchvision's included.
    for compiled_phase in (False, True):
        for name in args.models:
            for mode in args.modes:
                for batch in batches:
                    for label, spec in variants[name].items():
                        if (spec[2] is not None) != compiled_phase:
                            continue
                        try:
                            row = measure(name, label, spec, device, batch, mode, args.warmup, args.repeats, dtype_ctx)
                        except Exception as exc:  # one broken variant must not cost the others' rows
                            if not isinstance(exc, torch.cuda.OutOfMemoryError):
                                traceback.print_exc()
                            row = _error_row(name, label, mode, batch, exc)
                            gc.collect()
                        record(row)
    print(text)
    _print_written(device, args)
    return 0


def _output_stem(out_dir: str, device, suffix: str) -> str:
    """Where _write puts throughput_<cpu|gpu><suffix>.{md,json,png}."""
    return os.path.join(out_dir, f"throughput_{'gpu' if device.type == 'cuda' else 'cpu'}{suffix}")


def _print_written(device, args) -> None:
    print(f"wrote {_output_stem(args.out, device, args.suffix)}.md, .json and .png", flush=True)


def _write(rows, device, device_name, out_dir, suffix="", ceiling=None) -> str:
    lines = [
        f"# Throughput — {device_name}; torch {torch.__version__}; "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}",
        "",
        "Median of the timed runs (warm-up excluded), spread = min–max; peak GiB: the CUDA allocator's peak "
        "over the timed runs (warm-up excluded: compilation, per-shape tuning). Ratios: against torchvision eager "
        "(× tv) and against the best peer that is not this project (× best peer), same model/mode/batch.",
    ]
    if any(r.get("interleaved") for r in rows):
        lines += ["", "Timed in turns: every variant of a model/mode/batch built and warmed up, then one timed step "
                  "of each in turn, repeated, so that drifts of a shared machine's speed fall on every variant alike."]
    if ceiling is not None:
        lines += ["", f"Arithmetic floor: the GFLOPs (multiply-adds) the variant executes, x2 (x6 for a training step), "
                  f"at {ceiling['flop_per_s'] / 1e9:.0f} GFLOP/s, the fastest float32 matrix product measured here at the "
                  f"start of the run ({ceiling['best']}; " + ", ".join(
                      f"{k} {v / 1e9:.0f}" for k, v in ceiling["rates"].items()) + "); × floor = step / floor."]
    lines += [
        "",
        "| model | mode | batch | variant | step (ms) | spread (ms) | clips/s | peak GiB | × tv | × best peer "
        "| floor (ms) | × floor |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    models = list(dict.fromkeys(r["model"] for r in rows))  # in the order they were run
    # Measured eager first, then compiled; listed by model, mode, batch, variant.
    for r in sorted(rows, key=lambda r: (models.index(r["model"]), r["mode"], r["batch"], r["variant"])):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['variant']} | {r['error']} | | | | | | | |")
            continue
        group = [g for g in rows if "error" not in g and (g["model"], g["mode"], g["batch"]) == (r["model"], r["mode"], r["batch"])]
        tv = next((g for g in group if g["variant"] == "torchvision"), None)
        peers = [g for g in group if not g["variant"].startswith("ours")]
        best = min(peers, key=lambda g: g["step_s"]) if peers else None
        x_tv = f"{tv['step_s'] / r['step_s']:.2f}" if tv else "—"
        x_best = f"{best['step_s'] / r['step_s']:.2f}" if best else "—"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "—"
        floor = f"{1000 * r['floor_s']:.1f}" if r.get("floor_s") else "—"
        x_floor = f"{r['step_s'] / r['floor_s']:.2f}" if r.get("floor_s") else "—"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {r['variant']} | {1000 * r['step_s']:.1f} | "
            f"{1000 * r['min_s']:.1f}–{1000 * r['max_s']:.1f} | {r['clips_per_s']:.2f} | {peak} | {x_tv} | {x_best} | "
            f"{floor} | {x_floor} |"
        )
    lines += floor_section(rows)
    lines += paired_section(rows)
    lines += tuning_section()
    text = "\n".join(lines) + "\n"
    stem = _output_stem(out_dir, device, suffix)
    os.makedirs(out_dir, exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "rows": rows, "tuning": tuning.summary()}, f, indent=2)
    _plot(rows, stem + ".png")
    return text


def floor_section(rows) -> list[str]:
    """Markdown lines: per model/mode/batch with a torchvision row and floors, the largest speedup
    over torchvision that the fused model's arithmetic allows here (torchvision's step over the
    fused model's floor), beside the one measured."""
    lines = []
    groups = dict.fromkeys((r["model"], r["mode"], r["batch"]) for r in rows if "error" not in r)
    for key in groups:
        group = {r["variant"]: r for r in rows if "error" not in r and (r["model"], r["mode"], r["batch"]) == key}
        tv, fused = group.get("torchvision"), group.get("ours-fused")
        if not (tv and fused and fused.get("floor_s")):
            continue
        lines.append(f"- {key[0]} {key[1]} batch {key[2]}: torchvision's step is {tv['step_s'] / fused['floor_s']:.2f}x "
                     f"the fused model's floor ({1000 * fused['floor_s']:.0f} ms, {fused['gflops']:.2f} GFLOPs a clip): "
                     f"the most any implementation of that arithmetic could gain on torchvision here; ours-fused "
                     f"measured {tv['step_s'] / fused['step_s']:.2f}x.")
    return ["", *lines] if lines else []


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile of values, linear between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def paired_ratios(ours: dict, peer: dict) -> Optional[dict]:
    """Per-round speedups of ``ours`` over ``peer`` from interleaved rows: round i's peer step over
    round i's own (the two ran back to back, so a drift of the machine's speed over minutes
    cancels in each ratio, where it does not between two medians taken over the whole run).
    Their median, quartiles and the rounds; None without paired times."""
    pairs = list(zip(ours.get("times_s") or [], peer.get("times_s") or []))
    if not pairs:
        return None
    ratios = [p / o for o, p in pairs]
    return {"median": statistics.median(ratios), "q1": _quantile(ratios, 0.25), "q3": _quantile(ratios, 0.75),
            "rounds": len(ratios)}


def paired_section(rows) -> list[str]:
    """Markdown lines: for interleaved groups, each of our variants' per-round speedup over
    torchvision eager and over the best peer (by median), as :func:`paired_ratios` gives it."""
    lines = []
    groups = dict.fromkeys((r["model"], r["mode"], r["batch"]) for r in rows if r.get("times_s"))
    for key in groups:
        group = [r for r in rows if r.get("times_s") and (r["model"], r["mode"], r["batch"]) == key]
        peers = [g for g in group if not g["variant"].startswith("ours")]
        targets = {g["variant"]: g for g in peers if g["variant"] == "torchvision"}
        if peers:
            best = min(peers, key=lambda g: g["step_s"])
            targets.setdefault(best["variant"], best)
        for r in group:
            if not r["variant"].startswith("ours"):
                continue
            for peer in targets.values():
                p = paired_ratios(r, peer)
                lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['variant']} | {peer['variant']} | "
                             f"{p['median']:.2f} | {p['q1']:.2f}–{p['q3']:.2f} | {p['rounds']} |")
    if not lines:
        return []
    return ["", "Per-round speedups (interleaved runs): in each round, the peer's step over ours, the two "
            "timed back to back; the median over the rounds and its quartiles. A drift of the machine's speed "
            "cancels within a round, so this is the steadier of the two ratios.", "",
            "| model | mode | batch | variant | over | median speedup | quartiles | rounds |",
            "|---|---|---:|---|---|---:|---:|---:|", *lines]


def tuning_section() -> list[str]:
    """Markdown lines listing the tuning decisions; none when nothing was tuned."""
    rows = tuning.summary()
    if not rows:
        return []
    lines = ["", "Per-shape choices of `mvit_kernels.tuning` (fused op vs its alternatives, best of "
             f"{tuning.REPEATS} timed runs each, ms; with a backward, the MB each keeps for it; under the "
             "memory policy `keep` a candidate keeping more than the fused one is passed over even when "
             "faster; `any` decides by time alone; error: each candidate's forward / gradient error against "
             "the trusted one, as `tuning.disagreement` measures it, on the step's own inputs):", "",
             "| op, input, arguments | memory policy | winner | ms per candidate | MB kept for backward | "
             "faster, passed over for memory | error vs trusted (fwd / grad) | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = ", ".join(f"{name} {t:.3f}" for name, t in r["ms"].items()) or "—"
        kept = ", ".join(f"{name} {mb:.1f}" for name, mb in r.get("saved_mb", {}).items()) or "—"
        held = ", ".join(r.get("held_back", [])) or "—"
        errors = ", ".join(f"{name} {fwd:.1e} / {grad:.1e}" for name, (fwd, grad) in r.get("checked", {}).items()) or "—"
        policy = r["memory"] if r["backward"] else "— (no backward)"
        note = r["note"].replace("|", "/") or "—"
        lines.append(f"| {r['op']} | {policy} | {r['winner']} | {ms} | {kept} | {held} | {errors} | {note} |")
    return lines


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(r["model"], r["mode"]) for r in rows if "error" not in r})
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (model, mode) in zip(axes[0], groups):
        for variant in sorted({r["variant"] for r in rows}):
            pts = sorted((r["batch"], r["clips_per_s"]) for r in rows
                         if "error" not in r and (r["model"], r["mode"], r["variant"]) == (model, mode, variant))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax.set_title(f"{model} {mode}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("clips/s")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
