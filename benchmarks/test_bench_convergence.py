"""The convergence study (issue 17): map error against a high-sample truth for each sampling plan, counted in
forwards (not timed: the numbers mean the same on any machine). Uses only what the package ships (the demo image,
the bicubic and default denoiser models), so it runs on a clone alone.

``CEM_FAST_BENCH_SIZE=ci``: a 100-draw truth, 2 seeds (a few seconds); full: a 1,000-draw truth, 5 seeds, results
written to benchmarks/results/ when ``CEM_FAST_CONVERGENCE_OUT`` names a folder.
"""
import os
import time
from importlib import resources

import pytest

from cem_fast import convergence

SIZE = os.environ.get("CEM_FAST_BENCH_SIZE", "full")
TRUTH, SEEDS = (100, 2) if SIZE == "ci" else (1000, 5)
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
    assert by_plan["coarse-to-fine 3/50"]["pearson_r"] > 0.9  # the study itself is sane: the paper's plan converges
