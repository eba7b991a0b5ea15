"""How close is a map to the truth, for how many forwards? A convergence study (docs/uncertainty.md).

The truth is a high-sample map (``truth_draws`` draws for every block, exhaustive, with a seed none of the plans
uses). Each sampling plan runs with a few seeds: the paper's (coarse-to-fine 3/50 with plain means), the same
with our default control-variate estimate, exhaustive K, adaptive with its default stopping rule, and adaptive
given the paper's plan's forwards (same seed) as its budget. Its map error against the truth is measured outside
the ROI, on the blocks that can reach it: Pearson r of the effects, sign errors where the truth's |CE| >= 0.1 dB,
mean absolute error, and the coverage of the 95 % intervals (the fraction of blocks with an interval whose
interval holds the true effect; coarse-to-fine's screened blocks have none, and the share of blocks that have
one is reported beside it). Forwards are counted, not timed: the study means the same on any machine.

    cem-fast convergence CONFIG.yml --out DIR [--truth 1000] [--seeds 3]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .fileio import atomic_write
from .jsonsafe import json_bytes

TRUTH_SEED = 1_000_003  # draws no plan makes (plans use seeds 0, 1, 2, ...)
BIG_DB = 0.1  # sign errors are counted where the truth's |CE| reaches this
PAPER = "coarse-to-fine 3/50, mean (the paper's)"
PLANS: dict[str, dict] = {
    PAPER: dict(mode="coarse-to-fine", coarse=3, fine=50, estimator="mean"),
    "coarse-to-fine 3/50": dict(mode="coarse-to-fine", coarse=3, fine=50),
    "exhaustive 5": dict(mode="exhaustive", samples=5),
    "exhaustive 20": dict(mode="exhaustive", samples=20),
    "adaptive 3 + up to 50": dict(mode="adaptive", coarse=3, fine=50),
    # the same seed's forwards as the paper's plan (its fine stage's count is the budget), free to give a block up to
    # 200 extra draws where the paper gives 50
    "adaptive, the paper's forwards": dict(mode="adaptive", coarse=3, fine=200, budget=PAPER),
}


def map_error(res, truth) -> dict[str, Any]:
    """Error of ``res`` against ``truth`` on the rated blocks (outside the ROI, reachable in the truth)."""
    rated = ~truth.roi_mask & truth.reachable
    ours, true = res.effect[rated], truth.effect[rated]
    big = np.abs(true) >= BIG_DB
    low, high = res.interval()
    inside = (low[rated] <= true) & (true <= high[rated])
    has_interval = np.isfinite(low[rated])  # coarse-to-fine's screened blocks have none
    r = float(np.corrcoef(ours, true)[0, 1]) if ours.size > 1 and ours.std() > 0 and true.std() > 0 else None
    return {"forwards": int(res.num_forwards), "pearson_r": r,
            "sign_errors": int((np.sign(ours[big]) != np.sign(true[big])).sum()), "big_blocks": int(big.sum()),
            "mae_db": float(np.abs(ours - true).mean()) if ours.size else 0.0,
            "coverage": float(inside[has_interval].mean()) if has_interval.any() else None,
            "with_interval": float(has_interval.mean()) if has_interval.size else None}


def study(model, image, task: str, roi, truth_draws: int = 1000, seeds: Sequence[int] = (0, 1, 2),
          plans: Optional[dict[str, dict]] = None, **options: Any) -> dict[str, Any]:
    """The truth, then every plan with every seed; returns rows per run and a summary per plan (means)."""
    from .estimator import causal_effect_map
    options.setdefault("progress", False)
    truth = causal_effect_map(model, image, task, roi=roi, mode="exhaustive", samples=truth_draws,
                              seed=TRUTH_SEED, **options)
    rows, fine_forwards = [], {}
    for name, plan in (plans or PLANS).items():
        for seed in seeds:
            this = dict(plan)
            if isinstance(plan.get("budget"), str):  # another plan's fine-stage forwards, this seed's
                this["budget"] = fine_forwards[plan["budget"], seed]
            res = causal_effect_map(model, image, task, roi=roi, seed=seed, **this, **options)
            fine_forwards[name, seed] = int(res.gated.sum()) * res.draws()[1]
            rows.append({"plan": name, "seed": int(seed), **map_error(res, truth)})
    return {"truth": {"draws": truth_draws, "forwards": truth.num_forwards, "seed": TRUTH_SEED,
                      "rated_blocks": int((~truth.roi_mask & truth.reachable).sum()),
                      "median_half_width_db": truth.uncertainty()["median_half_width_db"]},
            "rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per plan: the mean of every number over its seeds."""
    out = []
    for name in dict.fromkeys(r["plan"] for r in rows):
        mine = [r for r in rows if r["plan"] == name]
        mean = {}
        for key in ("forwards", "pearson_r", "sign_errors", "mae_db", "coverage", "with_interval"):
            vals = [r[key] for r in mine if r[key] is not None]
            mean[key] = float(np.mean(vals)) if vals else None
        out.append({"plan": name, "runs": len(mine), "big_blocks": mine[0]["big_blocks"], **mean})
    return out


def table(result: dict) -> str:
    """The summary as a Markdown table."""
    t = result["truth"]
    lines = [f"Truth: {t['draws']} draws per block ({t['forwards']:,} forwards), {t['rated_blocks']} rated blocks "
             f"(outside the ROI, reachable); sign errors where the truth's |CE| >= {BIG_DB} dB.", "",
             "| plan | runs | forwards (mean) | Pearson r | sign errors | MAE (dB) | 95 % CI coverage | blocks with "
             "an interval |", "|---|---|---|---|---|---|---|---|"]
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for s in result["summary"]:
        lines.append(f"| {s['plan']} | {s['runs']} | {s['forwards']:,.0f} | {f(s['pearson_r'], '.4f')} | "
                     f"{f(s['sign_errors'], '.2f')} of {s['big_blocks']} | {f(s['mae_db'], '.4f')} | "
                     f"{f(s['coverage'], '.3f')} | {f(s['with_interval'], '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: "str | os.PathLike") -> None:
    """Map error (1 - r and MAE) against forwards: a faint point per run and a large one at the plan's means, one
    colour per plan (plans with the same forwards overlap: the large points keep them apart)."""
    from .plotting import plt, save_figure
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, name in enumerate(dict.fromkeys(r["plan"] for r in result["rows"])):
        mine = [r for r in result["rows"] if r["plan"] == name]
        colour = f"C{i}"
        fw = [r["forwards"] for r in mine]
        for ax, ys in ((axes[0], [1 - (r["pearson_r"] or 0) for r in mine]), (axes[1], [r["mae_db"] for r in mine])):
            ax.scatter(fw, ys, color=colour, alpha=0.3, s=14)
            ax.scatter([np.mean(fw)], [np.mean(ys)], color=colour, s=90, edgecolor="black", label=name, zorder=3)
    for ax, what in zip(axes, ("1 - Pearson r against the truth", "mean |CE - truth| (dB)")):
        ax.set_xlabel("forwards")
        ax.set_ylabel(what)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"convergence against {result['truth']['draws']} draws per block")
    fig.tight_layout()
    save_figure(fig, Path(path))


def save(result: dict, out_dir: "str | os.PathLike", stem: str = "convergence") -> Path:
    """Write ``stem``.json, .md and .png into ``out_dir``; a study already there is kept: this one takes
    ``stem_2``, ``stem_3``, ... Returns the .json path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, i = stem, 1
    while any((out / f"{name}{ext}").exists() for ext in (".json", ".md", ".png")):
        i += 1
        name = f"{stem}_{i}"
    atomic_write(out / f"{name}.json", lambda f: f.write(json_bytes(result)))
    text = table(result)
    atomic_write(out / f"{name}.md", lambda f: f.write(text.encode()))
    plot(result, out / f"{name}.png")
    return out / f"{name}.json"
