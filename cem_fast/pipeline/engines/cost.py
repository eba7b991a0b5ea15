"""What a forward of the model costs, counted rather than timed (a timing taken while the machine is busy with
something else would steer the engine choice): its operators, each a fixed cost whatever its size, and its
multiply-accumulates per input pixel, the part that shrinks with the input.

Both are counted on one forward of a small input under a dispatch mode that sees every operator the model runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# Fixed costs, whatever the input's size, counted as the convolution work that takes as long (measured on the
# 2-core CPU by benchmarks/node_cost.py: benchmarks/results/cpu-2core-2026-12-07-node-cost.md):
OP_COST_MACS = 300_000  # one operator of a plain forward (dispatch, allocation, a kernel's set-up)
BATCH_COST_MACS = 6_000_000  # one more batch of the pipeline around the model (draws, scoring, transfers)
_CONVOLUTION = flop_registry[torch.ops.aten.convolution]  # the formula of every convolution op the mode sees


@dataclass(frozen=True)
class ForwardCount:
    """One forward's operators (views excluded) and multiply-accumulates per input pixel (matrix products and
    convolutions by their formula, any other operator one per output element)."""

    ops: int
    macs_per_px: float

    def fixed_macs(self, batches: int) -> float:
        """What ``batches`` more batches cost whatever their size."""
        return batches * (BATCH_COST_MACS + self.ops * OP_COST_MACS)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.macs = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        self.ops += 1
        formula = flop_registry.get(func._overloadpacket)
        name = func._overloadpacket.__name__
        if formula is not None:
            self.macs += formula(*args, **kwargs, out_val=out) // 2
        elif name.startswith("conv") and len(args) >= 2:  # conv2d, conv_transpose2d... (not decomposed here)
            self.macs += _CONVOLUTION(args[0], args[1], None, None, None, None, "transpose" in name,
                                      out_val=out) // 2
        elif isinstance(out, torch.Tensor):
            self.macs += out.numel()
        return out


def count_forward(forward, inp: torch.Tensor) -> ForwardCount:
    """Operators and multiply-accumulates per input pixel of ``forward(inp)`` (``inp``: (1, C, h, w))."""
    counter = _Counter()
    with counter:
        forward(inp)
    return ForwardCount(counter.ops, counter.macs / max(1, inp.shape[-2] * inp.shape[-1]))
