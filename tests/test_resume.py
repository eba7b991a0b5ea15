"""Nothing lost on a crash: cached samples, resume after a kill, stale entries never reused, OOM back-off,
NaN/Inf outputs reported."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.patches import PatchBank


class Blur(torch.nn.Module):
    """Batch-invariant model: the same outputs whatever the batch composition."""

    def forward(self, x):
        return 0.9 * (x + x.roll(1, -1) + x.roll(-1, -1)) / 3 + 0.05


class OOMAbove(torch.nn.Module):
    """Raises torch.OutOfMemoryError for batches larger than ``limit``."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: batch {x.shape[0]} > {self.limit})")
        return self.inner(x)


@pytest.fixture
def img(rng):
    return rng.randint(0, 256, (24, 32, 3)).astype(np.uint8)


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (16, 3, 8, 8)).astype(np.uint8)))


def cem(model, img, bank, **kw):
    # exact mode: these tests count forwards; locality has its own resume test
    args = dict(task="DN", sigma=30, roi=(8, 8, 8), coarse=3, fine=6, patches=bank, seed=4, batch_size=5,
                locality="off")
    args.update(kw)
    return cem_fast.causal_effect_map(model, img, **args)


def crash_after(monkeypatch, batches: int, run) -> None:
    """Run ``run()`` and let the process "die" (KeyboardInterrupt) once ``batches`` batches were scored (the crash
    comes as the next batch's scores are handed over, whichever way the batch was scored)."""
    from cem_fast.pipeline.runner import HostCopies
    real = HostCopies.start
    calls = []

    def crashing(self, *a, **k):
        calls.append(1)
        if len(calls) > batches:
            raise KeyboardInterrupt("simulated crash")
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(HostCopies, "start", crashing)
        with pytest.raises(KeyboardInterrupt):
            run()


def test_a_crashed_run_resumes_to_identical_samples(img, bank, tmp_path, monkeypatch):
    want = cem(Blur(), img, bank)
    crash_after(monkeypatch, 3, lambda: cem(Blur(), img, bank, cache=tmp_path))  # 3 batches kept
    got = cem(Blur(), img, bank, cache=tmp_path)
    assert got.extra["reused_from_cache"] == 15  # three batches of 5 were kept
    np.testing.assert_array_equal(got.samples_coarse, want.samples_coarse)
    np.testing.assert_array_equal(got.samples_fine, want.samples_fine)
    again = cem(Blur(), img, bank, cache=tmp_path)
    # the whole input's forward, and the same again at the end (Y(I) must be reproduced): nothing else
    assert again.num_forwards == 2 and again.extra["reused_from_cache"] == want.num_forwards - 2


def test_speed_mode_resumes_too(img, bank, tmp_path, monkeypatch):
    """Locality on: the probe runs again on resume, finds the same crop, hence the same cache entry."""
    from helpers import ConvStack
    img = np.tile(img, (3, 3, 1))  # 72x96: room to skip blocks
    want = cem(ConvStack(2), img, bank, locality="auto", roi=(32, 40, 8))
    assert want.extra["locality"]["active"]
    crash_after(monkeypatch, 2, lambda: cem(ConvStack(2), img, bank, cache=tmp_path, locality="auto",
                                            roi=(32, 40, 8)))
    got = cem(ConvStack(2), img, bank, cache=tmp_path, locality="auto", roi=(32, 40, 8))
    assert got.extra["reused_from_cache"] > 0
    np.testing.assert_allclose(got.samples_coarse, want.samples_coarse, atol=1e-9)
    np.testing.assert_allclose(got.cem, want.cem, atol=1e-9)


@pytest.mark.parametrize("change", [dict(seed=5), dict(sigma=20), dict(roi=(0, 8, 8)), dict(tol=0.5),
                                    dict(fine=7), dict(block=4)])
def test_a_changed_configuration_never_reuses_samples(img, bank, tmp_path, change):
    cem(Blur(), img, bank, cache=tmp_path)
    assert cem(Blur(), img, bank, cache=tmp_path, **change).extra["reused_from_cache"] == 0


def test_a_changed_model_or_image_never_reuses_samples(img, bank, tmp_path):
    cem(Blur(), img, bank, cache=tmp_path)
    other = Blur()
    other.register_buffer("w", torch.ones(1))  # different weights -> different key
    assert cem(other, img, bank, cache=tmp_path).extra["reused_from_cache"] == 0
    img2 = img.copy()
    img2[0, 0, 0] ^= 1
    assert cem(Blur(), img2, bank, cache=tmp_path).extra["reused_from_cache"] == 0


def test_batch_size_and_fresh(img, bank, tmp_path):
    want = cem(Blur(), img, bank, cache=tmp_path)
    got = cem(Blur(), img, bank, cache=tmp_path, batch_size=7)  # not part of the key
    assert got.extra["reused_from_cache"] == want.num_forwards - 2  # all but Y(I) at the start and the end
    fresh = cem(Blur(), img, bank, cache=tmp_path, fresh=True)
    assert fresh.extra["reused_from_cache"] == 0
    np.testing.assert_array_equal(fresh.samples_coarse, want.samples_coarse)


def test_damaged_chunks_are_recomputed(img, bank, tmp_path):
    want = cem(Blur(), img, bank, cache=tmp_path)
    chunks = sorted(tmp_path.glob("*/coarse/*.npz"))
    chunks[0].write_bytes(b"garbage")
    chunks[1].write_bytes(chunks[1].read_bytes()[:40])  # truncated
    got = cem(Blur(), img, bank, cache=tmp_path)
    assert got.num_forwards == 2 + 10  # Y(I) at the start and the end, and the two chunks of 5
    np.testing.assert_array_equal(got.samples_coarse, want.samples_coarse)


def test_out_of_memory_backs_off_and_completes(img, bank):
    want = cem(Blur(), img, bank, batch_size=64)
    got = cem(OOMAbove(Blur(), 3), img, bank, batch_size=64)
    assert got.extra["oom_backoffs"] > 0 and got.extra["final_batch_size"] <= 3
    np.testing.assert_array_equal(got.samples_coarse, want.samples_coarse)
    np.testing.assert_array_equal(got.samples_fine, want.samples_fine)
    with pytest.raises(RuntimeError, match="out of memory"):
        cem(OOMAbove(Blur(), 0), img, bank)


class BadWhenCornerChanges(torch.nn.Module):
    """Outputs ``value`` everywhere for inputs whose top-left pixel differs from the clean image's."""

    def __init__(self, corner, value):
        super().__init__()
        self.corner, self.value = corner, value

    def forward(self, x):
        out = x.clone()
        out[x[:, 0, 0, 0] != self.corner] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_outputs_are_reported_not_averaged(img, bank, value):
    corner = torch.tensor(float(img[0, 0, 0])) / 255
    with pytest.raises(ValueError, match=r"NaN/Inf outputs in the ROI for \d+ coarse interventions \(first: "
                                         r"block \(0, 0\), draw 0\)"):
        cem(BadWhenCornerChanges(corner, value), img, bank, task="identity")


@pytest.mark.slow
def test_soak_random_kills_of_the_cli(tmp_path, demo2):
    """Kill -9 the CLI at random moments; every re-run continues and the final result equals an uninterrupted
    run; no cache file is ever unreadable."""
    from PIL import Image
    Image.fromarray(demo2[:96, :96]).save(tmp_path / "im.png")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"task: DN\nmodel: default\nimages: [{tmp_path / 'im.png'}]\nroi: [24, 24, 16]\n"
                   "coarse: 3\nfine: 20\nbatch_size: 4\nlocality: off\n")
    cmd = [sys.executable, "-m", "cem_fast.cli", "run", str(cfg), "--no-progress", "--out"]
    ref = subprocess.run(cmd + [str(tmp_path / "ref")], capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    rnd = random.Random(0)
    kills, deadline = 0, time.time() + 30
    while time.time() < deadline:
        p = subprocess.Popen(cmd + [str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(1.5, 3.5))  # the import takes about 1.5 s
        if p.poll() is not None:
            break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        for f in out.glob(".cem_cache/*/*/*.npz"):
            np.load(f)["scores"]  # whole chunks only: never a partial file under a chunk name
    final = subprocess.run(cmd + [str(out)], capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert kills >= 2
    a = np.load(tmp_path / "ref" / "default_denoiser" / "im" / "result.npz")
    b = np.load(out / "default_denoiser" / "im" / "result.npz")
    for k in ("cem", "samples_coarse", "samples_fine", "psnr_origin"):
        np.testing.assert_array_equal(a[k], b[k])
