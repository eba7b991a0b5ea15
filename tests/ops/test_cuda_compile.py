"""Every CUDA source compiles for Hopper (sm_90) with no GPU: `nvcc -c` against torch's headers (no link: the
CPU torch wheel has no CUDA libraries)."""
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed here: the CUDA compile check needs it")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    std = "c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13) else "c++17"
    cmd = [NVCC, "-c", f"-std={std}", "-arch=sm_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-DTORCH_EXTENSION_NAME=_C", *[f"-I{p}" for p in include_paths()],
           f"-I{sysconfig.get_paths()['include']}", str(CSRC / source), "-o", str(tmp_path / "k.o")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert p.returncode == 0, "\n".join(errors[:20]) or p.stderr[-2000:]
    assert (tmp_path / "k.o").stat().st_size > 0


def test_there_are_cuda_sources():
    assert {p.name for p in CSRC.glob("*.cu")} >= {"intervene_cuda.cu", "roi_sq_err_cuda.cu"}


def test_the_cuda_registrations_compile(tmp_path):
    """csrc/bindings.cpp as a CUDA build compiles it (WITH_CUDA: the CUDA kernels registered for the cem_fast
    operators), with the host compiler: it holds no device code."""
    cxx = shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler here")
    std = "c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13) else "c++17"
    cmd = [cxx, "-fsyntax-only", f"-std={std}", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *[f"-I{p}" for p in include_paths()],
           f"-I{sysconfig.get_paths()['include']}", str(CSRC / "bindings.cpp")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
