"""The CUDA kernels (``csrc/cuda/*.cu``) compile on a machine without a GPU.

CI and most development machines have no GPU and a CPU build of torch, so ``setup.py`` never
compiles the ``.cu`` files there and a change that breaks them would only show on the next GPU
machine.  Where ``nvcc`` is on the PATH, this test compiles each of them to an object file
(no link) against the installed torch's headers, with the flags ``setup.py`` gives them, for
the H100/H200 (sm_90).  It is skipped where there is no ``nvcc``.
"""
from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

REPO = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")
# setup.py's nvcc flags for the extension (-O3 --extended-lambda) and the ones
# torch.utils.cpp_extension adds to every CUDA extension.
FLAGS = ["-std=c++20", "-O3", "--extended-lambda", "-arch=sm_90", "-DWITH_CUDA",
         "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", *COMMON_NVCC_FLAGS]


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (a CUDA toolkit) on the PATH")
def test_cuda_sources_compile(tmp_path: Path) -> None:
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"
    # A CPU wheel ships torch's CUDA headers but not the one its CMake generates for a CUDA
    # build; its only content there is that c10_cuda is a shared library.
    stub = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{d}" for d in (tmp_path / "include", *include_paths(), sysconfig.get_paths()["include"])]
    # Both files at once: each takes about 25 s of one core.
    jobs = {
        source.name: subprocess.Popen(
            [NVCC, "-c", *FLAGS, *includes, str(source), "-o", str(tmp_path / f"{source.stem}.o")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for source in CUDA_SOURCES
    }
    logs = {name: job.communicate()[0] for name, job in jobs.items()}
    failed = [f"nvcc {name} failed:\n{log[-4000:]}" for name, log in logs.items() if jobs[name].returncode != 0]
    assert not failed, "\n".join(failed)
