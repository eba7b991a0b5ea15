"""Benchmarks (pytest-benchmark): ratios against a baseline row measured in the same run. Not part of `make test`.

``CEM_FAST_BENCH_ROWS=path.jsonl``: every benchmark test appends its row (median, rounds, extra_info, outcome) to
that file as soon as it finishes, so a run killed at its deadline keeps what it measured (pytest-benchmark writes
its JSON only at the session's end). ``CEM_FAST_BENCH_DEVICES=cuda`` limits the ``device`` fixture (the GPU check
runs no CPU rows there)."""
import json
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
if os.environ.get("CEM_FAST_BENCH_DEVICES"):
    DEVICES = [d for d in DEVICES if d in os.environ["CEM_FAST_BENCH_DEVICES"].split(",")] or DEVICES
ROWS_FILE = os.environ.get("CEM_FAST_BENCH_ROWS")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _row(item, rep) -> dict:
    row = {"kind": "benchmark", "file": item.location[0], "name": item.name, "outcome": rep.outcome,
           "when": rep.when, "test_seconds": round(rep.duration, 4), "time": time.strftime("%H:%M:%S")}
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is not None:
        row["group"] = getattr(bench, "group", None)
        stats = getattr(getattr(bench, "stats", None), "stats", None)
        if stats is not None:
            row.update(median=stats.median, min=stats.min, max=stats.max, rounds=stats.rounds)
        row["extra_info"] = dict(getattr(bench, "extra_info", {}) or {})
    if rep.skipped and isinstance(rep.longrepr, tuple):
        row["reason"] = str(rep.longrepr[2])[:300]
    elif rep.failed:
        row["error"] = str(rep.longrepr)[-2000:]
    return row


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not ROWS_FILE or not (rep.when == "call" or rep.skipped or rep.failed):
        return
    try:
        with open(ROWS_FILE, "a") as f:
            f.write(json.dumps(_row(item, rep), default=str) + "\n")
    except Exception as e:  # noqa: BLE001 - a row lost is no reason to lose the run
        print(f"benchmark row not written: {e}")
