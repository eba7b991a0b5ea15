"""The fallback engine: every intervention written into the locality crop (or the whole input) and run whole."""
from __future__ import annotations

import torch

from ..draws import intervened
from .base import EngineBase


class CropEngine(EngineBase):
    name = "crop"

    def scores(self, runner, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        p = runner.plan
        # tasks that write crops write into the runner's reused buffer (in the model's memory format)
        out = runner.buffer(len(blocks), runner.win.h, runner.win.w) if p.task.supports_windows else None
        inputs = intervened(p, blocks, draws, window=p.locality.window, out=out)
        return runner.score(runner.forward(inputs, owned=out is not None))
