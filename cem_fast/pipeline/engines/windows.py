"""Intervention-centred windows: each intervention runs on the smallest input window that determines the part of
the ROIs it can change.

For a model whose locality was probed and verified, a change of input pixel ``p`` reaches only the output pixels
``p * s + [-up, s + down) x [-left, s + right)`` (its *spread*, measured once with NaN in one pixel). An
intervention on block ``b`` can therefore change only ``I_b`` = the block's output footprint grown by the spread,
and for ROI ``j`` only ``C_bj = ROI_j & I_b``. Its new squared error is composed exactly::

    sq_err(ROI_j) = base_sq(ROI_j) - base_sq(C_bj) + new_sq(C_bj)

(uint8 convention: every term is a sum of integers, exact in float64), where ``new_sq(C_bj)`` comes from the model
run on ``V_b``, the input pixels whose spread meets the union of the ``C_bj``. Interventions whose windows have
one shape run as one batch (interior blocks share theirs). The plan is verified like the crop: for a few blocks,
the outputs on ``C_b`` from ``V_b`` must equal those from the crop to the round-off of the precision in use;
otherwise the run keeps the crop and says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ...locality import VERIFY_TOL, Window, _verification_blocks, nan_probes
from ...transfers import upload
from ..draws import intervened, verification_inputs
from ..plan import RunPlan
from .base import EngineBase, Verdict, equal_runs, verdict_of
from .cost import count_forward

MIN_GAIN = 1.1  # the windows must save at least this factor of input pixels over the crop to be worth a group each


@dataclass(frozen=True)
class Spread:
    """How far a change of one input pixel reaches in the output, in output pixels beyond its own footprint."""

    up: int
    down: int
    left: int
    right: int


@dataclass
class BlockWindows:
    """Per reachable block (``blocks``, ids): ``inputs`` (n, 4) ``[y, x, h, w]`` input windows V_b and
    ``changed`` (n, n_rois, 4) ``[y0, x0, y1, x1]`` output rectangles C_bj (empty: y0 == y1), absolute."""

    blocks: np.ndarray
    inputs: np.ndarray
    changed: np.ndarray
    spread: Spread

    def rows(self, blocks: np.ndarray) -> np.ndarray:
        """Rows of ``blocks`` in the tables (``self.blocks`` is sorted: it comes from flatnonzero)."""
        return np.searchsorted(self.blocks, blocks)

    def shape_key(self, blocks: np.ndarray) -> np.ndarray:
        """(n,) an integer per window shape: blocks with equal keys batch together."""
        r = self.rows(blocks)
        return self.inputs[r, 2] * 1_000_003 + self.inputs[r, 3]

    def pixels(self) -> int:
        return int((self.inputs[:, 2] * self.inputs[:, 3]).sum())


def measure_spread(plan: RunPlan, region: Window) -> Optional[Spread]:
    """NaN in the centre pixel of ``region`` (input px): the bounding box of the NaN outputs, relative to that
    pixel's output footprint. None when the NaN reaches the region's edge (the spread is not contained)."""
    s = plan.task.scale
    inp = region.crop(plan.prep.base).unsqueeze(0).clone()
    py, px = region.h // 2, region.w // 2
    inp[:, :, py, px] = float("nan")
    with nan_probes():  # cuDNN's Winograd/FFT tiles would smear the NaN wider than the reach
        out = plan.forward(inp)
    bad = (~torch.isfinite(out)).any(1)[0]
    ys, xs = torch.nonzero(bad.any(1)).flatten(), torch.nonzero(bad.any(0)).flatten()
    if not len(ys) or not len(xs):
        return None
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    H, W = bad.shape
    if y0 == 0 or x0 == 0 or y1 == H or x1 == W:
        return None
    # never below 0: a smaller spread than the pixel's own footprint only makes the windows a little larger
    return Spread(*(max(0, v) for v in (py * s - y0, y1 - (py + 1) * s, px * s - x0, x1 - (px + 1) * s)))


def spread_of(plan: RunPlan, region: Window) -> Optional[Spread]:
    """One pixel's spread: the locality probe's (its window grew until the spread fitted in it), else measured on
    the crop."""
    probed = plan.locality.info.get("pixel_spread_px")
    return Spread(*probed) if probed is not None else measure_spread(plan, region)


def block_windows(plan: RunPlan, spread: Spread) -> BlockWindows:
    """V_b and C_bj of every block that reaches some ROI (vectorised over blocks)."""
    g, s = plan.grid, plan.task.scale
    n = len(plan.rois)
    blocks = np.flatnonzero(plan.locality.reach.reshape(n, -1).any(0))
    r, c = blocks // g.cols, blocks % g.cols
    iy0, ix0 = r * g.in_block, c * g.in_block
    iy1, ix1 = np.minimum(iy0 + g.in_block, g.in_h), np.minimum(ix0 + g.in_block, g.in_w)
    # I_b: what the block can change (output px)
    oy0, oy1 = np.maximum(iy0 * s - spread.up, 0), np.minimum(iy1 * s + spread.down, g.out_h)
    ox0, ox1 = np.maximum(ix0 * s - spread.left, 0), np.minimum(ix1 * s + spread.right, g.out_w)
    rois = np.array([[q.y, q.x, q.y + q.height, q.x + q.width] for q in plan.rois])  # (n_rois, 4)
    cy0, cy1 = np.maximum(oy0[:, None], rois[:, 0]), np.minimum(oy1[:, None], rois[:, 2])
    cx0, cx1 = np.maximum(ox0[:, None], rois[:, 1]), np.minimum(ox1[:, None], rois[:, 3])
    empty = (cy0 >= cy1) | (cx0 >= cx1) | ~plan.locality.reach.reshape(n, -1)[:, blocks].T
    cy0, cy1 = np.where(empty, 0, cy0), np.where(empty, 0, cy1)
    cx0, cx1 = np.where(empty, 0, cx0), np.where(empty, 0, cx1)
    changed = np.stack([cy0, cx0, cy1, cx1], axis=2)
    lost = empty.all(1)
    if lost.any():  # the reach says it meets a ROI, the spread says it changes none: the probes disagree
        b = int(blocks[lost][0])
        raise ValueError(f"locality: block (row {b // g.cols}, col {b % g.cols}) was measured to reach a ROI, but "
                         f"its measured spread ({spread.up}, {spread.down}, {spread.left}, {spread.right} px) changes "
                         "none: the model's probe forwards disagree (is it deterministic?); locality=off runs "
                         "without the probe")
    # U_b: the box of the changed parts; V_b: the input pixels whose spread meets it
    big = np.iinfo(np.int64).max
    uy0 = np.where(empty, big, cy0).min(1)
    ux0 = np.where(empty, big, cx0).min(1)
    uy1, ux1 = cy1.max(1), cx1.max(1)
    vy0 = np.maximum(np.floor_divide(uy0 - spread.down, s), 0)
    vx0 = np.maximum(np.floor_divide(ux0 - spread.right, s), 0)
    vy1 = np.minimum(-np.floor_divide(-(uy1 + spread.up), s), g.in_h)
    vx1 = np.minimum(-np.floor_divide(-(ux1 + spread.left), s), g.in_w)
    inputs = np.stack([vy0, vx0, vy1 - vy0, vx1 - vx0], axis=1)
    return BlockWindows(blocks.astype(np.int64), inputs.astype(np.int64), changed.astype(np.int64), spread)


def windows_inputs(plan: RunPlan, windows: BlockWindows, blocks: torch.Tensor, draws: torch.Tensor,
                   rows: np.ndarray, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The interventions (blocks[k], draws[k]) written into their own windows (one shape for all of ``rows``)."""
    v = windows.inputs[rows]
    return intervened(plan, blocks, draws, window=(upload(v[:, :2], plan.device), (int(v[0, 2]), int(v[0, 3]))),
                      out=out)


class WindowsEngine(EngineBase):
    """Each intervention on its own window; runs of equal window shape share a forward."""

    name = "windows"

    def __init__(self, tables: BlockWindows, instead):
        super().__init__(instead)
        self.tables = tables

    def order(self, blocks: np.ndarray) -> np.ndarray:
        if not len(blocks):
            return blocks
        return blocks[np.argsort(self.tables.shape_key(blocks), kind="stable")]

    def scores(self, runner, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        w = self.tables
        rows = w.rows(blocks.cpu().numpy())
        parts = []
        for a, b in equal_runs(w.shape_key(w.blocks[rows])):
            vh, vw = (int(v) for v in w.inputs[rows[a], 2:])
            buf = runner.buffer(b - a, vh, vw)
            inputs = windows_inputs(runner.plan, w, blocks[a:b], draws[a:b], rows[a:b], out=buf)
            parts.append(runner.changed_scorer(w)(runner.forward(inputs, owned=True), rows[a:b]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def cache_components(self) -> dict[str, str]:
        return {"windows": "intervention-centred"}

    def for_rois(self, plan: RunPlan) -> "WindowsEngine":
        return WindowsEngine(block_windows(plan, self.tables.spread), self.instead.for_rois(plan))

    def budget(self) -> dict:
        return {"windows": "intervention-centred", "incremental": False, "input_px": self.tables.pixels()}


def measured_spread(verdicts) -> Optional[Spread]:
    """The one-pixel spread the windows' planning measured, if it got that far."""
    v = verdict_of(verdicts, WindowsEngine.name)
    px = v.facts.get("spread_px") if v is not None else None
    return Spread(*px) if px is not None else None


def plan(plan: RunPlan, chosen, verdicts) -> tuple[Optional[WindowsEngine], Verdict]:
    """Decide whether interventions run on their own windows: measure the spread, build the windows, verify them
    against the crop on a few blocks."""
    def no(reason: str, **kw) -> tuple[None, Verdict]:
        return None, Verdict(WindowsEngine.name, False, reason, **kw)
    info = plan.locality.info
    if plan.options.windows == "crop":
        return no("asked (windows: crop)")
    if "verify_max_abs_err" not in info:
        return no("locality was not verified: " + str(info.get("reason", "off")))
    if "tight_crop_refused" in info:
        return no("the model needs its input grid kept (the pixel-tight crop failed)")
    region = plan.locality.window or Window(0, 0, plan.grid.in_h, plan.grid.in_w)
    spread = spread_of(plan, region)
    if spread is None:
        return no("one pixel's change reaches the edge of the crop")
    windows = block_windows(plan, spread)
    crop_px = len(windows.blocks) * region.h * region.w
    gain = crop_px / max(1, windows.pixels())
    facts = {"spread_px": [spread.up, spread.down, spread.left, spread.right],
             "input_px_per_draw": windows.pixels(), "crop_px_per_draw": int(crop_px), "gain": round(gain, 3),
             "shapes": int(len(np.unique(windows.shape_key(windows.blocks))))}
    if plan.options.windows != "on":  # "on": wherever they apply and verify, whatever they save
        if gain < MIN_GAIN:
            return no(f"saves too little over the crop ({gain:.2f}x the pixels)", facts=facts)
        too_small = _fixed_cost_refusal(plan, windows, region, facts)
        if too_small:
            return no(too_small, facts=facts)
    err = verify_windows(plan, windows, region)
    tol = VERIFY_TOL[plan.options.precision]
    if not err <= tol:
        return no(f"outputs on the changed region differ from the crop's by {err:.3g} (tolerance {tol:g})",
                  facts=facts, check_failed=True)
    return WindowsEngine(windows, chosen), Verdict(WindowsEngine.name, True, facts=facts, verify_max_abs_err=err)


VERIFY_WINDOW_BLOCKS = 4


def _fixed_cost_refusal(plan: RunPlan, windows: BlockWindows, region: Window, facts: dict) -> str:
    """Why the model work the windows save over the crop, on the draws every reachable block gets, cannot pay for
    the forwards they add: their check's (the spread, then each checked block on its window and on the crop) and
    one more per window shape and stage, each a batch of the pipeline and the model's operators
    (:meth:`ForwardCount.fixed_macs`); "" when it can. A small net (a few thin layers) saves pixels but not the
    time of its extra forwards. The model's cost is counted on one forward of the first block's window."""
    y, x, h, w = (int(v) for v in windows.inputs[0])
    inp = Window(y, x, h, w).crop(plan.prep.base).unsqueeze(0).contiguous(memory_format=plan.forward.memory_format)
    try:  # owned: the model's operators alone, as a batch of the sampling runs them
        count = count_forward(lambda batch: plan.forward(batch, owned=True), inp)
    except RuntimeError:  # the model refuses that window: the check says so, with the reason
        return ""
    stages = sum(1 for n in plan.options.stages if n)
    forwards = (0 if plan.locality.info.get("pixel_spread_px") is not None else 1) + 2 * VERIFY_WINDOW_BLOCKS + \
        stages * (facts["shapes"] - 1)
    saved = plan.options.every_block_draws * (facts["crop_px_per_draw"] - facts["input_px_per_draw"]) * \
        count.macs_per_px
    fixed = count.fixed_macs(forwards)
    facts.update(forward_ops=count.ops, macs_per_input_px=round(count.macs_per_px, 1), saved_macs=float(saved),
                 fixed_macs=float(fixed))
    if saved >= fixed:
        return ""
    return (f"saves less than its fixed cost ({saved:.3g} multiply-accumulates over the draws every block gets "
            f"against {fixed:.3g} for {forwards} more forwards of {count.ops} operators)")


def largest_difference_from_crop(plan: RunPlan, windows: BlockWindows, region: Window, own) -> float:
    """Largest |an intervention's own output on C_b - the crop's| over a few blocks (the reach's corners and one
    inside a ROI), draw 0 of each: what the windows and the layer-by-layer engine are checked by. ``own(b)``: block
    ``b``'s output (C, h, w) and its origin (output px)."""
    s = plan.task.scale
    picks = _verification_blocks(plan.locality.reach.any(0), VERIFY_WINDOW_BLOCKS, plan.grid.cols)
    err = 0.0
    for b in picks:
        out, (oy, ox) = own(int(b))
        crop = plan.forward(verification_inputs(plan, np.array([int(b)], dtype=np.int64), region))[0]
        for y0, x0, y1, x1 in windows.changed[windows.rows(np.array([b]))[0]]:
            if y0 >= y1 or x0 >= x1:
                continue
            a = out[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox].float()
            c = crop[:, y0 - region.y * s:y1 - region.y * s, x0 - region.x * s:x1 - region.x * s].float()
            err = max(err, float((a - c).abs().max()))
    return err


def verify_windows(plan: RunPlan, windows: BlockWindows, region: Window) -> float:
    """The windows' check: each block's output on C_b from V_b against the crop's (see above)."""
    s = plan.task.scale

    def own(b: int):
        row = windows.rows(np.array([b]))
        blocks = torch.tensor([b], device=plan.device)
        out = plan.forward(windows_inputs(plan, windows, blocks, torch.zeros_like(blocks), row))[0]
        return out, (int(windows.inputs[row[0], 0]) * s, int(windows.inputs[row[0], 1]) * s)
    return largest_difference_from_crop(plan, windows, region, own)
