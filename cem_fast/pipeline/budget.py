"""What a run will cost before it runs (the plan line and summary.json: plan), and how many ROIs are run: one
shared pass or one run per ROI, whichever moves fewer input pixels."""
from __future__ import annotations

from typing import Any

import numpy as np

from .plan import RunPlan, reachable_blocks

PER_ROI_MARGIN = 1.25  # one run per ROI also probes each ROI: chosen only when clearly cheaper


def forward_budget(plan: RunPlan) -> dict[str, Any]:
    """What the sampling will cost, before it runs: blocks, forwards (the fine stage as an upper bound: every
    reachable block gated) and input pixels per forward."""
    blocks = reachable_blocks(plan)
    coarse, fine = plan.options.stages
    window = plan.locality.window
    h, w = (window.h, window.w) if window is not None else tuple(plan.prep.base.shape[1:])
    engine = plan.engine.budget()
    per_forward = engine["input_px"] // max(1, blocks) if engine["input_px"] is not None else int(h * w)
    return {"blocks": blocks, "of_blocks": plan.grid.num_blocks, "coarse_forwards": blocks * coarse,
            "fine_forwards_at_most": blocks * fine, "input_px_per_forward": int(per_forward),
            "input_shape": [int(h), int(w)], "batch_size": plan.batch_size,
            "windows": engine["windows"], "incremental": engine["incremental"]}


def budget_line(b: dict, n_rois: int) -> str:
    fine = f" + at most {b['fine_forwards_at_most']:,} fine" if b["fine_forwards_at_most"] else ""
    h, w = b["input_shape"]
    on = f"{h}x{w} input px" if b["windows"] == "crop" else \
        f"windows of their own ({b['input_px_per_forward']:,} input px on average, the crop {h}x{w})"
    if b.get("incremental"):
        on = "their changed rectangles, layer by layer"
    return (f"plan: {b['blocks']:,} of {b['of_blocks']:,} blocks can reach the {n_rois} ROI"
            f"{'s' if n_rois > 1 else ''}: {b['coarse_forwards']:,} coarse{fine} forwards on {on}, "
            f"batch {b['batch_size']}")


def per_roi_pixels(plan: RunPlan) -> int:
    """Input pixels the same sampling would cost as one run per ROI: each ROI's reachable blocks on the box of
    those blocks (an upper bound of each run's verified crop; their probes not counted)."""
    grid, total = plan.grid, 0
    for reach in plan.locality.reach:
        rows, cols = np.nonzero(reach)
        if not len(rows):
            continue
        h = min(grid.in_h, (rows.max() + 1) * grid.in_block) - rows.min() * grid.in_block
        w = min(grid.in_w, (cols.max() + 1) * grid.in_block) - cols.min() * grid.in_block
        total += len(rows) * int(h) * int(w)
    return total


def choose_roi_plan(plan: RunPlan, budget: dict) -> dict:
    """Many ROIs: one shared pass (every intervention of the union's reachable blocks, on the crop of the union)
    or one run per ROI (each on its own crop), whichever moves fewer input pixels (counted, before running)."""
    if len(plan.rois) == 1:
        return {"chosen": "shared"}
    engine_px = plan.engine.budget()["input_px"]
    shared = engine_px if engine_px is not None else budget["blocks"] * budget["input_px_per_forward"]
    per_roi = per_roi_pixels(plan)  # without locality every ROI reaches every block: n x the shared pass
    asked = plan.options.roi_plan
    chosen = asked if asked != "auto" else ("per-roi" if per_roi * PER_ROI_MARGIN < shared else "shared")
    why = "asked (roi_plan)" if asked != "auto" else \
        f"counted input pixels per draw: shared pass {shared:,}, one run per ROI {per_roi:,}"
    if plan.shared_too_big:
        chosen, why = "per-roi", plan.shared_too_big
    return {"chosen": chosen, "why": why, "shared_px_per_draw": int(shared), "per_roi_px_per_draw": int(per_roi)}
