"""Build script: the pure-Python packages plus the optional ``estimators._C`` extension.

The extension (fused DR-family losses, see ``csrc/``) is compiled with
``torch.utils.cpp_extension``: the CPU kernels always, the CUDA kernels only when a CUDA
toolkit and a CUDA build of torch are present.  If the compiler is missing or the build
fails, installation still succeeds and ``estimators`` falls back to its pure-PyTorch
reference (``estimators.backend()`` then returns ``"reference"``).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    extra = {"cxx": ["-O3", "-std=c++17"]}
    if use_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17"]
        ext = CUDAExtension("estimators._C", sources + cuda_sources, extra_compile_args=extra,
                            define_macros=[("WITH_CUDA", None)])
    else:
        ext = CppExtension("estimators._C", sources, extra_compile_args=extra)

    class OptionalBuild(BuildExtension):
        """Turn a failed compile into a warning: the reference path keeps working."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "no extension"
                print(f"cvr-debias: building the C++ extension failed ({exc}); the pure-PyTorch "
                      "reference will be used. Install a C++17 compiler (g++ >= 9) and rebuild "
                      "with `pip install --no-build-isolation -e .`.", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
