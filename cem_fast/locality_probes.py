"""The NaN probes and checks that a locality plan (:mod:`cem_fast.locality`) is built from: the input window
(:class:`Window`), the prober that runs the model on crops holding NaN and says which ROIs stay finite, the
pixel-tight crop, and the verifications: NaN outside each ROI's reach must not reach it, and the crop must give
the ROI the values of the whole input (or of the reference window) to the round-off of the precision in use.
A check that fails raises :class:`NoLocality`: the plan then falls back (or runs without locality) and says why.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .geometry import ROI, BlockGrid, rois_finite

# Largest |ROI output (crop) - ROI output (reference)| accepted, in [0, 1] output units, per precision.
VERIFY_TOL = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2, "fp16": 1e-2}

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Window:
    """A rectangle of input pixels ``[y, y + h) x [x, x + w)``."""

    y: int
    x: int
    h: int
    w: int

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        return t[..., self.y:self.y + self.h, self.x:self.x + self.w]

    def as_list(self) -> list[int]:
        return [self.y, self.x, self.h, self.w]


@contextlib.contextmanager
def nan_probes():
    """cuDNN off around forwards whose inputs hold NaN (the probes). cuDNN may pick Winograd or FFT convolutions,
    which compute a whole output tile from transforms of all its inputs: one NaN then spreads over whole tiles,
    the measured spread exceeds the true reach, and the windows and the layer-by-layer engine are refused without
    an error (the map is still right, only slower). Without cuDNN, ATen's own convolution (im2col and a matrix
    product) takes each output from its receptive field alone. Only ``enabled`` is touched (and restored, also
    after an error): ``torch.backends.cudnn.flags()`` would also reset TF32, determinism and, in newer torch, the
    fp32 precision setting to its own defaults. No effect on the CPU."""
    c = torch.backends.cudnn
    saved = c.enabled
    c.enabled = False
    try:
        yield
    finally:
        c.enabled = saved


def block_span(index: int, in_block: int, limit: int) -> tuple[int, int]:
    return index * in_block, min((index + 1) * in_block, limit)


def forward_batched(forward: Forward, inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [forward(inputs[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]


class Prober:
    def __init__(self, forward: Forward, base: torch.Tensor, grid: BlockGrid, rois: Sequence[ROI],
                 batch_size: int):
        self.forward, self.base, self.grid, self.rois = forward, base, grid, list(rois)
        self.batch_size = max(1, batch_size)
        self.forwards = 0

    def window_of_blocks(self, r0: int, r1: int, c0: int, c1: int) -> Window:
        g = self.grid
        y0, y1 = r0 * g.in_block, min(r1 * g.in_block, g.in_h)
        x0, x1 = c0 * g.in_block, min(c1 * g.in_block, g.in_w)
        return Window(y0, x0, y1 - y0, x1 - x0)

    def run(self, make_inputs: Callable[[int, int], torch.Tensor], n: int, win: Window) -> torch.Tensor:
        """(n, n_rois) bool: ROI finite for each of ``n`` inputs (crops of ``win``), built a batch at a time by
        ``make_inputs(start, end)`` so that a large window never holds all its probe inputs at once."""
        s = self.grid.scale
        finite = []
        for i in range(0, n, self.batch_size):
            inputs = make_inputs(i, min(n, i + self.batch_size))
            with nan_probes():
                out = self.forward(inputs)
            want = (inputs.shape[0], inputs.shape[1], win.h * s, win.w * s)
            if tuple(out.shape) != want:
                raise NoLocality(f"the model's output on a {win.h}x{win.w} crop is {tuple(out.shape)}, "
                                  f"expected {want}")
            finite.append(rois_finite(out, self.rois, win.y * s, win.x * s).cpu())
            self.forwards += inputs.shape[0]
        return torch.cat(finite)

    def reached(self, win: Window, rows: Sequence[tuple[int, int]],
                cols: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """One probe input per span: NaN in input rows ``[a, b)`` of ``rows``, then in the columns of ``cols``, of
        the window's crop. Returns (n_rois, len(rows)), (n_rois, len(cols)): NaN reached that ROI."""
        crop = win.crop(self.base)
        spans = [(0, a - win.y, b - win.y) for a, b in rows] + [(1, a - win.x, b - win.x) for a, b in cols]

        def make_inputs(i0: int, i1: int) -> torch.Tensor:
            inputs = crop.unsqueeze(0).repeat(i1 - i0, 1, 1, 1)
            for i in range(i0, i1):
                axis, a, b = spans[i]
                if axis == 0:
                    inputs[i - i0, :, a:b, :] = float("nan")
                else:
                    inputs[i - i0, :, :, a:b] = float("nan")
            return inputs

        reached = ~self.run(make_inputs, len(spans), win).numpy().T  # (n_rois, len(spans))
        return reached[:, :len(rows)], reached[:, len(rows):]

    def probe(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """NaN in each block-row, then each block-column of the window: (n_rois, nrows), (n_rois, ncols) reached."""
        g = self.grid
        rows = [block_span(r, g.in_block, g.in_h) for r in range(r0, r1)]
        cols = [block_span(c, g.in_block, g.in_w) for c in range(c0, c1)]
        return self.reached(self.window_of_blocks(r0, r1, c0, c1), rows, cols)


class NoLocality(Exception):
    pass


def verify_reach_locally(prober: Prober, grid: BlockGrid, rois, reach: np.ndarray, ring: int) -> np.ndarray:
    """Each ROI on its reach grown by ``ring`` blocks, with NaN in every block of that window outside its reach:
    the ROI must stay finite. ROIs whose windows have one shape run as one batch. Returns the windows (n, 4)."""
    g, s, ib = grid, grid.scale, grid.in_block
    spans, windows = [], []
    for j in range(len(rois)):
        rr, cc = np.flatnonzero(reach[j].any(1)), np.flatnonzero(reach[j].any(0))
        span = (max(0, int(rr[0]) - ring), min(g.rows, int(rr[-1]) + 1 + ring),
                max(0, int(cc[0]) - ring), min(g.cols, int(cc[-1]) + 1 + ring))
        spans.append(span)
        windows.append(prober.window_of_blocks(*span).as_list())
    windows = np.array(windows, dtype=np.int64)
    shapes = windows[:, 2] * 1_000_003 + windows[:, 3]
    for key in np.unique(shapes):
        group = np.flatnonzero(shapes == key)
        for i in range(0, len(group), prober.batch_size):
            part = group[i:i + prober.batch_size]
            inputs = []
            for j in part:
                r0, r1, c0, c1 = spans[j]
                y, x, h, w = (int(v) for v in windows[j])
                outside = torch.from_numpy(~reach[j, r0:r1, c0:c1])
                mask = outside.repeat_interleave(ib, 0).repeat_interleave(ib, 1)[:h, :w].to(prober.base.device)
                inputs.append(prober.base[:, y:y + h, x:x + w].masked_fill(mask, float("nan")))
            with nan_probes():
                out = prober.forward(torch.stack(inputs))
            prober.forwards += len(part)
            h, w = (int(v) for v in windows[part[0], 2:])
            if tuple(out.shape[-2:]) != (h * s, w * s):
                raise NoLocality(f"the model's output on a {h}x{w} crop is {tuple(out.shape)}")
            for k, j in enumerate(part):
                q, oy, ox = rois[j], int(windows[j, 0]) * s, int(windows[j, 1]) * s
                roi_out = out[k, :, q.y - oy:q.y - oy + q.height, q.x - ox:q.x - ox + q.width]
                if not bool(torch.isfinite(roi_out).all()):
                    raise NoLocality(f"NaN from outside the reach that one block's spread predicts reached ROI "
                                      f"{int(j)}: the model does not treat every block alike")
    return windows


TIGHT_ALIGN = 4  # input px: the tight crop's size is rounded up to a multiple (CPU convolutions run faster)


def tight_crop(prober: Prober, grid: BlockGrid, block_crop: Window) -> Window:
    """The crop cut to the input pixels that reach some ROI: NaN in each pixel row (column) of the outermost
    reached block-rows (block-columns). DnCNN-20's 32-px ROI needs 72 px of its 80-px block crop: 0.81x the pixels."""
    ib = grid.in_block
    c = block_crop
    ys = sorted({*range(c.y, min(c.y + ib, c.y + c.h)), *range(max(c.y, c.y + c.h - ib), c.y + c.h)})
    xs = sorted({*range(c.x, min(c.x + ib, c.x + c.w)), *range(max(c.x, c.x + c.w - ib), c.x + c.w)})
    # probed inside the block crop: every path from an input pixel to the ROI runs through positions the ROI
    # depends on, all inside it (0.7x the probe window's pixels for DnCNN; verification checks the result anyway)
    rows, cols = prober.reached(block_crop, [(y, y + 1) for y in ys], [(x, x + 1) for x in xs])
    rows, cols = rows.any(0), cols.any(0)  # reached some ROI
    if not rows.any() or not cols.any():
        return block_crop
    y0, y1 = ys[int(np.argmax(rows))], ys[len(ys) - 1 - int(np.argmax(rows[::-1]))] + 1
    x0, x1 = xs[int(np.argmax(cols))], xs[len(xs) - 1 - int(np.argmax(cols[::-1]))] + 1
    y0, y1 = aligned(y0, y1, grid.in_h)
    x0, x1 = aligned(x0, x1, grid.in_w)
    return Window(y0, x0, y1 - y0, x1 - x0)


def aligned(a: int, b: int, limit: int) -> tuple[int, int]:
    """[a, b) grown to a multiple of TIGHT_ALIGN pixels (at the end, else at the start), inside [0, limit)."""
    grow = -(b - a) % TIGHT_ALIGN
    b2 = min(limit, b + grow)
    return max(0, a - (grow - (b2 - b))), b2


def verify_reach(prober: Prober, grid, rois, reach, reference: Window) -> None:
    g = grid
    base_ref = reference.crop(prober.base)
    # (a) NaN in every block outside each ROI's reach (inside the reference region) at once: the ROI stays finite.
    r0, r1 = reference.y // g.in_block, -(-(reference.y + reference.h) // g.in_block)
    c0, c1 = reference.x // g.in_block, -(-(reference.x + reference.w) // g.in_block)
    outside = torch.from_numpy(~reach[:, r0:r1, c0:c1])  # (n_rois, block rows, block cols) of the reference
    ib = g.in_block
    pixel_mask = outside.repeat_interleave(ib, 1).repeat_interleave(ib, 2)
    oy, ox = reference.y - r0 * ib, reference.x - c0 * ib
    pixel_mask = pixel_mask[:, oy:oy + reference.h, ox:ox + reference.w].to(base_ref.device)

    def nan_outside(i0: int, i1: int) -> torch.Tensor:  # input j: NaN outside ROI j's reach
        inputs = base_ref.unsqueeze(0).repeat(i1 - i0, 1, 1, 1)
        return inputs.masked_fill_(pixel_mask[i0:i1].unsqueeze(1), float("nan"))

    finite = prober.run(nan_outside, len(rois), reference).numpy()
    if not np.diagonal(finite).all():
        j = int(np.flatnonzero(~np.diagonal(finite))[0])
        raise NoLocality(f"blocks outside the probed reach still change ROI {j} (NaN reached it): the model's "
                          "dependency is not a rectangle")


def verify_crop(prober: Prober, grid, rois, reach, crop: Window, reference: Window, interventions,
                 verify_blocks, precision, reference_output: Optional[torch.Tensor]) -> float:
    g = grid
    s = g.scale
    base_ref = reference.crop(prober.base)
    if crop == reference:
        return 0.0
    # (b) the crop reproduces the reference's ROI values: unintervened and a few interventions.
    pairs = [(base_ref.unsqueeze(0), crop.crop(prober.base).unsqueeze(0), reference_output)]
    if interventions is not None and verify_blocks > 0:
        ids = verification_blocks(reach.any(0), verify_blocks, g.cols)
        pairs.append((interventions(ids, reference), interventions(ids, crop), None))
    err = 0.0
    for full_in, crop_in, known in pairs:
        if known is None:
            prober.forwards += full_in.shape[0]
            known = torch.cat(forward_batched(prober.forward, full_in, prober.batch_size))
        prober.forwards += crop_in.shape[0]
        c = torch.cat(forward_batched(prober.forward, crop_in, prober.batch_size))
        for r in rois:
            ay, ax = r.y - reference.y * s, r.x - reference.x * s
            cy, cx = r.y - crop.y * s, r.x - crop.x * s
            da = known[:, :, ay:ay + r.height, ax:ax + r.width].float()
            dc = c[:, :, cy:cy + r.height, cx:cx + r.width].float()
            err = max(err, float((da - dc).abs().max()))
    if not err <= VERIFY_TOL[precision]:
        raise NoLocality(f"the ROI computed from the {crop.h}x{crop.w} crop differs from the full input by "
                          f"{err:.3g} (tolerance {VERIFY_TOL[precision]:g} for {precision})")
    return err


def verification_blocks(reachable: np.ndarray, n: int, cols: int) -> np.ndarray:
    """Up to ``n`` reachable block ids, the farthest-apart first (the reach's corners, then its centre)."""
    r, c = np.nonzero(reachable)
    picks = [np.argmin(r + c), np.argmax(r + c), np.argmin(r - c), np.argmax(r - c), len(r) // 2]
    ids = []
    for p in picks:
        bid = int(r[p] * cols + c[p])
        if bid not in ids:
            ids.append(bid)
    return np.array(ids[:n], dtype=np.int64)
