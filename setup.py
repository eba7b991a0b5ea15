"""Packaging. ``kernels/`` (Triton kernels) installs as ``cem_fast._kernels``: a PyPI package named ``kernels``
exists, so a top-level ``kernels`` is never installed. ``cem_fast._C`` is the C++ extension (CPU ops with
OpenMP, plus the CUDA kernels of csrc/*.cu when torch has CUDA and a toolkit is found); it is optional: when it cannot be built, cem_fast still installs and runs on the torch backend, and
``cem-fast info`` says why the cpp backend is missing."""
import glob

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    if torch.version.cuda and CUDA_HOME:  # a CUDA torch and a toolkit: add the .cu kernels
        ext_modules.append(CUDAExtension(
            "cem_fast._C", sources + sorted(glob.glob("csrc/*.cu")), define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=["-fopenmp"], optional=True))
    else:
        ext_modules.append(CppExtension(
            "cem_fast._C", sources, extra_compile_args=cxx,
            extra_link_args=["-fopenmp"],  # without it at::parallel_for silently runs on one thread
            optional=True))
    cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)
except ImportError:  # no torch at build time: pure-Python install
    pass

setup(
    packages=["cem_fast", "cem_fast.models", "cem_fast._kernels"],
    package_dir={"cem_fast": "cem_fast", "cem_fast._kernels": "kernels"},
    package_data={"cem_fast": ["data/*.pt", "data/*.npz", "data/*.png", "data/*.json", "data/*.md"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
