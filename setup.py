"""Build script: the pure-Python packages plus the optional ``estimators._C`` extension.

The extension (fused DR-family losses, see ``csrc/``) is compiled with
``torch.utils.cpp_extension``: the CPU kernels always, the CUDA kernels only when a CUDA
toolkit and a CUDA build of torch are present.  If the compiler is missing or the build
fails, installation still succeeds and ``estimators`` falls back to its pure-PyTorch
reference (``estimators.backend()`` then returns ``"reference"``).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Compiler flags of the at::vec instruction sets (the ones ATen compiles its own kernels for).
# The CPU kernels are built for the build machine's best set, as torch reports it, like
# -march=native: an install runs where it was built.  CVR_CPU_CAPABILITY=DEFAULT (or AVX2)
# builds a library for older or other x86 machines.
_CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources or os.environ.get("CVR_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("cvr-debias: torch is not importable at build time; skipping the C++ extension "
              "(install torch==2.13.0 first and use `pip install --no-build-isolation`).", file=sys.stderr)
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    capability = os.environ.get("CVR_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    capability_flags = _CPU_CAPABILITY_FLAGS.get(capability)
    if capability_flags is None:
        capability, capability_flags = "DEFAULT", []
    # No -std flag: torch.utils.cpp_extension passes the standard its headers need (C++20).
    extra = {"cxx": ["-O3", *capability_flags]}
    link = []
    if "OpenMP" in torch.__config__.parallel_info() and sys.platform != "darwin":
        # at::parallel_for is a header template over `#pragma omp parallel`: without -fopenmp
        # it runs serially.  torch has already loaded libgomp, which the extension then shares.
        extra["cxx"].append("-fopenmp")
        link.append("-fopenmp")
    macros = [("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None),
              ("CVR_CPU_CAPABILITY", f'"{capability}"')]
    if use_cuda:
        extra["nvcc"] = ["-O3", "--extended-lambda"]
        ext = CUDAExtension("estimators._C", sources + cuda_sources, extra_compile_args=extra,
                            extra_link_args=link, define_macros=macros + [("WITH_CUDA", None)])
    else:
        ext = CppExtension("estimators._C", sources, extra_compile_args=extra, extra_link_args=link,
                           define_macros=macros)

    class OptionalBuild(BuildExtension):
        """Turn a failed compile into a warning: the reference path keeps working."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "no extension"
                print(f"cvr-debias: building the C++ extension failed ({exc}); the pure-PyTorch "
                      "reference will be used. Install a C++20 compiler (g++ >= 10) and rebuild "
                      "with `pip install --no-build-isolation -e .`.", file=sys.stderr)

    # ninja compiles the sources in parallel where it is installed; without it, one by one.
    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
