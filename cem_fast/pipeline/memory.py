"""Memory the run may use: what the host and the device have free, what a sampling plan would hold, and how an
out-of-memory error is recognised."""
from __future__ import annotations

import os
from typing import Optional

import torch

SAMPLE_BYTES = 64  # host bytes per intervention and ROI: scores, done flags, block / draw / id arrays, copies
WINDOW_TABLE_BYTES = 48  # host bytes per reachable block and ROI of the windows' tables (changed rectangles)


def available_memory() -> Optional[int]:
    """Bytes of host memory available (MemAvailable), or None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free where per-run tensors would go: the device's on CUDA, else the host's (one place, so that a test
    can stand for either)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory()


def is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(e, oom_types) or "out of memory" in str(e).lower()


def shared_pass_bytes(blocks: int, coarse: int, fine: int, n_rois: int) -> int:
    """Host bytes that one pass serving ``n_rois`` ROIs holds per (block, ROI): samples and the windows' tables."""
    return blocks * n_rois * (max(coarse, fine, 1) * SAMPLE_BYTES + WINDOW_TABLE_BYTES)


def check_sample_memory(blocks: int, coarse: int, fine: int, n_rois: int) -> None:
    """Refuse, before allocating, a sampling plan whose per-intervention arrays would not fit in host memory."""
    need = blocks * max(coarse, fine, 1) * n_rois * SAMPLE_BYTES
    avail = available_memory()
    if avail is not None and need > avail // 2:
        raise ValueError(f"coarse={coarse}, fine={fine} for {blocks} blocks x {n_rois} ROIs needs about "
                         f"{need / 2**30:.1f} GiB of host memory for the samples, more than half of the "
                         f"{avail / 2**30:.1f} GiB available: lower coarse / fine / samples")
