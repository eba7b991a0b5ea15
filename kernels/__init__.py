"""Triton kernels of cem_fast, installed as ``cem_fast._kernels`` (one file per op; importable without a GPU)."""
