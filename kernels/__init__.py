"""Triton kernels of cem_fast, installed as ``cem_fast._kernels`` (one file per op). Importable without a GPU;
on the CPU they run under the interpreter when TRITON_INTERPRET=1 is set before the import."""
