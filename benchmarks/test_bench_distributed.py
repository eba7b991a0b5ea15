"""One study on one process against the same study sharded over two processes (issue 18), one thread each.

A forward-bound run: the shipped denoiser (DnCNN, 12 conv x 48) on a crop of the shipped demo image, exact mode
(every block on the whole crop: the forwards are the work), from the CLI, each case a fresh output folder (no
cache). ``1 process`` is ``python -m cem_fast run`` with OMP_NUM_THREADS=1, the baseline row; ``2 processes`` is
``torchrun --standalone --nproc_per_node 2 -m cem_fast run`` with OMP_NUM_THREADS=1 per process (gloo). The
timed value is the whole command (start-up, imports and torchrun's rendezvous included); ``extra_info`` has each
run's own wall time and sampling time from summary.json and the ratios. On 2 cores, 2x is the limit. The two
results must be bit-identical.

``CEM_FAST_BENCH_SIZE=ci``: a 48x48 crop, 3 + 2 draws on every block (tol 0: 180 forwards, a few seconds each);
full: 64x64, 3 + 10 (832 forwards). ``load_before`` is the machine's 1-minute load average when the row started:
other work on the cores shows there.
"""
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

SIZE = os.environ.get("CEM_FAST_BENCH_SIZE", "full")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
CROP, ROI, FINE = ([40, 40, 88, 88], [16, 16, 16], 2) if SIZE == "ci" else ([32, 32, 96, 96], [24, 24, 16], 10)
ROWS: dict = {}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_dist")
    with resources.as_file(resources.files("cem_fast") / "data" / "demo.png") as demo:
        cfg = root / "c.yml"
        cfg.write_text(f"task: DN\nsigma: 50\nmodel: default\nimages: [{demo}]\ncrop: {CROP}\nroi: {ROI}\n"
                       f"coarse: 3\nfine: {FINE}\ntol: 0\nlocality: off\nseed: 0\n")
    return cfg


def run_study(benchmark, cfg: Path, out: Path, launcher: list) -> dict:
    cmd = [*launcher, "-m", "cem_fast", "run", str(cfg), "--out", str(out), "--no-progress", "--fresh"]

    def once():
        p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1800)
        assert p.returncode == 0, p.stderr[-2000:]

    benchmark.group = "distributed: 1 vs 2 processes, 1 thread each"
    load = os.getloadavg()[0]
    benchmark.pedantic(once, rounds=1, iterations=1)
    run_dir = next(out.glob("*/*/summary.json")).parent
    s = json.loads((run_dir / "summary.json").read_text())
    row = {"command_s": benchmark.stats.stats.median if benchmark.stats else None, "run_s": s["wall_time_s"],
           "sampling_s": s["timings_s"]["sampling"], "forwards": s["num_forwards"], "result": run_dir / "result.npz"}
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "result"}, size=SIZE, load_before=load,
                                per_rank=s.get("distributed", {}).get("interventions_per_rank"))
    return row


def test_one_process(benchmark, config, tmp_path):
    ROWS["one"] = run_study(benchmark, config, tmp_path / "one", [sys.executable])


def test_two_processes(benchmark, config, tmp_path):
    one = ROWS.get("one") or pytest.skip("runs after test_one_process (the baseline row)")
    two = run_study(benchmark, config, tmp_path / "two",
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    a, b = np.load(one["result"]), np.load(two["result"])
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # sharding changes no bit
    if one["command_s"] and two["command_s"]:
        benchmark.extra_info.update(speedup_command=one["command_s"] / two["command_s"],
                                    speedup_run=one["run_s"] / two["run_s"],
                                    speedup_sampling=one["sampling_s"] / two["sampling_s"])
