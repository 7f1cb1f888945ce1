import os

# Triton reads TRITON_INTERPRET when it is first imported, and mvit_kernels imports it: set it here,
# before any test module imports torch/triton, so the Triton kernels run on CPU tensors in CI.
# A GPU run can opt out with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
