"""Packaging. ``kernels/`` (Triton kernels) installs as ``cem_fast._kernels``: a PyPI package named ``kernels``
exists, so a top-level ``kernels`` is never installed. The C++/CUDA extension ``cem_fast._C`` joins here with the
fused-kernel work (csrc/)."""
from setuptools import setup

setup(
    packages=["cem_fast", "cem_fast.models", "cem_fast._kernels"],
    package_dir={"cem_fast": "cem_fast", "cem_fast._kernels": "kernels"},
    package_data={"cem_fast": ["data/*.pt", "data/*.npz", "data/*.png", "data/*.json", "data/*.md"]},
    include_package_data=True,
)
