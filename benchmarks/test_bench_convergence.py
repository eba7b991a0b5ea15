"""The convergence study (issue 17): map error against a high-sample truth for each sampling plan, counted in
forwards (not timed: the numbers mean the same on any machine). Uses only what the package ships (the demo image,
the bicubic and default denoiser models), so it runs on a clone alone.

``CEM_FAST_BENCH_SIZE=ci``: a 100-draw truth, 2 seeds (a few seconds); full: a 1,000-draw truth, 20 seeds (the
coverage of 12-32 rated blocks needs that many runs to be read to +-0.01-0.015), results written to
benchmarks/results/ when ``CEM_FAST_CONVERGENCE_OUT`` names a folder.

The issue's targets are asserted on the full study: adaptive at the paper's plan's forwards has a higher Pearson r
and at most half its sign errors; adaptive with its default rule at most the paper's mean absolute error with
under 60 % of its forwards; the intervals of our estimator from at least 11 draws cover the truth in 93-97 % of
blocks (the paper's plain means are reported, not held to it).
"""
import os
import time
from importlib import resources

import pytest

from cem_fast import convergence

SIZE = os.environ.get("CEM_FAST_BENCH_SIZE", "full")
TRUTH, SEEDS = (100, 2) if SIZE == "ci" else (1000, 20)
CASES = {"bicubic-SR": ("bicubic", "SR", dict(scale=4)), "default-DN": ("default", "DN", dict(sigma=50))}


@pytest.mark.parametrize("case", list(CASES))
def test_convergence(benchmark, case):
    model, task, opts = CASES[case]
    image = str(resources.files("cem_fast") / "data" / "demo.png")
    benchmark.group = "convergence"
    result = benchmark.pedantic(lambda: convergence.study(model, image, task, (48, 56, 16), truth_draws=TRUTH,
                                                          seeds=range(SEEDS), **opts), rounds=1, iterations=1)
    benchmark.extra_info.update(truth=result["truth"], summary=result["summary"])
    out = os.environ.get("CEM_FAST_CONVERGENCE_OUT")
    if out:
        convergence.save(result, out, stem=f"{time.strftime('%Y-%m-%d')}-convergence-{case}")  # counts: any device
    by_plan = {s["plan"]: s for s in result["summary"]}
    paper = by_plan[convergence.PAPER]
    assert paper["pearson_r"] > 0.9  # the study itself is sane: the paper's plan converges
    if SIZE == "ci":
        return
    same = by_plan["adaptive, the paper's forwards"]
    assert abs(same["forwards"] - paper["forwards"]) <= 0.01 * paper["forwards"]
    assert same["pearson_r"] > paper["pearson_r"] and same["sign_errors"] <= paper["sign_errors"] / 2
    adaptive = by_plan["adaptive 3 + up to 50"]
    assert adaptive["forwards"] < 0.6 * paper["forwards"] and adaptive["mae_db"] <= paper["mae_db"]
    for name in ("coarse-to-fine 3/50", "exhaustive 20", "adaptive 3 + up to 50", "adaptive, the paper's forwards"):
        assert 0.93 <= by_plan[name]["coverage"] <= 0.97, name
