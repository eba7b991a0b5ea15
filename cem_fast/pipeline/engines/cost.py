"""What a forward of the model costs, counted rather than timed (a timing taken while the machine is busy with
something else would steer the engine choice): its operators, each a fixed cost whatever its size, and its
multiply-accumulates per input pixel, the part that shrinks with the input.

Both are counted on one forward of a small input under a dispatch mode that sees every operator the model runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Fixed costs, whatever the input's size, counted as the convolution work that takes as long (measured on the
# 2-core CPU by benchmarks/node_cost.py: benchmarks/results/cpu-2core-2026-12-07-node-cost.md):
# the lower ends (one thread, quiet): a choice is refused only where it clearly cannot pay for itself
OP_COST_MACS = 1_000_000  # one operator of a plain forward (dispatch, allocation, a kernel's set-up)
BATCH_COST_MACS = 17_000_000  # one more batch of the pipeline around the model (draws, scoring, transfers)


@dataclass(frozen=True)
class ForwardCount:
    """One forward's operators (views excluded) and multiply-accumulates per input pixel (matrix products and
    convolutions from their shapes, any other operator one per output element)."""

    ops: int
    macs_per_px: float

    def fixed_macs(self, batches: int) -> float:
        """What ``batches`` more batches cost whatever their size."""
        return batches * (BATCH_COST_MACS + self.ops * OP_COST_MACS)


def _macs(name: str, args: tuple, out) -> int:
    """Multiply-accumulates of a matrix product or a convolution (any form the mode sees: conv2d, convolution,
    mkldnn_convolution, conv_transpose2d...), from the shapes; 0 for other operators."""
    if not isinstance(out, torch.Tensor) or len(args) < 2 or not isinstance(args[1], torch.Tensor):
        return 0
    if name.startswith(("conv", "_conv", "mkldnn_conv", "cudnn_conv", "miopen_conv", "_slow_conv")):
        x, w = args[0], args[1]
        transposed = "transpose" in name or (name in ("convolution", "_convolution") and len(args) > 6 and
                                             bool(args[6]))
        # weight (out, in / groups, *k), or (in, out / groups, *k) transposed: each output (input) element
        # gathers (scatters) w.shape[1] * prod(k) products
        return (x.numel() if transposed else out.numel()) * w[0].numel()
    if name in ("mm", "bmm", "matmul", "linear"):
        return out.numel() * args[0].shape[-1]
    if name in ("addmm", "baddbmm") and len(args) > 2:
        return out.numel() * args[1].shape[-1]
    return 0


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.macs = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        self.ops += 1
        macs = _macs(func._overloadpacket.__name__, args, out)
        self.macs += macs if macs else out.numel() if isinstance(out, torch.Tensor) else 0
        return out


def count_forward(forward, inp: torch.Tensor) -> ForwardCount:
    """Operators and multiply-accumulates per input pixel of ``forward(inp)`` (``inp``: (1, C, h, w))."""
    counter = _Counter()
    with counter:
        forward(inp)
    return ForwardCount(counter.ops, counter.macs / max(1, inp.shape[-2] * inp.shape[-1]))
