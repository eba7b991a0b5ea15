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
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .. import distributed, ops, reference, rng
from ..cache import RunCache, missing_ranges
from ..geometry import ROI, rois_finite
from ..locality import Window
from ..options import intervention_ids

if TYPE_CHECKING:
    from .model import ModelForward
    from .plan import RunPlan


def draw_patches(plan: "RunPlan", blocks: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(intervention ids, patch indices) of interventions (blocks[k], draws[k]): keyed by (seed, block, draw)."""
    ids = intervention_ids(blocks, draws)
    return ids, rng.patch_draws(plan.seed, ids, plan.bank_in.shape[0])


def is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(e, oom_types) or "out of memory" in str(e).lower()


class RoiScorer:
    """Model outputs of the window -> (K, n_rois) float64 ROI PSNRs, NaN where a ROI holds NaN/Inf.

    The contract for one ROI and for many is the same: the target is the ground truth (or any 0..255 reference)
    of the whole window, each ROI's squared error is reduced on the device and turned into PSNR with its number
    of values. One ROI reads its part of the target through the single-ROI kernel, many share one pass."""

    def __init__(self, target_window: torch.Tensor, rois: list[ROI], backend: str):
        self.rois, self.backend = rois, backend
        self.target = target_window
        self.values = torch.tensor([r.height * r.width * target_window.shape[0] for r in rois],
                                   dtype=torch.float64, device=target_window.device)  # once: no copy per batch
        ys, xs = rois[0].slices()
        self._roi_target = target_window[:, ys, xs].contiguous() if len(rois) == 1 else None

    def sq_err(self, out: torch.Tensor) -> torch.Tensor:
        if self._roi_target is not None:
            return ops.roi_sq_err_unchecked(out, self._roi_target, self.rois[0], backend=self.backend).unsqueeze(1)
        return ops.roi_sq_err_multi_unchecked(out, self.target, self.rois, backend=self.backend)

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        scores = reference.psnr_from_sq_err(self.sq_err(out), self.values)
        finite = rois_finite(out, self.rois)
        # NaN/Inf in the ROI: recorded as NaN so that it is reported, never averaged into the map
        return torch.where(finite, scores, torch.full_like(scores, float("nan")))


class Runner:
    """Runs the interventions of a :class:`~cem_fast.pipeline.plan.RunPlan` (see the module docstring)."""

    def __init__(self, plan: "RunPlan", forward: Optional["ModelForward"] = None, cache: Optional[RunCache] = None,
                 progress: bool = False):
        self.plan = plan
        self.forward = forward or plan.forward
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
        self._buffer: Optional[torch.Tensor] = None
        self._window_buffers: dict = {}  # per window shape (intervention-centred windows)
        self._changed: Optional[object] = None  # their scorer, made from the unintervened output on first use
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

    def _input_buffer(self, k: int) -> torch.Tensor:
        base = self.plan.prep.base
        if self._buffer is None or self._buffer.shape[0] < k:
            self._buffer = torch.empty((k, base.shape[0], self.win.h, self.win.w), dtype=base.dtype,
                                       device=base.device).contiguous(memory_format=self.forward.memory_format)
        return self._buffer[:k]

    def order(self, blocks: np.ndarray) -> np.ndarray:
        """Blocks in the order they run: grouped by window shape when interventions run on windows of their own
        (a batch then holds one shape, or few), else as given."""
        if not len(blocks):
            return blocks
        if self._incremental() is not None:
            return blocks[np.argsort(self.plan.incremental.sort_key(blocks), kind="stable")]
        if self.plan.windows is None:
            return blocks
        return blocks[np.argsort(self.plan.windows.shape_key(blocks), kind="stable")]

    def _scores(self, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        p = self.plan
        if self._incremental() is not None:
            return p.incremental.scores(p, self.forward, self._changed_scorer(), blocks, draws)
        if p.windows is not None:
            return self._window_scores(blocks, draws)
        ids, patch_idx = draw_patches(p, blocks, draws)
        out_buf = self._input_buffer(len(blocks)) if p.task.supports_windows else None
        inputs = p.task.intervene(p.prep, p.bank_in, patch_idx, blocks, ids, p.options.seed, p.backend,
                                  window=p.locality.window, out=out_buf)
        return self.score(self.forward(inputs, owned=out_buf is not None))

    def _window_scores(self, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Each intervention on its own window; runs of equal window shape share a forward."""
        from .windows import windows_inputs
        w = self.plan.windows
        rows = w.rows(blocks.cpu().numpy())
        keys = w.shape_key(w.blocks[rows])
        cuts = [0, *(np.flatnonzero(np.diff(keys)) + 1), len(rows)]
        parts = []
        for a, b in zip(cuts, cuts[1:]):
            vh, vw = (int(v) for v in w.inputs[rows[a], 2:])
            buf = self._window_buffer(vh, vw, b - a)
            inputs = windows_inputs(self.plan, w, blocks[a:b], draws[a:b], rows[a:b], out=buf)
            parts.append(self._changed_scorer()(self.forward(inputs, owned=True), rows[a:b]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _window_buffer(self, vh: int, vw: int, k: int) -> torch.Tensor:
        base = self.plan.prep.base
        buf = self._window_buffers.get((vh, vw))
        if buf is None or buf.shape[0] < k:
            buf = torch.empty((k, base.shape[0], vh, vw), dtype=base.dtype, device=base.device) \
                .contiguous(memory_format=self.forward.memory_format)
            self._window_buffers[(vh, vw)] = buf
        return buf[:k]

    def _incremental(self):
        """The layer-by-layer engine when this runner may use it: its unintervened activations were computed at
        this runner's precision (the fp32 re-check of a reduced-precision run uses the windows or the crop)."""
        inc = self.plan.incremental
        return inc if inc is not None and inc.precision == self.forward.precision else None

    def _changed_scorer(self):
        if self._changed is None:
            from .windows import ChangedRegionScorer
            s = self.plan.task.scale
            same = self.forward.precision == self.plan.forward.precision  # else the base must be recomputed
            if self.plan.locality.window is None and self.plan.full_output is not None and same:
                base, origin = self.plan.full_output[0], (0, 0)
            else:
                if self.origin_output is None:
                    self.origin()
                base, origin = self.origin_output, (self.win.y * s, self.win.x * s)
            tables = self.plan.windows if self.plan.incremental is None else self.plan.incremental.windows
            self._changed = ChangedRegionScorer(self.plan, tables, base, origin)
        return self._changed

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
        self._buffer = None
        self._window_buffers.clear()
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
