"""Builds the ``mvit_kernels._C`` extension (C++ always; CUDA too when possible).

Knobs (environment variables):
  MVIT_KERNELS_CUDA=1|0     force the CUDA sources on or off (default: on when a CUDA build of
                            torch and a CUDA toolkit are both present)
  TORCH_CUDA_ARCH_LIST      GPU architectures to compile for (default here: "8.0;9.0+PTX" and the
                            architecture of every GPU the build machine has)
  MAX_JOBS                  parallel compile jobs (ninja)
  CUDA_HOME                 toolkit root; found from nvcc when unset
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup


def _find_cuda_home() -> str | None:
    """The toolkit root that holds lib64/libcudart.so.

    torch guesses it from the nvcc on PATH; where that nvcc is a wrapper script in a bin folder
    with no libraries beside it, the link fails on -lcudart. nvcc itself knows its root: its
    dry run prints it on the `#$ TOP=` line."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        return os.path.realpath(match.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _want_cuda(cuda_home: str | None) -> bool:
    import torch

    forced = os.environ.get("MVIT_KERNELS_CUDA")
    if forced is not None and forced.strip() != "":
        want = forced.strip().lower() not in ("0", "false", "no", "off")
        if want and (torch.version.cuda is None or cuda_home is None):
            raise RuntimeError(
                "MVIT_KERNELS_CUDA=1 but "
                + ("torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) was found")
            )
        return want
    return torch.version.cuda is not None and cuda_home is not None


def _nvcc_archs(cuda_home: str) -> set[str] | None:
    """The architectures this nvcc compiles for ("7.5", "8.0", ...), or None if it cannot say."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {f"{int(n) // 10}.{int(n) % 10}" for n in re.findall(r"compute_(\d+)", out)}
    return found or None


def _cuda_arch_list(cuda_home: str) -> str:
    """The default TORCH_CUDA_ARCH_LIST: code for sm_80 (runs on every 8.x GPU) and sm_90, PTX
    of the newest (which the driver compiles for later GPUs, Blackwell included, on first use),
    and code for each GPU the build machine has that nvcc can compile for (CUDA 13 has dropped
    Volta, for one)."""
    import torch

    archs = {"8.0", "9.0"}
    supported = _nvcc_archs(cuda_home)
    try:
        for i in range(torch.cuda.device_count()):
            arch = "{}.{}".format(*torch.cuda.get_device_capability(i))
            if supported is not None and arch in supported:
                archs.add(arch)
    except Exception:  # no driver, or a CPU build: the defaults alone
        pass
    ordered = sorted(archs, key=lambda a: tuple(int(p) for p in a.split(".")))
    return ";".join(ordered[:-1] + [ordered[-1] + "+PTX"])


def _extensions():
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    from torch.utils import cpp_extension

    use_cuda = _want_cuda(cuda_home)
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++20"]
    # at::parallel_for is a header template: without OpenMP in this build it runs every CPU kernel
    # on one thread whatever torch.set_num_threads says. Linux wheels of torch load their libgomp
    # first, and the extension's libgomp.so.1 resolves to that one (a single thread pool).
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    define_macros = []
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_arch_list(cuda_home))
        define_macros.append(("MVIT_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "mvit_kernels._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--use_fast_math"]},
            extra_link_args=link,
            py_limited_api=False,
        )
    else:
        ext = cpp_extension.CppExtension(
            "mvit_kernels._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    print(f"mvit_kernels: building _C with {'C++ and CUDA' if use_cuda else 'C++ only'} ({len(sources)} sources)")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
