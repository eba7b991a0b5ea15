"""Locality: which input blocks can reach the ROI at all, and which input window determines it.

A CEM intervention on a block that cannot reach the ROI changes nothing: its causal effect is exactly 0 and
needs no forward pass. A block that can reach it only needs the input window that the ROI depends on. For a
model with a bounded receptive field both sets are small and found by *structural probing*:

1. Probe: NaN in the block nearest the centre of the ROIs (and, in the same batch, in one pixel of it) shows how
   far a change reaches in the output (its *spread*; NaN survives every multiply, add, ReLU and clamp, and no
   weight can cancel it). The probe window grows (margin doubled) while the NaN reaches its edge, so the cost
   follows the receptive field, not the image. Every ROI's reach follows: the blocks whose footprint grown by
   the block's spread meets it.
2. Verify: (a) in a window of each ROI's own (its reach and a ring of blocks at least as wide as the spread),
   with NaN in *every* block outside its reach at once, the ROI must stay finite; (b) the ROI computed from the
   crop must equal the one computed from the full input (or, for large images, from the ROIs' windows) for the
   unintervened input and a few interventions, to the round-off of the precision in use (convolution algorithms
   differ by input size; TF32 and bf16 more so).
3. The crop: the input pixels whose spread (one pixel's) meets some ROI (DnCNN-20's 32-px ROI needs 72 px per
   side of its 80-px block-aligned crop), its size rounded up to 4 px. A model that needs its input grid kept
   (windowed attention, downsampling) fails verification (b) on that crop and gets the block-aligned one
   (summary.json: tight_crop_refused).

A model that does not treat every block alike (it reads a fixed place of whatever input it is given, say) fails
2(a) and gets the older probe (summary.json: reach_from, block_spread_refused): inside a window around the ROIs,
NaN in one whole block-row (or block-column) per probe input, reachable blocks = (reached rows) x (reached
columns) per ROI, verified as in 2 against the whole input or the probe window, and the crop found with NaN in
each pixel row and column of the outermost reached blocks. That costs a forward of the union per block row and
column, and one per ROI, where the spread costs a few small forwards.

Models with global paths (global pooling, channel attention, full attention) reach the window's edge every time;
the window grows to the whole image and nothing is skipped or cropped. A model that hides NaN, fails on crops
or changes the output size is run without locality, and the reason is reported.

This module plans (the probes' order, the reach, the crop and the fallbacks); the NaN probes, the window and the
verifications it plans with are :mod:`cem_fast.locality_probes`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .geometry import ROI, BlockGrid
from .locality_probes import (VERIFY_TOL, Forward, NoLocality, Prober, Window, aligned, block_span, nan_probes,
                              tight_crop, verification_blocks, verify_crop, verify_reach, verify_reach_locally)

# the pipeline's engines import these from here: Window, VERIFY_TOL and nan_probes above, and this one
_verification_blocks = verification_blocks

INITIAL_MARGIN_BLOCKS = 4  # 32 px at 8-px blocks: most CNNs need one probe round
PROBE_MAX_INPUT_PX = 2048 * 2048  # beyond this the probe gives up: the ROI depends on most of a huge input


@dataclass
class LocalityPlan:
    """``reach`` (n_rois, rows, cols) bool: blocks that can affect each ROI; ``window``: the input crop that
    determines every ROI (None: the whole input); ``active``: whether anything is skipped or cropped;
    ``info``: what summary.json reports (mode, reason, probe cost, verification error)."""

    reach: np.ndarray
    window: Optional[Window]
    info: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.window is not None or not self.reach.any(0).all()

    @classmethod
    def off(cls, n_rois: int, grid: BlockGrid, mode: str, reason: str, **info) -> "LocalityPlan":
        return cls(np.ones((n_rois, grid.rows, grid.cols), bool), None,
                   {"mode": mode, "active": False, "reason": reason, **info})


def plan_locality(forward: Forward, base: torch.Tensor, grid: BlockGrid, rois: Sequence[ROI], *,
                  batch_size: int, precision: str = "fp32", full_output: Optional[torch.Tensor] = None,
                  interventions: Optional[Callable[[np.ndarray, Window], torch.Tensor]] = None,
                  verify_blocks: int = 2) -> LocalityPlan:
    """Probe and verify (module docstring). ``forward`` runs the model on (N, C, h, w) input crops;
    ``interventions(block_ids, window)`` returns intervened crops of ``window`` for verification;
    ``full_output``: the model's output on the whole input, when it was affordable: verification is then against
    the whole input (else against the probe window)."""
    t0 = time.perf_counter()
    rois = list(rois)
    prober = Prober(forward, base, grid, rois, batch_size)
    try:
        with torch.inference_mode():
            plan = _probe_and_verify(prober, grid, rois, precision, interventions, verify_blocks, full_output)
    except NoLocality as e:
        plan = LocalityPlan.off(len(rois), grid, "auto", str(e))
    except Exception as e:  # a model that cannot run on crops: run it whole
        plan = LocalityPlan.off(len(rois), grid, "auto", f"the model failed on a crop: {type(e).__name__}: "
                                f"{e}".splitlines()[0])
    plan.info.update(probe_forwards=prober.forwards, probe_seconds=round(time.perf_counter() - t0, 4))
    return plan


def _probe_and_verify(prober: Prober, grid: BlockGrid, rois, precision, interventions, verify_blocks,
                      full_output: Optional[torch.Tensor]) -> LocalityPlan:
    try:
        return _plan_from_block_spread(prober, grid, rois, precision, interventions, verify_blocks, full_output)
    except NoLocality as e:  # not translation-invariant, or reaching the image's edge: probe the union
        refused = str(e)
    plan = _plan_from_union_probe(prober, grid, rois, precision, interventions, verify_blocks, full_output)
    plan.info["reach_from"] = "the union's row and column probe"
    plan.info["block_spread_refused"] = refused
    return plan


def _plan_from_union_probe(prober: Prober, grid: BlockGrid, rois, precision, interventions, verify_blocks,
                           full_output: Optional[torch.Tensor]) -> LocalityPlan:
    b = grid.block
    ra, rb = min(r.y // b for r in rois), max((r.y + r.height - 1) // b for r in rois)
    ca, cb = min(r.x // b for r in rois), max((r.x + r.width - 1) // b for r in rois)
    margin = [INITIAL_MARGIN_BLOCKS] * 4  # top, bottom, left, right
    rounds = 0
    while True:
        r0, r1 = max(0, ra - margin[0]), min(grid.rows, rb + 1 + margin[1])
        c0, c1 = max(0, ca - margin[2]), min(grid.cols, cb + 1 + margin[3])
        win = prober.window_of_blocks(r0, r1, c0, c1)
        if win.h * win.w > PROBE_MAX_INPUT_PX:
            raise NoLocality(f"the ROI depends on more than a {win.h}x{win.w} input window (global paths?)")
        rows, cols = prober.probe(r0, r1, c0, c1)
        rounds += 1
        grow = [r0 > 0 and rows[:, 0].any(), r1 < grid.rows and rows[:, -1].any(),
                c0 > 0 and cols[:, 0].any(), c1 < grid.cols and cols[:, -1].any()]
        if not any(grow):
            break
        margin = [m * 2 if g else m for m, g in zip(margin, grow)]

    for j, roi in enumerate(rois):
        own_r = range(roi.y // b - r0, (roi.y + roi.height - 1) // b - r0 + 1)
        own_c = range(roi.x // b - c0, (roi.x + roi.width - 1) // b - c0 + 1)
        if not (rows[j, list(own_r)].all() and cols[j, list(own_c)].all()):
            raise NoLocality("NaN put into the ROI's own input does not reach the ROI: the model hides NaN, "
                              "so its reach cannot be probed")
    reach = np.zeros((len(rois), grid.rows, grid.cols), bool)
    for j in range(len(rois)):
        reach[j, r0:r1, c0:c1] = np.outer(rows[j], cols[j])
    whole = Window(0, 0, grid.in_h, grid.in_w)
    reference = whole if full_output is not None else win
    info = {"mode": "auto", "windows_are": "[y, x, height, width] in input pixels", "probe_rounds": rounds,
            "probe_window": win.as_list(),
            "verified_against": "full input" if reference == whole else f"probe window {win.as_list()}"}
    verify_reach(prober, grid, rois, reach, reference)
    return _crop_and_verify(prober, grid, rois, reach, reference, info, precision, interventions, verify_blocks,
                            full_output, tight=None)


def _plan_from_block_spread(prober: Prober, grid: BlockGrid, rois, precision, interventions, verify_blocks,
                            full_output: Optional[torch.Tensor]) -> LocalityPlan:
    """Many ROIs: how far a change of one block reaches (NaN in it) gives every ROI's reach at once, for a model
    that treats every block alike; each ROI's reach is then verified in a window of its own (NaN in a ring of
    blocks around it must not reach it). A few small forwards plus one window per ROI, where the union's probe
    costs one forward of the whole union per block row and column, and its verification one per ROI."""
    spread, pixel_spread, rounds, probe_window = _block_spread(prober, grid, rois)
    reach = _reach_from_spread(grid, rois, spread)
    ring = max(1, -(-max(spread) // grid.block))  # at least as wide as the spread itself
    windows = verify_reach_locally(prober, grid, rois, reach, ring)
    whole = Window(0, 0, grid.in_h, grid.in_w)
    if full_output is not None:
        reference = whole
    else:  # the union of the ROIs' verification windows
        ys, xs = windows[:, 0], windows[:, 1]
        y1, x1 = (windows[:, 0] + windows[:, 2]).max(), (windows[:, 1] + windows[:, 3]).max()
        reference = Window(int(ys.min()), int(xs.min()), int(y1 - ys.min()), int(x1 - xs.min()))
    info = {"mode": "auto", "windows_are": "[y, x, height, width] in input pixels",
            "reach_from": "one block's spread, verified per ROI", "block_spread_px": list(spread),
            "probe_rounds": rounds, "probe_window": probe_window.as_list(), "verify_ring_blocks": ring,
            "pixel_spread_px": list(pixel_spread),
            "verified_against": "full input" if reference == whole else f"the ROIs' windows {reference.as_list()}"}
    return _crop_and_verify(prober, grid, rois, reach, reference, info, precision, interventions, verify_blocks,
                            full_output, tight=_crop_from_spread(grid, rois, pixel_spread))


def _block_spread(prober: Prober, grid: BlockGrid, rois) -> tuple[tuple[int, int, int, int], int, Window]:
    """NaN in the block nearest the centre of the ROIs' union: how far the NaN outputs reach beyond the block's
    output footprint (up, down, left, right, output px), the probe rounds and the last probe window. The window
    grows (margin doubled) while the NaN reaches its edge."""
    g, s, ib = grid, grid.scale, grid.in_block
    cy = (min(r.y for r in rois) + max(r.y + r.height for r in rois)) // 2
    cx = (min(r.x for r in rois) + max(r.x + r.width for r in rois)) // 2
    rc, cc = min(cy // g.block, g.rows - 1), min(cx // g.block, g.cols - 1)
    margin, rounds = INITIAL_MARGIN_BLOCKS, 0
    while True:
        r0, r1, c0, c1 = max(0, rc - margin), min(g.rows, rc + margin + 1), max(0, cc - margin), \
            min(g.cols, cc + margin + 1)
        win = prober.window_of_blocks(r0, r1, c0, c1)
        if win.h * win.w > PROBE_MAX_INPUT_PX:
            raise NoLocality(f"one block's change reaches beyond a {win.h}x{win.w} input window")
        by0, by1 = block_span(rc, ib, g.in_h)
        bx0, bx1 = block_span(cc, ib, g.in_w)
        py, px = (by0 + by1) // 2, (bx0 + bx1) // 2
        inp = win.crop(prober.base).unsqueeze(0).repeat(2, 1, 1, 1)
        inp[0, :, by0 - win.y:by1 - win.y, bx0 - win.x:bx1 - win.x] = float("nan")
        inp[1, :, py - win.y, px - win.x] = float("nan")
        with nan_probes():
            out = prober.forward(inp)
        prober.forwards += 2
        rounds += 1
        want = (2, inp.shape[1], win.h * s, win.w * s)
        if tuple(out.shape) != want:
            raise NoLocality(f"the model's output on a {win.h}x{win.w} crop is {tuple(out.shape)}, expected {want}")
        boxes = []
        for bad in (~torch.isfinite(out)).any(1):
            ys, xs = torch.nonzero(bad.any(1)).flatten(), torch.nonzero(bad.any(0)).flatten()
            if not len(ys):
                raise NoLocality("NaN put into a block reaches no output: the model hides NaN")
            boxes.append((int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1))
        y0, y1, x0, x1 = boxes[0]
        H, W = out.shape[-2:]
        sides = [(y0 == 0, r0 > 0), (y1 == H, r1 < g.rows), (x0 == 0, c0 > 0), (x1 == W, c1 < g.cols)]
        if any(at and inside for at, inside in sides):
            margin *= 2
            continue
        if any(at for at, _ in sides):
            raise NoLocality("one block's change reaches the image's edge")
        break
    oy, ox = win.y * s, win.x * s

    def beyond(box, a0, a1, b0, b1):  # the NaN box beyond the footprint [a0, a1) x [b0, b1) (input px)
        y0, y1, x0, x1 = box
        return tuple(max(0, int(v)) for v in (a0 * s - (oy + y0), (oy + y1) - a1 * s,
                                               b0 * s - (ox + x0), (ox + x1) - b1 * s))
    return (beyond(boxes[0], by0, by1, bx0, bx1), beyond(boxes[1], py, py + 1, px, px + 1), rounds, win)


def _crop_from_spread(grid: BlockGrid, rois, pixel_spread) -> Window:
    """The input pixels whose change (one pixel's spread) meets some ROI: the pixel-tight crop, its size rounded
    up to TIGHT_ALIGN. DnCNN-20's 32-px ROI needs 72 px."""
    up, down, left, right = pixel_spread
    s = grid.scale
    y0 = min(max(0, -(-(r.y - down - s + 1) // s)) for r in rois)
    y1 = max(min(grid.in_h, -(-(r.y + r.height + up) // s)) for r in rois)
    x0 = min(max(0, -(-(r.x - right - s + 1) // s)) for r in rois)
    x1 = max(min(grid.in_w, -(-(r.x + r.width + left) // s)) for r in rois)
    y0, y1 = aligned(y0, y1, grid.in_h)
    x0, x1 = aligned(x0, x1, grid.in_w)
    return Window(y0, x0, y1 - y0, x1 - x0)


def _reach_from_spread(grid: BlockGrid, rois, spread) -> np.ndarray:
    """(n_rois, rows, cols): the blocks whose output footprint grown by ``spread`` meets each ROI."""
    up, down, left, right = spread
    g, s, ib = grid, grid.scale, grid.in_block
    r, c = np.arange(g.rows), np.arange(g.cols)
    oy0, oy1 = r * ib * s - up, np.minimum((r + 1) * ib, g.in_h) * s + down
    ox0, ox1 = c * ib * s - left, np.minimum((c + 1) * ib, g.in_w) * s + right
    q = np.array([[x.y, x.x, x.y + x.height, x.x + x.width] for x in rois])
    rows = (oy0[None] < q[:, 2:3]) & (oy1[None] > q[:, 0:1])
    cols = (ox0[None] < q[:, 3:4]) & (ox1[None] > q[:, 1:2])
    return rows[:, :, None] & cols[:, None, :]


def _crop_and_verify(prober: Prober, grid: BlockGrid, rois, reach: np.ndarray, reference: Window, info: dict,
                     precision, interventions, verify_blocks, full_output, tight: Optional[Window]) -> LocalityPlan:
    """The crop of the verified reach, checked against ``reference``: ``tight`` (pixel-tight, None: probed
    inside the block-aligned crop) first, the block-aligned one where the model refuses it."""
    rr, cc = np.flatnonzero(reach.any((0, 2))), np.flatnonzero(reach.any((0, 1)))
    block_crop = prober.window_of_blocks(int(rr[0]), int(rr[-1]) + 1, int(cc[0]), int(cc[-1]) + 1)
    whole = Window(0, 0, grid.in_h, grid.in_w)
    tight = tight_crop(prober, grid, block_crop) if tight is None else tight
    reference_output = full_output if reference == whole else None
    # the pixel-tight crop first; a model that needs its input grid kept (windowed attention, downsampling) gets
    # the block-aligned one
    for crop in ([tight] if tight == block_crop else [tight, block_crop]):
        try:
            max_err = verify_crop(prober, grid, rois, reach, crop, reference, interventions, verify_blocks,
                                   precision, reference_output)
            break
        except Exception as e:  # also a model that fails on the tight crop's size (a U-Net wanting multiples of 8)
            if crop == block_crop:
                raise
            info["tight_crop_refused"] = f"{tight.as_list()}: {type(e).__name__}: {e}".splitlines()[0]
    plan = LocalityPlan(reach, crop if crop != whole else None, info)
    info.update(active=plan.active, reason="verified" if plan.active
                else "every block reaches " + ("the ROI" if len(rois) == 1 else "some ROI")
                + " and the crop is the whole input",
                skipped_blocks=int((~reach.any(0)).sum()), reachable_blocks=int(reach.any(0).sum()),
                crop=plan.window.as_list() if plan.window else None, verify_max_abs_err=max_err,
                verify_tol=VERIFY_TOL[precision])
    return plan
