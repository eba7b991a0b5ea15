"""Each op and backend: interventions/s and effective GB/s (bytes that must move / median time), beside a plain
copy of the same number of bytes on the same device (the bandwidth baseline row)."""
import os

import pytest
import torch

from cem_fast import ops
from cem_fast.geometry import ROI
from cem_fast.reference import roi_grid
from conftest import sync

# Full sizes of the issue on a GPU; CPU-size otherwise (the CPU rows are for relative comparisons only).
SIZES = {"cuda": dict(K_int=1024, K_roi=4096), "cpu": dict(K_int=64, K_roi=256)}


# ``CEM_FAST_BENCH_BACKENDS=copy,triton,cuda``: only those rows (the GPU check: its CPU rows measure nothing there)
BACKENDS = [b for b in ("copy", "torch", "cpp", "triton", "cuda")
            if not os.environ.get("CEM_FAST_BENCH_BACKENDS") or b in os.environ["CEM_FAST_BENCH_BACKENDS"].split(",")]


def gen(device, seed):
    """A generator on the device: the inputs are made there (GBs on the host, then copied, took most of a case)."""
    return torch.Generator(device=device).manual_seed(seed)


def intervene_args(device, K, h=256, w=256, pb=8, P=1000):
    g = gen(device, 0)
    base = torch.randint(0, 256, (3, h, w), generator=g, device=device).float() / 255
    patches = torch.randint(0, 256, (P, 3, pb, pb), generator=g, dtype=torch.uint8, device=device)
    idx = torch.randint(0, P, (K,), generator=g, device=device)
    blocks = torch.randint(0, (h // pb) * (w // pb), (K,), generator=g, device=device)
    origins = torch.stack([blocks // (w // pb) * pb, blocks % (w // pb) * pb], 1)
    sizes = torch.full((K, 2), pb, device=device)
    ids = torch.arange(K, device=device)
    out = torch.empty(K, 3, h, w, device=device)
    return dict(base=base, patches=patches, patch_idx=idx, origins=origins, sizes=sizes, ids=ids,
                noise_sigma=50.0, out=out)


def skip_unavailable(backend, device):
    pytest.skip(f"{backend} cannot run on {device}: " + "; ".join(ops.backend_reasons(backend, torch.device(device))))


def measure(benchmark, fn, device, group, K, moved):
    """Warm up, time 5 rounds with a device sync inside, record interventions/s and effective GB/s."""
    fn()
    sync(device)
    benchmark.group = group
    benchmark.pedantic(lambda: (fn(), sync(device)), rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test
        return
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(interventions_per_s=K / t, effective_GBps=moved / t / 1e9, bytes=moved)


def op_or_copy(backend, device, op, copy, moved):
    """(function to time, bytes it moves): the copy baseline moves ``moved`` twice (it reads and writes them); a
    backend that cannot run here is skipped with its reasons."""
    if backend == "copy":
        return copy, 2 * moved
    if backend not in backends_for(device):
        skip_unavailable(backend, device)
    return op, moved


def in_layout(t, layout):
    """Outputs as a convolutional model gives them (channels-last) or planar."""
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def backends_for(device):
    return [b for b in ("torch", "cpp", "triton", "cuda") if not ops.backend_reasons(b, torch.device(device))]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_intervene(benchmark, device, backend, layout):
    """Planar outputs, and channels-last ones (what convolutional models get: the kernels then write in memory
    order). Prediction, H200, K=1024: 805 MB written in about 0.2 ms; the copy moves twice that."""
    K = SIZES[device]["K_int"]
    args = intervene_args(device, K)
    if layout == "channels_last":
        args["out"] = args["out"].contiguous(memory_format=torch.channels_last)
    moved = args["out"].numel() * 4  # the outputs are written once; the base and patches stay in cache
    src = torch.rand_like(args["out"]) if backend == "copy" else None
    # baseline: reads and writes the same number of output bytes
    fn, moved = op_or_copy(backend, device, lambda: ops.intervene(backend=backend, **args),
                           lambda: args["out"].copy_(src), moved)
    measure(benchmark, fn, device, f"intervene {device} K={K} 256x256 {layout}", K, moved)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_psnr(benchmark, device, backend, layout):
    K = SIZES[device]["K_roi"]
    g = gen(device, 1)
    outputs = in_layout(torch.rand(K, 3, 256, 256, generator=g, device=device), layout)
    roi = ROI(152, 96, 32, 32)
    target = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8, device=device)
    moved = K * 3 * 32 * 32 * 4  # only the ROI must be read
    src = outputs[:, :, 152:184, 96:128]
    dst = torch.empty_like(src) if backend == "copy" else None
    # baseline: copies the ROI (reads it and writes it: twice the bytes)
    fn, moved = op_or_copy(backend, device, lambda: ops.roi_psnr(outputs, target, roi, backend=backend),
                           lambda: dst.copy_(src), moved)
    measure(benchmark, fn, device, f"roi_psnr {device} K={K} 32x32 ROI of 256x256 {layout}", K, moved)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_sq_err_multi(benchmark, device, backend, layout):
    """Every 32-px ROI (64) of 256x256 outputs in one pass: the whole output must be read once."""
    K = SIZES[device]["K_roi"] // 4
    g = gen(device, 2)
    outputs = in_layout(torch.rand(K, 3, 256, 256, generator=g, device=device), layout)
    target = torch.randint(0, 256, (3, 256, 256), generator=g, dtype=torch.uint8, device=device)
    rois = roi_grid(256, 256, 32)
    dst = torch.empty_like(outputs) if backend == "copy" else None
    # baseline: reads and writes the outputs
    fn, moved = op_or_copy(backend, device, lambda: ops.roi_sq_err_multi(outputs, target, rois, backend=backend),
                           lambda: dst.copy_(outputs), outputs.numel() * 4)
    measure(benchmark, fn, device, f"roi_sq_err_multi {device} K={K} 64 ROIs of 256x256 {layout}", K, moved)
