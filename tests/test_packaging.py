"""The source distribution builds: an sdist holds every file the extension's build reads, and a
wheel built from it (not from this checkout) installs a working package.

`pip install -e .` compiles from the checkout, where every header is at hand; an sdist holds
only what setuptools or MANIFEST.in names, and without MANIFEST.in it left out every header the
C++ sources include (`cpu_isa.h: No such file or directory`)."""

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the build reads from the checkout: the extension's sources and the two packages, and the
# files that configure the build.
BUILD_INPUTS = ("csrc", "mvit", "mvit_kernels")
BUILD_FILES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in")


def _run(cmd, cwd, env=None):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _tracked_files(folder: Path):
    ignored = {"__pycache__"}
    return sorted(p.relative_to(ROOT).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not ignored & set(p.parts) and p.suffix not in (".so", ".pyc"))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """An sdist built from a copy of the build's inputs (the checkout's own egg-info stays as it is)."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("sdist")
    # MVIT_KERNELS_CUDA=0: setup.py then leaves the CUDA source out of the extension, and the
    # sdist must hold it all the same (MANIFEST.in), for the machines that build it with CUDA.
    env = dict(os.environ, MVIT_KERNELS_CUDA="0")
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
         cwd=src, env=env)
    (archive,) = out.glob("*.tar.gz")
    return archive


def test_sdist_holds_every_source_and_header(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = [f for folder in BUILD_INPUTS for f in _tracked_files(ROOT / folder)]
    assert any(f.endswith(".h") for f in expected)  # the files that went missing
    missing = [f for f in expected if f not in names]
    assert not missing, f"{sdist.name} lacks {missing}"


@pytest.mark.slow
def test_wheel_built_from_the_sdist_runs_the_fused_model(sdist, tmp_path):
    wheels = tmp_path / "wheels"
    # No network and no second torch: the build compiles against the torch already installed,
    # C++ only (the CUDA sources are covered by the editable build CI makes).
    env = dict(os.environ, MVIT_KERNELS_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          str(sdist), "-w", str(wheels)], cwd=tmp_path, env=env)
    (wheel,) = wheels.glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        assert any(n.startswith("mvit_kernels/_C") for n in zf.namelist()), "the wheel has no extension"
        zf.extractall(site)

    # A fresh interpreter that finds the packages in the unpacked wheel before this checkout's.
    check = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        import torch, mvit, mvit_kernels
        for module in (mvit, mvit_kernels):
            assert module.__file__.startswith({str(site)!r}), module.__file__
        mvit_kernels.require_fused()
        from mvit import build_model
        torch.manual_seed(0)
        fused = build_model("mvit_tiny", fused=True).eval()
        ref = build_model("mvit_tiny", fused=False).eval()
        ref.load_state_dict(fused.state_dict())
        x = torch.randn(2, 3, 8, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    done = _run([sys.executable, "-c", check], cwd=tmp_path, env=clean)
    assert done.stdout.strip().endswith("ok")
