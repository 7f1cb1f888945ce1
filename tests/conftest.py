import os

import pytest

# Triton reads TRITON_INTERPRET when it is first imported, and mvit_kernels imports it: set it here,
# before any test module imports torch/triton, so the Triton kernels run on CPU tensors in CI.
# A GPU run can opt out with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def ieee_fp32():
    """TF32 off for CUDA matmuls during a test: fp32 Triton kernels follow torch's TF32 switch
    (IEEE dots when it is off), as the reference's matmuls do, so fp32 comparisons on a GPU hold
    to fp32 tolerances."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(autouse=True)
def _tuning_off():
    """Tests check the fused kernels themselves, so per-shape tuning (``mvit_kernels.tuning``,
    which may run the reference where it times faster) is off unless a test turns it on."""
    from mvit_kernels import tuning

    with tuning.using("off"):
        yield


@pytest.fixture
def registered_path():
    """A context manager under which the fused ops take their registered torch.library path (as
    under torch.compile or FlopCounterMode) instead of the eager autograd.Function: a dispatch
    mode that changes nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    return PassThrough
