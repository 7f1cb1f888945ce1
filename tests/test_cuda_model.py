"""Fused vs reference at the real MViT-B / MViTv2-S shapes on a GPU (run by bench/gpu_suite.py).

Tolerances (issue 4): fp32 (TF32 off) relative error <= 1e-3 between the fused and the reference
model; bf16 relative error <= 1e-2 against the fp32 reference, which is the ground truth for
both bf16 paths (two bf16 runs of a 16-block model differ from each other by about twice what
either differs from fp32), or, for a quantity where the reference's own bf16 run is already
further off, no more than 1.5x the reference's bf16 error. Relative error is ||a - b|| / ||b|| over the logits and over every
parameter gradient, with the denominator floored at 1e-4 of the root-mean-square parameter
gradient norm. One parameter is checked differently: the LayerNorm bias after K pooling has a
true gradient of exactly 0 (adding one vector to every key, class token included, shifts each
query's logits by a constant, which softmax ignores), so both paths give it rounding noise and
a relative error of noise means nothing; its gradient must instead be ~0, at most tol times
that RMS norm. (The H100 run of 2026-11-24 measured fp32 errors up to 4.7e-4 and bf16 logits
1.4e-2 against fp32, within 1.5x of the reference's own bf16 run; the k-norm bias is where a
plain relative error failed: 0.3 for bf16, noise against noise.) These tests need CUDA and
TRITON_INTERPRET=0; without a GPU they are skipped.
"""

#: Parameters whose true gradient is 0 by the softmax's shift invariance over keys.
ZERO_GRADIENT = "attn.pool_k.norm.bias"

import os

import pytest
import torch

from mvit import build_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a GPU and TRITON_INTERPRET=0",
)


def _run(model, x, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["mvit_b_16x4", "mvitv2_s_16x4"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_fused_matches_reference_on_cuda(preset, dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    ref = build_model(preset, drop_path_rate=0.0, head_dropout=0.0).cuda()
    fused = build_model(preset, drop_path_rate=0.0, head_dropout=0.0, fused=True).cuda()
    fused.load_state_dict(ref.state_dict())
    for name, p in ref.named_parameters():  # the presets zero-init rel-pos tables: exercise them
        if "rel_pos" in name:
            with torch.no_grad():
                p.normal_(std=0.02)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 224, 224, device="cuda")
    truth, truth_grads = _run(ref, x, torch.float32)
    got, got_grads = _run(fused, x, dtype)
    rms = (torch.stack([g.norm() for g in truth_grads.values()]).norm() / len(truth_grads) ** 0.5).item()

    def rel(a, b, floor=0.0):
        return ((a - b).norm() / torch.clamp(b.norm(), min=floor)).item()

    def errors_of(out, grads):
        errs = {"logits": rel(out, truth)}
        for name, g in truth_grads.items():
            # Zero-gradient parameters: the gradient's size against the typical gradient.
            errs[name] = grads[name].norm().item() / rms if name.endswith(ZERO_GRADIENT) else rel(grads[name], g, 1e-4 * rms)
        return errs

    errors = errors_of(got, got_grads)
    bounds = dict.fromkeys(errors, tol)
    if dtype == torch.bfloat16:
        # bf16 gradients deep in the network carry more than 1e-2 of rounding on either path:
        # there the bound is the reference's own bf16 error (x1.5), never below tol.
        ref_errors = errors_of(*_run(ref, x, dtype))
        bounds = {k: max(tol, 1.5 * ref_errors[k]) for k in errors}
        print(f"{preset} bf16 reference: worst {sorted(ref_errors.items(), key=lambda kv: -kv[1])[:3]}")
    worst = sorted(errors.items(), key=lambda kv: -kv[1] / bounds[kv[0]])[:5]
    print(f"{preset} {dtype}: logits {errors['logits']:.2e}; worst against bound {[(k, f'{v:.2e}', f'{bounds[k]:.2e}') for k, v in worst]}")
    bad = {k: (v, bounds[k]) for k, v in errors.items() if v > bounds[k]}
    assert not bad, f"relative errors over their bound: {bad}"
