"""Packaging. ``kernels/`` (Triton kernels) installs as ``cem_fast._kernels``: a PyPI package named ``kernels``
exists, so a top-level ``kernels`` is never installed. ``cem_fast._C`` is the C++ extension that registers the
``torch.ops.cem_fast`` operators; how it is built, and the switches CEM_FAST_BUILD_EXT and CEM_FAST_CUDA
(``auto``, ``0``, ``1``), are in build_support.py, which holds the logic (tests/test_install.py tests it without
building). In short: an install never fails for an optional part. CUDA kernels that fail to build (any error)
fall back to the CPU kernels, and a CPU extension that fails leaves cem_fast on the torch backend, each with one
``cem_fast build: ...`` line saying what was skipped and why, unless a switch is 1 (then the install fails).
Without a visible GPU and without TORCH_CUDA_ARCH_LIST no CUDA kernels are built unless CEM_FAST_CUDA=1.
The configuration and progress are printed as ``cem_fast build: ...`` lines (the Makefile keeps them in
build/ext-build.log).
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # build_support.py beside this file
from build_support import extension_modules  # noqa: E402

ext_modules, cmdclass = extension_modules()

setup(
    packages=["cem_fast", "cem_fast.models", "cem_fast.pipeline", "cem_fast._kernels"],
    package_dir={"cem_fast": "cem_fast", "cem_fast._kernels": "kernels"},
    package_data={"cem_fast": ["data/*.pt", "data/*.npz", "data/*.png", "data/*.json", "data/*.md"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
