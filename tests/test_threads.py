"""cem_fast.threads: a run's CPU threads follow what the process may use and how busy the machine is."""
import numpy as np
import pytest
import torch

from cem_fast import threads


def test_the_load_of_other_processes_takes_threads_away(monkeypatch):
    monkeypatch.delenv("CEM_FAST_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    budget = threads.cpu_budget()
    assert (budget.usable, budget.ceiling, budget.fixed) == (6, 4, False)
    for busy, want in ((0, 4), (2, 4), (3, 3), (5, 1), (40, 1)):
        monkeypatch.setattr(threads, "busy_elsewhere", lambda busy=busy: busy)
        assert threads.threads_now(budget) == want, busy


def test_a_cgroup_quota_bounds_the_threads(monkeypatch):
    monkeypatch.delenv("CEM_FAST_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1.5)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 16)
    budget = threads.cpu_budget()
    assert budget.usable == 2 and budget.ceiling == 2 and "quota 1.5" in budget.why


def test_a_fixed_count_is_kept_and_a_bad_one_refused(monkeypatch):
    monkeypatch.setenv("CEM_FAST_THREADS", "3")
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 10)
    assert threads.threads_now(threads.cpu_budget()) == 3
    monkeypatch.setenv("CEM_FAST_THREADS", "many")
    with pytest.raises(ValueError, match="CEM_FAST_THREADS must be 'auto' or a positive integer, got 'many'"):
        threads.cpu_budget()


def test_the_run_sets_its_threads_and_restores_the_callers(monkeypatch):
    import cem_fast
    monkeypatch.delenv("CEM_FAST_THREADS", raising=False)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(threads, "cpu_budget", lambda: threads.CpuBudget(2, 2, False, "test"))
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3, padding=1))
        img = (np.random.RandomState(1).rand(24, 24, 3) * 255).astype(np.uint8)
        res = cem_fast.causal_effect_map(net, img, task="DN", sigma=30, roi=(8, 8, 8), block=8, coarse=2, fine=2,
                                         progress=False)
        assert res.extra["cpu_threads"]["used"][0] == 2 and res.extra["cpu_threads"]["why"] == "test"
        assert torch.get_num_threads() == 1  # the caller's setting, back
    finally:
        torch.set_num_threads(before)


def test_the_run_queue_is_read_on_linux():
    assert threads.busy_elsewhere() >= 0
    assert "usable CPUs" in threads.describe()


def test_a_run_inside_a_run_keeps_the_outer_governor(monkeypatch):
    """One run per ROI runs inside the many-ROI run: a governor of its own would read the outer one's lowered count
    as the caller's ceiling and could never give the threads back once the load is gone."""
    monkeypatch.delenv("CEM_FAST_THREADS", raising=False)
    monkeypatch.setattr(threads, "cpu_budget", lambda: threads.CpuBudget(2, 2, False, "test"))
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 1)
    monkeypatch.setattr(threads, "RECHECK_S", 0.0)
    before = torch.get_num_threads()
    try:
        with threads.fitted_threads(torch.device("cpu")) as outer:
            assert torch.get_num_threads() == 1
            with threads.fitted_threads(torch.device("cpu")) as inner:
                assert inner is outer
                monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0)  # the other process ended
                inner.recheck()
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 2  # the inner run restored nothing of its own
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
