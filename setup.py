"""Packaging. ``kernels/`` (Triton kernels) installs as ``cem_fast._kernels``: a PyPI package named ``kernels``
exists, so a top-level ``kernels`` is never installed. ``cem_fast._C`` is the C++ extension (CPU ops with
OpenMP); it is optional: when it cannot be built, cem_fast still installs and runs on the torch backend, and
``cem-fast info`` says why the cpp backend is missing."""
import glob

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(CppExtension(
        "cem_fast._C", sorted(glob.glob("csrc/*.cpp")),
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],  # without it at::parallel_for silently runs on one thread
        optional=True,
    ))
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
