"""Convergence studies (cem_fast/convergence.py, cem-fast convergence): every plan against a high-sample truth,
each seed given the budget of the paper's plan with that seed; the command's table and plot."""
import json

import numpy as np
import torch

from cem_fast.patches import PatchBank
from model_factories import ConvStack


def test_the_convergence_command_writes_its_table_and_plot(tmp_path, capsys):
    from importlib import resources

    from cem_fast.cli import main
    cfg = tmp_path / "c.yml"
    image = resources.files("cem_fast") / "data" / "demo.png"
    cfg.write_text(f"model: bicubic\nimages: [{image}]\ntask: SR\nscale: 4\nroi: [48, 56, 16]\n")
    assert main(["convergence", str(cfg), "--out", str(tmp_path / "out"), "--truth", "30", "--seeds", "2"]) == 0
    result = json.loads((tmp_path / "out" / "convergence.json").read_text())
    assert [s["plan"] for s in result["summary"]] == [
        "coarse-to-fine 3/50, mean (the paper's)", "coarse-to-fine 3/50", "exhaustive 5", "exhaustive 20",
        "adaptive 3 + up to 50", "adaptive, the paper's forwards"]
    forwards = {(r["plan"], r["seed"]): r["forwards"] for r in result["rows"]}
    for seed in (0, 1):  # each seed's budget is the paper's plan's fine stage with that seed
        assert forwards["adaptive, the paper's forwards", seed] == forwards["coarse-to-fine 3/50, mean (the paper's)",
                                                                            seed]
    assert result["truth"]["draws"] == 30 and all(s["forwards"] > 0 for s in result["summary"])
    assert (tmp_path / "out" / "convergence.png").stat().st_size > 1000
    assert "| coarse-to-fine 3/50 | 2 |" in capsys.readouterr().out
    assert main(["convergence", str(cfg), "--out", str(tmp_path / "o2"), "--truth", "0"]) == 2  # one line, no run
    first = (tmp_path / "out" / "convergence.json").read_bytes()
    assert main(["convergence", str(cfg), "--out", str(tmp_path / "out"), "--truth", "20", "--seeds", "1"]) == 0
    assert (tmp_path / "out" / "convergence.json").read_bytes() == first  # a second study is kept beside it
    assert json.loads((tmp_path / "out" / "convergence_2.json").read_text())["truth"]["draws"] == 20


def test_the_study_gives_each_seed_the_budget_of_the_paper_plan_with_that_seed():
    from cem_fast import convergence
    g = np.random.RandomState(5)
    image = g.randint(0, 256, (32, 32, 3)).astype(np.uint8)
    bank = PatchBank(torch.from_numpy(g.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))
    plans = {"paper": dict(mode="coarse-to-fine", coarse=3, fine=6, estimator="mean"),
             "same forwards": dict(mode="adaptive", coarse=3, fine=6, budget="paper")}
    result = convergence.study(ConvStack(2), image, "DN", (12, 12, 8), truth_draws=20, seeds=range(3), plans=plans,
                               patches=bank, tol=2.0, sigma=25)
    forwards = {(r["plan"], r["seed"]): r["forwards"] for r in result["rows"]}
    assert len({forwards["paper", s] for s in range(3)}) > 1  # the gate lets a different number through per seed
    assert all(forwards["same forwards", s] == forwards["paper", s] for s in range(3))
