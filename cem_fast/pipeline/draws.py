"""The draws of a run and the inputs they make: intervention ``(block, draw)`` takes the patch keyed by
``(seed, block, draw)`` and the task writes it, degraded, into the input (the whole input, the locality crop, or a
window of its own). Every engine, the locality probe and the control variates draw through here.

``plan`` below is the run's :class:`~cem_fast.pipeline.plan.RunPlan` (which imports this module: not imported
here)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import rng
from ..options import intervention_ids

DRAWS_VERSION = "hash-v1"  # how (seed, block, draw) map to patches and noise; part of the cache key


def patch_indices(seed: int, ids, bank_size: int):
    """The bank index of each intervention id (tensor in, tensor out)."""
    return rng.patch_draws(seed, ids, bank_size)


def draw_patches(plan, blocks: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(intervention ids, patch indices) of interventions (blocks[k], draws[k])."""
    ids = intervention_ids(blocks, draws)
    return ids, patch_indices(plan.seed, ids, plan.bank_in.shape[0])


def intervened(plan, blocks: torch.Tensor, draws: torch.Tensor, window=None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The inputs of interventions (blocks[k], draws[k]): ``window`` None (the whole input), a
    :class:`~cem_fast.locality.Window` (that crop of each) or ``(origins (K, 2), (h, w))`` (a window of its own for
    each); written into ``out`` when given."""
    ids, patch_idx = draw_patches(plan, blocks, draws)
    return plan.task.intervene(plan.prep, plan.bank_in, patch_idx, blocks, ids, plan.seed, plan.backend,
                               window=window, out=out)


def verification_inputs(plan, block_ids: np.ndarray, window) -> torch.Tensor:
    """Draw 0 of each block in ``block_ids``, written into crops of ``window``: what locality verifies with."""
    b = torch.from_numpy(block_ids).to(plan.device)
    return intervened(plan, b, torch.zeros_like(b), window=window)
