"""Where the draws' noise comes from (issue 17, item 3: keep only the variance reduction that measurably helps).

For every block outside the ROI with |CE| >= 0.1 dB, from ``DRAWS`` exhaustive draws on the shipped demo (the
convergence study's cases), the share of the variance of its draws' effects explained by a least-squares fit on
each candidate property of the drawn patch:

- its sharpness (the bank's tag): what stratifying by the sharpness tags could remove;
- its channel means (the control variate the estimator uses);
- both.

For DN, the share of the intervention noise is also measured: draws of one block that drew the same patch differ
only by their noise, so half the mean squared difference of such pairs, over the variance, is that share. That
bounds what antithetic noise could remove.

``CEM_FAST_BENCH_SIZE=ci``: 200 draws; full: 1,000, results written to ``CEM_FAST_VARIANCE_OUT`` when set.
"""
import json
import os
import re
import time
from importlib import resources

import numpy as np
import pytest
import torch

from cem_fast import convergence, rng
from cem_fast.estimator import causal_effect_map
from cem_fast.patches import PatchBank
from cem_fast.options import DRAW_STRIDE

SIZE = os.environ.get("CEM_FAST_BENCH_SIZE", "full")
DRAWS = 200 if SIZE == "ci" else 1000
CASES = {"bicubic-SR": ("bicubic", "SR", dict(scale=4)), "default-DN": ("default", "DN", dict(sigma=50))}


def _r2(x: np.ndarray, y: np.ndarray) -> float:
    a = np.column_stack([np.ones(len(y)), x])
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    return float(1 - ((y - a @ coef) ** 2).mean() / y.var())


def _noise_share(pidx: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(pidx, kind="stable")
    same = pidx[order][1:] == pidx[order][:-1]
    pairs = np.diff(y[order])[same]
    return float(np.mean(pairs ** 2) / 2 / y.var()) if same.any() else float("nan")


def sources(case: str) -> dict:
    model, task, opts = CASES[case]
    image = str(resources.files("cem_fast") / "data" / "demo.png")
    res = causal_effect_map(model, image, task, roi=(48, 56, 16), mode="exhaustive", samples=DRAWS,
                            seed=convergence.TRUTH_SEED, estimator="mean", progress=False, **opts)
    bank = PatchBank.default()
    sharp = np.array([float(re.search(r"sharpness-(\d+(?:\.\d+)?)", n).group(1)) for n in bank.names])
    means = bank.patches.double().mean(dim=(2, 3)).numpy()
    rows = []
    for r, c in np.argwhere(res.reachable & ~res.roi_mask & (np.abs(res.effect) >= 0.1)):
        block = int(r * res.cem.shape[1] + c)
        ids = torch.tensor(block * DRAW_STRIDE + np.arange(DRAWS), dtype=torch.int64)
        p = rng.patch_draws(convergence.TRUTH_SEED, ids, len(bank)).numpy()
        y = res.psnr_origin - res.samples_fine[r, c]
        rows.append({"block": [int(r), int(c)], "effect_db": float(y.mean()), "sharpness_r2": _r2(sharp[p], y),
                     "channel_means_r2": _r2(means[p], y),
                     "both_r2": _r2(np.column_stack([means[p], sharp[p]]), y),
                     **({"noise_share": _noise_share(p, y)} if task == "DN" else {})})
    keys = ["sharpness_r2", "channel_means_r2", "both_r2"] + (["noise_share"] if task == "DN" else [])
    return {"case": case, "draws": DRAWS, "blocks": rows,
            "median": {k: float(np.median([b[k] for b in rows])) for k in keys},
            "range": {k: [float(min(b[k] for b in rows)), float(max(b[k] for b in rows))] for k in keys}}


def table(results: list) -> str:
    lines = [f"Variance sources of the draws of blocks outside the ROI with |CE| >= 0.1 dB ({results[0]['draws']} "
             "draws per block, shipped demo, ROI 16 px at (48, 56)): median [min, max] over the blocks.", "",
             "| case | blocks | R^2 sharpness | R^2 channel means | R^2 both | DN noise share |",
             "|---|---|---|---|---|---|"]
    for res in results:
        def cell(k):
            if k not in res["median"]:
                return "-"
            lo, hi = res["range"][k]
            return f"{res['median'][k]:.3f} [{lo:.3f}, {hi:.3f}]"
        lines.append(f"| {res['case']} | {len(res['blocks'])} | {cell('sharpness_r2')} | {cell('channel_means_r2')} | "
                     f"{cell('both_r2')} | {cell('noise_share')} |")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("case", list(CASES))
def test_variance_sources(benchmark, case):
    benchmark.group = "variance sources"
    result = benchmark.pedantic(lambda: sources(case), rounds=1, iterations=1)
    benchmark.extra_info.update(median=result["median"])
    out = os.environ.get("CEM_FAST_VARIANCE_OUT")
    if out:
        stem = f"{time.strftime('%Y-%m-%d')}-variance-sources-{case}"
        with open(os.path.join(out, stem + ".json"), "x") as f:  # "x": never over an earlier measurement
            json.dump(result, f, indent=1)
        with open(os.path.join(out, stem + ".md"), "x") as f:
            f.write(table([result]))
    m = result["median"]
    # why the estimator regresses on the channel means and nothing else is built
    assert m["channel_means_r2"] > 0.5 and m["sharpness_r2"] < 0.1
    assert m["both_r2"] - m["channel_means_r2"] < 0.05
    if "noise_share" in m:
        assert m["noise_share"] < 0.25
