"""Y(I), the ROI score of the unintervened input, which every effect subtracts a sample from.

It must be finite (or the +inf of a ROI the model restores exactly, which :func:`.samples.refuse_infinite_effects`
explains) and the model must give it again at the end of the run: a model whose output changes from call to call
(NaN every few forwards, a counter in its state) gives effects that are noise, and NaN in Y(I) made every effect
NaN, hence an all-zero map that looked like a model no block affects. So Y(I) is scored at the start of the
sampling and the unintervened input is scored once more at the end; both must agree to the round-off of the
precision in use (:data:`cem_fast.locality.VERIFY_TOL`, the tolerance the crop and the windows are verified to).
"""
from __future__ import annotations

import numpy as np
import torch

from ..locality import VERIFY_TOL
from .plan import RunPlan
from .runner import Runner



def start_origin(plan: RunPlan, runner: Runner) -> np.ndarray:
    """(n_rois,) Y(I) from the whole-input output when the run is not cropped, else from the crop's (NaN where a
    ROI holds NaN/Inf: the runner's scores)."""
    if plan.locality.window is None and plan.full_output is not None:
        return runner.score(plan.full_output)[0].cpu().numpy()
    return runner.origin()


def refuse_undefined_origin(plan: RunPlan, psnr_origin: np.ndarray) -> None:
    """NaN/Inf in a ROI of the unintervened output: no effect can be measured from it (NaN - Y_k is NaN, which the
    display threshold would have shown as 0 dB)."""
    bad = np.flatnonzero(np.isnan(psnr_origin))
    if len(bad):
        raise ValueError(f"model {plan.name} output has NaN/Inf values in ROI {_roi(plan, int(bad[0]))} on the "
                         "unintervened input: Y(I), which every effect is measured from, is undefined")


def check_reproduced(plan: RunPlan, runner: Runner, psnr_origin: np.ndarray) -> dict:
    """Run the unintervened input once more (the same forward as :func:`start_origin`) and refuse the run when its
    ROIs are not finite or differ from the start's by more than the precision's round-off. Returns what
    summary.json says about the check."""
    first = _start_output(plan, runner)
    again = runner.forward(runner.win.crop(plan.prep.base).unsqueeze(0))[0]
    runner.forwards += 1
    tol = VERIFY_TOL[plan.options.precision]
    err = _largest_roi_difference(first, again, runner.score.rois)
    if not np.isfinite(err) or err > tol:
        end = runner.score(again.unsqueeze(0))[0].cpu().numpy()
        j = int(np.argmax(np.abs(end - psnr_origin))) if np.isfinite(end).all() else int(np.argmax(np.isnan(end)))
        what = (f"its outputs in the ROIs differ by {err:.3g} (tolerance {tol:g} for {plan.options.precision})"
                if np.isfinite(err) else "NaN/Inf appeared in its ROI outputs")
        raise RuntimeError(f"model {plan.name} is not deterministic: run again on the unintervened input at the "
                           f"end of the run, {what}; Y(I) of ROI {_roi(plan, j)} was {psnr_origin[j]:.4f} dB at "
                           f"the start and {end[j]:.4f} dB at the end, so its effects would be noise")
    return {"max_abs_diff": float(err), "tolerance": tol}


def _start_output(plan: RunPlan, runner: Runner) -> torch.Tensor:
    """(C, h, w) the output :func:`start_origin` scored (the runner's window is the whole input when uncropped)."""
    if plan.locality.window is None and plan.full_output is not None:
        return plan.full_output[0]
    return runner.origin_output


def _largest_roi_difference(a: torch.Tensor, b: torch.Tensor, rois) -> float:
    """max |a - b| over the ROIs (window coordinates); NaN when either holds NaN/Inf there."""
    err = 0.0
    for r in rois:
        ys, xs = r.slices()
        ra, rb = a[:, ys, xs].double(), b[:, ys, xs].double()
        if not (torch.isfinite(ra).all() and torch.isfinite(rb).all()):
            return float("nan")
        err = max(err, float((ra - rb).abs().max()))
    return err


def _roi(plan: RunPlan, j: int) -> str:
    r = plan.rois[j]
    return f"(y={r.y}, x={r.x}, {r.height}x{r.width})"
