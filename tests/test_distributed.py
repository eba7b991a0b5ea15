"""A study sharded across processes (torch.distributed, gloo, 2 ranks on this machine): bit-identical to one
process, resumable after a killed rank, a rank's own failure fails the run on every rank without a hang, and the
Python API under a process group started by the caller."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import cem_fast
from cem_fast import distributed
from cem_fast import options
from model_factories import TinyNet

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

TESTS = Path(__file__).parent
# one thread per process: two ranks on two cores, and the same arithmetic in every process
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
RESULT = Path("make_fdncnn") / "im" / "result.npz"
TIMEOUT = 120

# a rank of a study as torchrun starts it (RANK, WORLD_SIZE, MASTER_* in the environment), with an injected
# failure on rank 1 after T_AFTER scored batches: T_MODE=kill ends the process (os._exit), raise raises once
DRIVER = r"""
import os, sys
after, mode = int(os.environ.get("T_AFTER", "0")), os.environ.get("T_MODE", "")
if mode and os.environ["RANK"] == "1":
    from cem_fast.pipeline.runner import HostCopies
    real, calls = HostCopies.start, []
    def start(self, *a, **k):
        calls.append(1)
        if len(calls) == after + 1:
            if mode == "kill":
                os._exit(9)
            raise RuntimeError("injected failure on rank 1")
        return real(self, *a, **k)
    HostCopies.start = start
from cem_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A config (FDnCNN, DN on a random 32x32 image, 3 + 6 draws, every block gated) and its 1-process result."""
    root = tmp_path_factory.mktemp("dist")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3)).astype(np.uint8)).save(root / "im.png")
    cfg = root / "c.yml"
    cfg.write_text(f"task: DN\nsigma: 30\nmodel: model_factories:make_fdncnn\nimages: [{root / 'im.png'}]\n"
                   "roi: [8, 8, 8]\ncoarse: 3\nfine: 6\ntol: 0\nseed: 3\nbatch_size: 4\n"
                   "model_options: {noise_level: 30}\n")
    p = cli(cfg, root / "one")  # python -m cem_fast: the entry torchrun runs
    assert p.returncode == 0, p.stderr
    return cfg, root


def cli(cfg, out, *extra, launcher=()):
    cmd = [*launcher, *([] if launcher else [sys.executable]), "-m", "cem_fast", "run", str(cfg), "--out",
           str(out), "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)


def torchrun(cfg, out, n, *extra):
    return cli(cfg, out, *extra, launcher=(*TORCHRUN, "--nproc_per_node", str(n)))


def assert_same_result(a: Path, b: Path):
    x, y = np.load(a), np.load(b)
    assert x.files == y.files
    for k in x.files:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)  # NaN == NaN here, every other bit must match


def summary(out: Path) -> dict:
    return json.loads((out / RESULT.parent / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(cfg, out, mode="", after=0, size=2):
    """The ranks of a study started by hand as torchrun would (RANK, WORLD_SIZE, ...), each a process."""
    port = free_port()
    procs = []
    for r in range(size):
        env = {**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "T_MODE": mode, "T_AFTER": str(after)}
        cmd = [sys.executable, "-c", DRIVER, "run", str(cfg), "--out", str(out), "--no-progress"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=TIMEOUT), *p.communicate()) for p in procs]


def test_shards_are_contiguous_balanced_and_cover_everything():
    for n in (0, 1, 5, 81, 1000):
        for size in (1, 2, 3, 7):
            cuts = [distributed.shard(n, r, size) for r in range(size)]
            assert cuts[0][0] == 0 and cuts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
            assert max(e - s for s, e in cuts) - min(e - s for s, e in cuts) <= 1
    assert distributed.world() == (0, 1) and distributed.shard(10) == (0, 10)  # no group: everything here


def test_two_ranks_give_the_one_process_result_bit_for_bit(study):
    cfg, root = study
    p = torchrun(cfg, root / "two", 2)
    assert p.returncode == 0, p.stderr
    assert_same_result(root / "one" / RESULT, root / "two" / RESULT)
    s, one = summary(root / "two"), summary(root / "one")
    assert s["distributed"]["world_size"] == 2
    per_rank = s["distributed"]["interventions_per_rank"]
    assert min(per_rank) > 0 and abs(per_rank[0] - per_rank[1]) <= 2  # equal slices of each stage
    assert s["num_forwards"] == one["num_forwards"]  # the study's forwards, as in one process
    assert p.stdout.count("report:") == 1 and p.stderr.count("Y(I)") == 1  # rank 0 alone speaks
    assert not [f for f in (root / "two").rglob(".*.tmp*")]  # no temporaries left by racing ranks
    chunks = sorted((root / "two").glob(".cem_cache/*/coarse/*.npz"))
    assert len({c.name for c in chunks}) == len(chunks) >= 2


def test_a_killed_rank_loses_no_finished_batch_and_the_rerun_is_identical(study):
    cfg, root = study
    out = root / "killed"
    (rc0, _, err0), (rc1, _, _) = ranks(cfg, out, mode="kill", after=3)  # rank 1 dies after 3 batches
    assert rc1 == 9 and rc0 != 0, err0  # rank 0 does not wait forever for a dead peer
    n = sum(int(c.stem.split("-")[1]) for c in (root / "one").glob(".cem_cache/*/coarse/*.npz"))
    starts = [int(c.stem.split("-")[0]) for c in out.glob(".cem_cache/*/coarse/*.npz")]
    assert min(starts) < n // 2 <= max(starts)  # both ranks' finished batches are in the cache (rank 1: 2 of them)
    p = torchrun(cfg, out, 2)  # the restart (torchrun's elastic restart does the same)
    assert p.returncode == 0, p.stderr
    assert summary(out)["reused_from_cache"] > 0
    assert_same_result(root / "one" / RESULT, out / RESULT)
    again = torchrun(cfg, out, 1)  # another world size (one rank) reuses every chunk: nothing recomputed
    s = summary(out)
    assert again.returncode == 0 and s["num_forwards"] + s["reused_from_cache"] == summary(root / "one")["num_forwards"]
    assert_same_result(root / "one" / RESULT, out / RESULT)


def test_a_failure_on_one_rank_fails_the_run_on_all_without_a_hang(study):
    cfg, root = study
    (root / "im2.png").write_bytes((root / "im.png").read_bytes())
    two = root / "two_images.yml"
    two.write_text(cfg.read_text().replace("im.png]", f"im.png, {root / 'im2.png'}]"))
    (rc0, out0, err0), (rc1, _, err1) = ranks(two, root / "failed", mode="raise", after=2)
    assert rc0 == 1 and rc1 == 1, err0 + err1
    lines = [ln for ln in err0.splitlines() if "error" in ln]
    assert lines == ["cem-fast: error: make_fdncnn on im.png: rank 1 failed: injected failure on rank 1"], err0
    assert "Traceback" not in err0 + err1 and err1 == ""  # rank 0 alone speaks
    assert json.loads((root / "failed" / RESULT.parent / "error.json").read_text())["error"].startswith("rank 1")
    assert_same_result(root / "one" / RESULT, root / "failed" / "make_fdncnn" / "im2" / "result.npz")  # went on


# coarse-to-fine, and the adaptive mode where this tree has it (its rounds depend on the gathered scores)
MODES = [dict(mode="coarse-to-fine", fine=5, tol=0)] + \
    ([dict(mode="adaptive", fine=16, tol=0.05)] if "adaptive" in options.MODES else [])


def api_maps() -> list:
    img = np.random.RandomState(1).randint(0, 256, (24, 32, 3)).astype(np.uint8)
    return [cem_fast.causal_effect_map(TinyNet(), img, task="DN", sigma=30, roi=(8, 8, 8), coarse=3, seed=2,
                                       batch_size=3, progress=False, **m) for m in MODES]


def _api_rank(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        for i, res in enumerate(api_maps()):
            np.savez(Path(out) / f"rank{rank}_{i}.npz", effect=res.effect, coarse=res.samples_coarse,
                     fine=res.samples_fine, world=res.extra["distributed"]["world_size"])
        if rank == 1:
            with distributed.alone():  # called on one rank only: runs whole, never waits for the others
                res = api_maps()[0]
            np.savez(Path(out) / "alone.npz", effect=res.effect, sharded="distributed" in res.extra)
    finally:
        dist.destroy_process_group()


def test_the_python_api_under_an_initialised_group(tmp_path):
    import torch.multiprocessing as mp
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wants = api_maps()
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_api_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):  # every rank returns the whole result
        for i, want in enumerate(wants):
            got = np.load(tmp_path / f"rank{r}_{i}.npz")
            assert int(got["world"]) == 2
            np.testing.assert_array_equal(got["effect"], want.effect)
            np.testing.assert_array_equal(got["coarse"], want.samples_coarse)
            np.testing.assert_array_equal(got["fine"], want.samples_fine)
    alone = np.load(tmp_path / "alone.npz")
    assert not alone["sharded"]
    np.testing.assert_array_equal(alone["effect"], wants[0].effect)


def test_a_study_under_two_ranks_equals_the_one_process_study(study):
    """cem-fast study shards like run: two torchrun ranks give the one-process study's rows (the same draws)."""
    cfg, root = study

    def run_study(out, launcher=()):
        cmd = [*launcher, *([] if launcher else [sys.executable]), "-m", "cem_fast", "study", str(cfg), "--out",
               str(out), "--no-progress"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)

    one = run_study(root / "study_one")
    assert one.returncode == 0, one.stderr
    two = run_study(root / "study_two", launcher=(*TORCHRUN, "--nproc_per_node", "2"))
    assert two.returncode == 0, two.stderr
    rows = [json.loads((root / d / "study.json").read_text())["rows"] for d in ("study_one", "study_two")]
    assert len(rows[0]) == 1 and rows[0] == rows[1]


def test_a_field_under_two_ranks_equals_the_one_process_field(study, tmp_path):
    """`cem-fast field` under torchrun: every rank computes its share of each chunk, rank 0 writes; the field's
    estimates and metric maps are the one process's, bit for bit."""
    _, root = study
    cfg = tmp_path / "f.yml"
    cfg.write_text(f"task: DN\nsigma: 30\nmodel: model_factories:make_fdncnn\nimage: {root / 'im.png'}\n"
                   "tile: 16\ncoarse: 2\nfine: 3\nseed: 3\nbatch_size: 4\nmodel_options: {noise_level: 30}\n")

    def field(out, launcher=(sys.executable,)):
        return subprocess.run([*launcher, "-m", "cem_fast", "field", str(cfg), "--out", str(out), "--no-progress"],
                              capture_output=True, text=True, timeout=TIMEOUT, env=ENV)

    one = field(tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = field(tmp_path / "two", launcher=(*TORCHRUN, "--nproc_per_node", "2"))
    assert two.returncode == 0, two.stderr
    for name in ("field.npz", "metrics.npz"):
        assert_same_result(tmp_path / "one" / name, tmp_path / "two" / name)
