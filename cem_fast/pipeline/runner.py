"""Running interventions: batches of (block, draw) -> intervened inputs -> model -> ROI scores, on the device.

Every batch is written by the fused intervene op into one reused input buffer (the crop of the locality window, in
the model's memory format) and reduced to ROI squared errors on the device; only the (K, n_rois) scores reach the
host, by an asynchronous copy into pinned memory read one batch later (:class:`HostCopies`), so the device never
waits for the host. With a cache every finished batch is stored at once, and a re-run computes only what is
missing. A batch that runs out of memory is split in halves (and the batch size lowered) until it fits. Under a
``torch.distributed`` process group each rank computes an equal, contiguous slice of what is missing and the
scores are gathered, so every rank holds them all (:mod:`cem_fast.distributed`).
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch

from .. import distributed
from ..cache import RunCache, missing_ranges
from ..geometry import ROI
from ..locality import LocalityPlan, Window
from ..options import intervention_ids
from ..threads import ThreadGovernor
from .memory import is_oom
from .model import ModelForward
from .plan import RunPlan
from .scoring import ChangedRegionScorer, RoiScorer


class Runner:
    """Runs the interventions of a :class:`~cem_fast.pipeline.plan.RunPlan` (see the module docstring)."""

    def __init__(self, plan: RunPlan, forward: Optional[ModelForward] = None, cache: Optional[RunCache] = None,
                 progress: bool = False, threads: Optional[ThreadGovernor] = None):
        self.plan = plan
        self.threads = threads  # re-fits the CPU threads to the load between batches
        self.forward = forward or plan.forward
        self.engine = plan.engine.for_precision(self.forward.precision)
        self.cache = cache
        self.batch_size = plan.batch_size
        s = plan.task.scale
        C, h, w = plan.prep.base.shape
        self.win = plan.locality.window or Window(0, 0, h, w)
        oy, ox = self.win.y * s, self.win.x * s
        local_rois = [ROI(r.y - oy, r.x - ox, r.height, r.width) for r in plan.rois]
        target = plan.prep.gt[:, oy:oy + self.win.h * s, ox:ox + self.win.w * s]
        self.score = RoiScorer(target, local_rois, plan.backend)
        self.forwards = self.reused = self.oom_backoffs = 0
        self.by_rank: Optional[np.ndarray] = None  # interventions each rank computed, under a process group
        self._buffers: dict = {}  # input buffers per (h, w), reused batch after batch
        self._changed: Optional[ChangedRegionScorer] = None  # made from the unintervened output on first use
        # the whole output's base error table, when one was made for many runners of one run (a field's chunks)
        self.whole_base_sat: Optional[torch.Tensor] = None
        self._copies = HostCopies()
        self.origin_output: Optional[torch.Tensor] = None
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=0, unit="fwd", desc="CEM", leave=False, file=sys.stderr)

    def origin(self) -> np.ndarray:
        """(n_rois,) Y(I) from the unintervened window, through the same forward and reduction as the samples."""
        out = self.forward(self.win.crop(self.plan.prep.base).unsqueeze(0))
        self.forwards += 1
        self.origin_output = out[0]  # the window's unintervened output, kept for the pictures
        return self.score(out)[0].cpu().numpy()

    def buffer(self, k: int, h: int, w: int) -> torch.Tensor:
        """A (k, C, h, w) input buffer in the model's memory format, reused by later batches of that shape."""
        base = self.plan.prep.base
        buf = self._buffers.get((h, w))
        if buf is None or buf.shape[0] < k:
            buf = torch.empty((k, base.shape[0], h, w), dtype=base.dtype, device=base.device) \
                .contiguous(memory_format=self.forward.memory_format)
            self._buffers[(h, w)] = buf
        return buf[:k]

    def changed_scorer(self, tables) -> ChangedRegionScorer:
        """The scorer of outputs that hold only what an intervention changed, for the windows' ``tables``: built
        once, from the whole output when the run is not cropped and at this runner's precision, else from the
        crop's unintervened output (computed here when it is not yet)."""
        if self._changed is not None and self._changed.windows is not tables:  # narrowed: the same base errors
            self._changed = self._changed.for_windows(tables)
        if self._changed is None:
            plan, s = self.plan, self.plan.task.scale
            same = self.forward.precision == plan.forward.precision  # else the base must be recomputed
            sat = None
            if plan.locality.window is None and plan.full_output is not None and same:
                base, origin, sat = plan.full_output[0], (0, 0), self.whole_base_sat
            else:
                if self.origin_output is None:
                    self.origin()
                base, origin = self.origin_output, (self.win.y * s, self.win.x * s)
            self._changed = ChangedRegionScorer(plan.prep.gt, plan.rois, s, tables, base, origin, sat)
        return self._changed

    def narrow_to(self, pairs: np.ndarray) -> None:
        """Cut the engine's tables to ``pairs`` ((n_rois, blocks) bool, within the reach): an intervention then
        computes what it changes in its block's ROIs of ``pairs`` alone and scores the others as unchanged (Y(I)).
        Coarse-to-fine's fine stage with many ROIs: only the ROIs that gated a block read its fine draws."""
        plan, g = self.plan, self.plan.grid
        narrow = plan.but(locality=LocalityPlan(pairs.reshape(len(plan.rois), g.rows, g.cols), plan.locality.window,
                                                plan.locality.info))
        self.engine = plan.engine.for_rois(narrow).for_precision(self.forward.precision)

    def order(self, blocks: np.ndarray) -> np.ndarray:
        """Blocks in the order the engine runs them best (batches of one input shape, or few)."""
        return self.engine.order(blocks)

    def _scores(self, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        return self.engine.scores(self, blocks, draws)

    def run(self, stage: str, blocks: torch.Tensor, draws: torch.Tensor) -> np.ndarray:
        """(n, n_rois) ROI PSNRs of interventions (blocks[i], draws[i])."""
        n, width = blocks.shape[0], len(self.plan.rois)
        dev = self.plan.device
        # the intervention ids of the rows, for the cache's chunks (from the host copies: no device round trip)
        ids = intervention_ids(blocks.cpu().numpy().astype(np.int64), draws.cpu().numpy().astype(np.int64))
        blocks, draws = blocks.to(dev), draws.to(dev)
        if self.cache is not None:  # chunks carry the ids they hold and a checksum: others are recomputed
            scores, done = self.cache.load(stage, n, width, ids)
        else:
            scores, done = np.full((n, width), np.nan), np.zeros(n, dtype=bool)
        done = distributed.agree_done(stage, done, ids)  # what every rank has: the same on all
        self.reused += int(done.sum())
        if self.bar is not None:
            self.bar.total = max(self.bar.total, self.bar.n + n)  # an unplanned stage (the fp32 re-check)
            self.bar.update(int(done.sum()))
        todo = np.flatnonzero(~done)
        start, end = distributed.shard(len(todo))  # this rank's slice of what is missing (all of it alone)
        skip = np.ones(n, dtype=bool)
        skip[todo[start:end]] = False
        _Batches(self, stage, blocks, draws, ids, scores).run(list(missing_ranges(skip, self.batch_size))[::-1])
        if distributed.world()[1] > 1 and len(todo):
            self._share(stage, scores, todo)
        return scores

    def _share(self, stage: str, scores: np.ndarray, todo: np.ndarray) -> None:
        """Under a process group: the other ranks' slices of ``todo`` into ``scores``, and their forwards counted,
        so that the run's totals are the study's (as in one process)."""
        rank, size = distributed.world()
        slices = [distributed.shard(len(todo), r, size) for r in range(size)]
        start, end = slices[rank]
        scores[todo] = distributed.gather_scores(scores[todo[start:end]], len(todo), scores.shape[1], stage)
        counts = np.array([e - s for s, e in slices])
        self.by_rank = counts if self.by_rank is None else self.by_rank + counts
        others = len(todo) - (end - start)
        self.forwards += others
        if self.bar is not None:
            self.bar.update(others)

    def expect(self, total: int) -> None:
        """The interventions this run will compute in all (the bar's total): never below what is done, so the bar
        only moves forward (an upper bound first, then the real count once the fine stage is known)."""
        if self.bar is not None:
            self.bar.total = max(int(total), self.bar.n)
            self.bar.refresh()

    def back_off(self, s: int, e: int) -> int:
        """After an out-of-memory error on batch [s, e): the smaller batch size to retry with."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if e - s == 1:
            raise RuntimeError(f"out of memory with a batch of 1 intervention: the model does not fit on "
                               f"{self.plan.device}") from None
        self._buffers.clear()
        self.batch_size = (e - s + 1) // 2
        self.oom_backoffs += 1
        return self.batch_size

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _Batches:
    """One call of :meth:`Runner.run`: the pending ranges, and the batch whose scores are on their way to the
    host (collected while the next batch runs; kept even when the run is interrupted)."""

    def __init__(self, runner: Runner, stage: str, blocks, draws, ids: np.ndarray, scores: np.ndarray):
        self.r, self.stage, self.blocks, self.draws, self.ids, self.scores = runner, stage, blocks, draws, ids, scores
        self.queued: Optional[tuple[int, int, tuple]] = None

    def collect(self) -> None:
        s, e, copy = self.queued
        self.queued = None
        chunk = HostCopies.finish(copy)
        self.scores[s:e] = chunk
        if self.r.cache is not None:
            self.r.cache.save(self.stage, s, chunk, self.ids[s:e])
        self.r.forwards += e - s
        if self.r.bar is not None:
            self.r.bar.update(e - s)

    def run(self, pending: list[tuple[int, int]]) -> None:
        try:
            while pending:
                s, e = pending.pop()
                if self.r.threads is not None:
                    self.r.threads.recheck()
                size = self.r.batch_size
                if e - s > size:  # the batch size was lowered: split what was planned with the old one
                    pending += [(s + size, e), (s, s + size)]
                    continue
                try:
                    dev_scores = self.r._scores(self.blocks[s:e], self.draws[s:e])
                except Exception as err:
                    if not is_oom(err):
                        raise
                    half = self.r.back_off(s, e)
                    pending += [(s + half, e), (s, s + half)]
                    continue
                copy = self.r._copies.start(dev_scores)  # queued behind the batch: the host does not wait here
                if self.queued is not None:
                    self.collect()  # the previous batch, long finished while this one runs
                self.queued = (s, e, copy)
        except BaseException:
            if self.queued is not None:  # keep the finished batch (a crash or an interrupt loses nothing done)
                try:
                    self.collect()
                except Exception:
                    pass
            raise
        if self.queued is not None:
            self.collect()


class HostCopies:
    """Batch scores copied to the host without stalling the device. On CUDA a batch's scores go into one of two
    pinned buffers by an asynchronous copy queued right behind the batch, with an event after it; they are read
    one batch later (:meth:`finish` waits for that event only, while the device runs the next batch), so the
    device never idles for the host. Elsewhere the scores are on the host already."""

    def __init__(self):
        self._pinned: list[Optional[torch.Tensor]] = [None, None]
        self._events: list = [None, None]
        self._turn = 0

    def start(self, dev_scores: torch.Tensor) -> tuple:
        if dev_scores.device.type != "cuda":
            return dev_scores, None
        i, self._turn = self._turn, self._turn ^ 1
        buf = self._pinned[i]
        if buf is None or buf.shape[0] < dev_scores.shape[0] or buf.shape[1:] != dev_scores.shape[1:]:
            buf = self._pinned[i] = torch.empty(dev_scores.shape, dtype=dev_scores.dtype, pin_memory=True)
            self._events[i] = torch.cuda.Event()
        host = buf[:dev_scores.shape[0]]
        host.copy_(dev_scores, non_blocking=True)
        self._events[i].record(torch.cuda.current_stream(dev_scores.device))
        return host, self._events[i]

    @staticmethod
    def finish(copy: tuple) -> np.ndarray:
        host, event = copy
        if event is not None:
            event.synchronize()
        return host.cpu().numpy()
