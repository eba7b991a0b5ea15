"""The crash-safe sample cache (cem_fast/cache.py): a crashed run resumes to identical samples, a changed
configuration, model (its weights or its code) or image never reuses samples, checksummed chunks that are
damaged, swapped, of other interventions or of another run are dropped and recomputed, and a cache that cannot
be used is skipped with one warning."""
import importlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cem_fast
from cem_fast.cache import RunCache
from cem_fast.patches import PatchBank
from helpers import exact_cem, random_image
from model_factories import Drifts, OutOfPlace, RollBlur


@pytest.fixture
def img(rng):
    return rng.randint(0, 256, (24, 32, 3)).astype(np.uint8)


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (16, 3, 8, 8)).astype(np.uint8)))


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
    want = exact_cem(RollBlur(), img, bank)
    crash_after(monkeypatch, 3, lambda: exact_cem(RollBlur(), img, bank, cache=tmp_path))  # 3 batches kept
    got = exact_cem(RollBlur(), img, bank, cache=tmp_path)
    assert got.extra["reused_from_cache"] == 15  # three batches of 5 were kept
    np.testing.assert_array_equal(got.samples_coarse, want.samples_coarse)
    np.testing.assert_array_equal(got.samples_fine, want.samples_fine)
    again = exact_cem(RollBlur(), img, bank, cache=tmp_path)
    # the whole input's forward, and the same again at the end (Y(I) must be reproduced): nothing else
    assert again.num_forwards == 2 and again.extra["reused_from_cache"] == want.num_forwards - 2


def test_speed_mode_resumes_too(img, bank, tmp_path, monkeypatch):
    """Locality on: the probe runs again on resume, finds the same crop, hence the same cache entry."""
    from model_factories import ConvStack
    img = np.tile(img, (3, 3, 1))  # 72x96: room to skip blocks
    want = exact_cem(ConvStack(2), img, bank, locality="auto", roi=(32, 40, 8))
    assert want.extra["locality"]["active"]
    crash_after(monkeypatch, 2, lambda: exact_cem(ConvStack(2), img, bank, cache=tmp_path, locality="auto",
                                            roi=(32, 40, 8)))
    got = exact_cem(ConvStack(2), img, bank, cache=tmp_path, locality="auto", roi=(32, 40, 8))
    assert got.extra["reused_from_cache"] > 0
    np.testing.assert_allclose(got.samples_coarse, want.samples_coarse, atol=1e-9)
    np.testing.assert_allclose(got.cem, want.cem, atol=1e-9)


@pytest.mark.parametrize("change", [dict(seed=5), dict(sigma=20), dict(roi=(0, 8, 8)), dict(tol=0.5),
                                    dict(fine=7), dict(block=4)])
def test_a_changed_configuration_never_reuses_samples(img, bank, tmp_path, change):
    exact_cem(RollBlur(), img, bank, cache=tmp_path)
    assert exact_cem(RollBlur(), img, bank, cache=tmp_path, **change).extra["reused_from_cache"] == 0


def test_a_changed_model_or_image_never_reuses_samples(img, bank, tmp_path):
    exact_cem(RollBlur(), img, bank, cache=tmp_path)
    other = RollBlur()
    other.register_buffer("w", torch.ones(1))  # different weights -> different key
    assert exact_cem(other, img, bank, cache=tmp_path).extra["reused_from_cache"] == 0
    img2 = img.copy()
    img2[0, 0, 0] ^= 1
    assert exact_cem(RollBlur(), img2, bank, cache=tmp_path).extra["reused_from_cache"] == 0


def test_batch_size_and_fresh(img, bank, tmp_path):
    want = exact_cem(RollBlur(), img, bank, cache=tmp_path)
    got = exact_cem(RollBlur(), img, bank, cache=tmp_path, batch_size=7)  # not part of the key
    assert got.extra["reused_from_cache"] == want.num_forwards - 2  # all but Y(I) at the start and the end
    fresh = exact_cem(RollBlur(), img, bank, cache=tmp_path, fresh=True)
    assert fresh.extra["reused_from_cache"] == 0
    np.testing.assert_array_equal(fresh.samples_coarse, want.samples_coarse)


def test_damaged_chunks_are_recomputed(img, bank, tmp_path):
    want = exact_cem(RollBlur(), img, bank, cache=tmp_path)
    chunks = sorted(tmp_path.glob("*/coarse/*.npz"))
    chunks[0].write_bytes(b"garbage")
    chunks[1].write_bytes(chunks[1].read_bytes()[:40])  # truncated
    got = exact_cem(RollBlur(), img, bank, cache=tmp_path)
    assert got.num_forwards == 2 + 10  # Y(I) at the start and the end, and the two chunks of 5
    np.testing.assert_array_equal(got.samples_coarse, want.samples_coarse)


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


# ---- the checksummed chunks of the sample cache ----------------------------------------------------------------------

STRIDE = 1 << 20  # cem_fast.estimator.DRAW_STRIDE; the cache only compares ids, so any stride would do


@pytest.fixture
def stage(rng, tmp_path):
    """A cache holding the "coarse" stage: 24 interventions of width 2, in three chunks of 8."""
    blocks, draws = np.repeat(np.arange(6), 4), np.tile(np.arange(4), 6)
    ids = (blocks * STRIDE + draws).astype(np.int64)
    scores = rng.uniform(10, 40, (24, 2))
    cache = RunCache(tmp_path, "k", {})
    for s in (0, 8, 16):
        cache.save("coarse", s, scores[s:s + 8], ids[s:s + 8])
    files = sorted((cache.dir / "coarse").glob("*.npz"))
    assert [f.name for f in files] == ["000000000-000008.npz", "000000008-000008.npz", "000000016-000008.npz"]
    return cache, ids, scores, files


def reload(cache):
    """A fresh RunCache on the same entry, as a resumed run makes one."""
    return RunCache(cache.dir.parent, cache.dir.name, {})


def test_an_intact_cache_round_trips_exactly(stage):
    cache, ids, scores, _ = stage
    again = reload(cache)
    got, done = again.load("coarse", 24, 2, ids)
    assert done.all() and again.dropped == []
    np.testing.assert_array_equal(got, scores)  # bit for bit: no text or float32 detour
    # ids may come as a torch tensor (the caller's are on the model's device)
    got, done = again.load("coarse", 24, 2, torch.from_numpy(ids))
    assert done.all()
    # save also takes the stage's whole ids and cuts out its rows
    again.save("fine", 3, scores[3:7], ids)
    got, done = again.load("fine", 24, 2, ids)
    assert done.tolist() == [False] * 3 + [True] * 4 + [False] * 17
    np.testing.assert_array_equal(got[3:7], scores[3:7])


def test_a_flipped_bit_drops_only_that_chunk(stage):
    cache, ids, scores, files = stage
    # a bit flipped in the file itself (zip's own CRC may catch it first: any reason will do)
    raw = bytearray(files[1].read_bytes())
    at = bytes(raw).index(scores[8:16].tobytes())
    raw[at + 13] ^= 0x04
    files[1].write_bytes(bytes(raw))
    # a bit flipped before the chunk was packed (memory, a copy tool): only our checksum can see it
    with np.load(files[2]) as z:
        flipped, key, sha = z["scores"].copy(), z["run_key"], z["sha256"]
    flipped.reshape(-1).view(np.uint8)[21] ^= 0x01  # one bit of one float
    np.savez(files[2], scores=flipped, ids=ids[16:24], run_key=key, sha256=sha)
    again = reload(cache)
    got, done = again.load("coarse", 24, 2, ids)
    assert done.tolist() == [True] * 8 + [False] * 16
    np.testing.assert_array_equal(got[:8], scores[:8])  # the intact chunk is reused
    assert not files[1].exists() and not files[2].exists(), "dropped chunks are deleted, so they are recomputed"
    assert len(again.dropped) == 2 and again.dropped[0].startswith("coarse/000000008-000008.npz: ")
    assert again.dropped[1] == "coarse/000000016-000008.npz: checksum mismatch"


def test_two_chunks_of_one_size_swapped_are_both_dropped(stage):
    cache, ids, scores, files = stage
    tmp = files[0].with_name("swap")
    files[0].rename(tmp)
    files[1].rename(files[0])
    tmp.rename(files[1])
    again = reload(cache)
    got, done = again.load("coarse", 24, 2, ids)
    assert done.tolist() == [False] * 16 + [True] * 8
    np.testing.assert_array_equal(got[16:], scores[16:])
    assert sorted(again.dropped) == ["coarse/000000000-000008.npz: checksum mismatch",
                                     "coarse/000000008-000008.npz: checksum mismatch"]


def test_a_chunk_of_other_interventions_is_dropped(stage):
    cache, ids, scores, files = stage
    # well formed and correctly checksummed, but written for other interventions (another sampling plan)
    cache.save("coarse", 8, scores[8:16], ids[8:16] + 1)
    again = reload(cache)
    _, done = again.load("coarse", 24, 2, ids)
    assert done.tolist() == [True] * 8 + [False] * 8 + [True] * 8
    assert again.dropped == ["coarse/000000008-000008.npz: ids do not match the stage's interventions at its rows"]


def test_a_chunk_copied_from_another_runs_entry_is_dropped(stage):
    cache, ids, scores, files = stage
    other = RunCache(cache.dir.parent, "other", {})  # same interventions (ids), another run: another seed, say
    other.save("coarse", 8, scores[8:16] + 1, ids[8:16])
    (other.dir / "coarse" / files[1].name).replace(files[1])
    again = reload(cache)
    _, done = again.load("coarse", 24, 2, ids)
    assert done.tolist() == [True] * 8 + [False] * 8 + [True] * 8 and not files[1].exists()
    assert again.dropped == ["coarse/000000008-000008.npz: belongs to another run (its cache key is 'other', this "
                             "entry's 'k')"]
    # its key relabelled as this entry's: the digest, made with the other key, no longer matches
    other.save("coarse", 8, scores[8:16] + 1, ids[8:16])
    with np.load(other.dir / "coarse" / files[1].name) as z:
        arrays = {**z, "run_key": np.array("k")}
    np.savez(files[1], **arrays)
    again = reload(cache)
    _, done = again.load("coarse", 24, 2, ids)
    assert not done[8:16].any() and again.dropped == ["coarse/000000008-000008.npz: checksum mismatch"]


def test_truncated_or_misshapen_chunks_are_dropped_and_old_npy_chunks_ignored(stage):
    cache, ids, scores, files = stage
    files[0].write_bytes(files[0].read_bytes()[:200])  # truncated, as by a full disk outside atomic_write
    again = reload(cache)
    _, done = again.load("coarse", 24, 3, ids)  # width 3: no chunk of width 2 may be used
    assert not done.any() and len(again.dropped) == 3
    assert again.dropped[0].startswith("coarse/000000000-000008.npz: unreadable (")
    assert "expected float64 (8, 3)" in again.dropped[1]
    # a format-2 chunk (a bare .npy) is never trusted, nor deleted
    old = cache.dir / "coarse" / "000000000-000024.npy"
    np.save(old, scores)
    _, done = reload(cache).load("coarse", 24, 2, ids)
    assert not done.any() and old.exists()


@pytest.fixture
def image(rng):
    return random_image(rng, 24, 24)


def test_a_flipped_bit_in_the_cache_is_recomputed_and_reported(tmp_path, image, bank, tiny_net):
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=2, patches=bank, cache=tmp_path / "cache",
                batch_size=4)
    first = cem_fast.causal_effect_map(tiny_net, image, **args)
    chunks = sorted((tmp_path / "cache").rglob("coarse/*.npz"))
    assert len(chunks) > 2
    with np.load(chunks[1]) as z:
        arrays = dict(z)
    arrays["scores"] = arrays["scores"].copy()
    arrays["scores"].view(np.uint64)[0, 0] ^= 1 << 40  # one flipped bit, the file otherwise well formed
    np.savez(chunks[1], **arrays)
    res = cem_fast.causal_effect_map(tiny_net, image, **args)
    assert len(res.extra["cache_dropped_chunks"]) == 1 and "checksum" in res.extra["cache_dropped_chunks"][0]
    assert np.array_equal(res.effect, first.effect)
    assert np.array_equal(res.samples_coarse, first.samples_coarse)


def test_a_pipe_among_the_patches_or_the_cache_does_not_block_the_run(tmp_path, rng, image):
    folder = tmp_path / "patches"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(folder / f"p{i}.png")
    os.mkfifo(folder / "b.png")
    bank = cem_fast.load_patch_bank(folder)  # would block forever reading the pipe
    assert len(bank) == 4
    args = dict(task="identity", roi=(8, 8, 8), coarse=2, fine=1, patches=bank, cache=tmp_path / "cache")
    first = cem_fast.causal_effect_map(OutOfPlace(), image, **args)
    chunk = sorted((tmp_path / "cache").rglob("coarse/*.npz"))[0]
    chunk.unlink()
    os.mkfifo(chunk)
    res = cem_fast.causal_effect_map(OutOfPlace(), image, **args)
    assert "not a regular file" in res.extra["cache_dropped_chunks"][0]
    assert np.array_equal(res.effect, first.effect)


# ---- a model's code is part of the cache key -------------------------------------------------------------------------

MODEL_SOURCE = """
import torch


class Editable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        torch.nn.init.constant_(self.conv.weight, 0.02)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return x + {factor} * self.conv(x)
"""


def test_editing_a_models_forward_invalidates_its_cached_samples(tmp_path, monkeypatch, image, bank):
    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "editable_model.py"
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=2, patches=bank, cache=tmp_path / "cache")
    src.write_text(MODEL_SOURCE.format(factor="0.5"))
    import editable_model
    first = cem_fast.causal_effect_map(editable_model.Editable(), image, **args)
    src.write_text(MODEL_SOURCE.format(factor="-3.0"))  # same class name, repr and weights; new code
    importlib.reload(editable_model)
    edited = cem_fast.causal_effect_map(editable_model.Editable(), image, **args)
    fresh = cem_fast.causal_effect_map(editable_model.Editable(), image, **{**args, "cache": None})
    assert edited.extra["reused_from_cache"] == 0
    assert np.array_equal(edited.effect, fresh.effect)
    assert not np.array_equal(edited.effect, first.effect)
    again = cem_fast.causal_effect_map(editable_model.Editable(), image, **args)  # unchanged code: reused
    assert again.extra["reused_from_cache"] > 0 and np.array_equal(again.effect, fresh.effect)


def test_a_model_whose_code_cannot_be_read_is_never_reused(tmp_path, image, bank):
    from cem_fast.models import model_code_digest
    ns = {"__name__": "typed_in_a_repl"}
    exec("import torch\nclass Dim(torch.nn.Module):\n    def forward(self, x):\n        return 0.8 * x\n", ns)
    code, why = model_code_digest(ns["Dim"]())
    assert code is None and "typed_in_a_repl.Dim" in why
    args = dict(task="identity", roi=(8, 8, 8), coarse=2, fine=1, patches=bank, cache=tmp_path / "cache")
    cem_fast.causal_effect_map(ns["Dim"](), image, **args)
    res = cem_fast.causal_effect_map(ns["Dim"](), image, **args)
    assert res.extra["reused_from_cache"] == 0 and "not reused" in res.extra["cache_note"]


HELPER_MODEL = """
import torch
from helper_code import scale


class UsesHelper(torch.nn.Module):
    def forward(self, x):
        return scale(x)
"""


def test_editing_a_helper_the_model_imports_invalidates_its_cached_samples(tmp_path, monkeypatch, image, bank):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "helper_model.py").write_text(HELPER_MODEL)
    (tmp_path / "helper_code.py").write_text("def scale(x):\n    return x * 0.9\n")
    import helper_code
    import helper_model
    args = dict(task="identity", roi=(8, 8, 8), coarse=2, fine=1, patches=bank, cache=tmp_path / "cache")
    cem_fast.causal_effect_map(helper_model.UsesHelper(), image, **args)
    (tmp_path / "helper_code.py").write_text("def scale(x):\n    return x * 0.5 + 0.1\n")
    importlib.reload(helper_code)
    importlib.reload(helper_model)
    edited = cem_fast.causal_effect_map(helper_model.UsesHelper(), image, **args)
    fresh = cem_fast.causal_effect_map(helper_model.UsesHelper(), image, **{**args, "cache": None})
    assert edited.extra["reused_from_cache"] == 0 and np.array_equal(edited.effect, fresh.effect)


# ---- a cache chunk belongs to its run; a cache that cannot be used is skipped ----------------------------------------

def test_chunks_copied_from_a_seed_1_run_into_the_seed_0_entry_are_dropped(image32, bank256, tmp_path):
    """The intervention ids do not depend on the seed, so before the chunks carried their run's key, a seed-1
    chunk in the seed-0 entry verified and its samples were used as seed 0's."""
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=3, patches=bank256, batch_size=4,
                locality="off", cache=tmp_path / "cache")
    seed0 = cem_fast.causal_effect_map(Drifts(step=0.0), image32, seed=0, **args)
    seed1 = cem_fast.causal_effect_map(Drifts(step=0.0), image32, seed=1, **args)
    assert not np.array_equal(seed0.samples_coarse, seed1.samples_coarse)  # the seeds' samples differ
    entry0, entry1 = Path(seed0.extra["cache_entry"]), Path(seed1.extra["cache_entry"])
    copied = []
    for chunk in sorted(entry1.glob("coarse/*.npz")):  # the coarse stage: the same rows in both runs
        (entry0 / "coarse" / chunk.name).write_bytes(chunk.read_bytes())
        copied.append(f"coarse/{chunk.name}")
    assert len(copied) == 8  # 16 blocks x 2 draws in chunks of 4
    again = cem_fast.causal_effect_map(Drifts(step=0.0), image32, seed=0, **args)
    dropped = again.extra["cache_dropped_chunks"]
    assert sorted(d.split(": ")[0] for d in dropped) == copied
    assert all("belongs to another run" in d for d in dropped), dropped
    assert again.extra["reused_from_cache"] == seed0.num_forwards - 2 - 32  # the fine stage's only
    fresh = cem_fast.causal_effect_map(Drifts(step=0.0), image32, seed=0, **{**args, "cache": None})
    np.testing.assert_array_equal(again.samples_coarse, fresh.samples_coarse)
    np.testing.assert_array_equal(again.effect, fresh.effect)


def test_a_cache_chunk_that_cannot_be_written_is_one_warning_and_the_run_goes_on(image32, bank256, tmp_path,
                                                                                  monkeypatch):
    from cem_fast import cache as cache_mod
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=2, patches=bank256, locality="off", batch_size=8)
    want = cem_fast.causal_effect_map(Drifts(step=0.0), image32, **args)
    real = cache_mod.atomic_write

    def disk_full_for_chunks(path, write):
        if Path(path).suffix == ".npz":
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(cache_mod, "atomic_write", disk_full_for_chunks)
    with pytest.warns(UserWarning, match=r"coarse/000000000-000008\.npz cannot be written \(\[Errno 28\] No space"):
        got = cem_fast.causal_effect_map(Drifts(step=0.0), image32, cache=tmp_path / "cache", **args)
    assert "No space left on device" in got.extra["cache_note"]
    np.testing.assert_array_equal(got.effect, want.effect)
