"""What is read back from disk is what was written, or it is not used: checksummed sample-cache chunks,
no temporaries left behind, patch-bank caches keyed by content."""
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import cem_fast.patches as patches_mod
from cem_fast.cache import RunCache
from cem_fast.fileio import atomic_write
from cem_fast.patches import PatchBank

STRIDE = 1 << 20  # cem_fast.estimator.DRAW_STRIDE; the cache only compares ids, so any stride would do


# ---------------------------------------------------------------- sample cache chunks


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


# ---------------------------------------------------------------- temporaries


def test_a_failed_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.npz"
    target.write_bytes(b"old")

    def disk_full(f):
        f.write(b"half a fi")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, disk_full)
    assert os.listdir(tmp_path) == ["result.npz"] and target.read_bytes() == b"old"
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.json", disk_full)
    assert os.listdir(tmp_path) == ["result.npz"]


def test_stale_temporaries_are_cleaned(tmp_path):
    from cem_fast.fileio import clean_stale_temporaries
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: its pid names no process now
    dead, me = p.pid, os.getpid()
    (tmp_path / "im" / ".cem_cache" / "k" / "coarse").mkdir(parents=True)
    stale = [tmp_path / f".result.npz.tmp{dead}",  # writer killed
             tmp_path / "im" / ".cem_cache" / "k" / "coarse" / f".000000000-000008.npz.tmp{dead}",  # deep
             tmp_path / "im" / f".cem.png.tmp{me}"]  # a live pid, but untouched for two hours: pid reused
    kept = [tmp_path / f".summary.json.tmp{me}",  # being written right now
            tmp_path / "im" / "notes.tmp123",  # not one of ours: no leading dot
            tmp_path / "im" / "result.npz"]
    for f in stale + kept:
        f.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(stale[2], (two_hours_ago, two_hours_ago))
    assert clean_stale_temporaries(tmp_path) == 3
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)
    assert clean_stale_temporaries(tmp_path) == 0


# ---------------------------------------------------------------- patch-bank cache


def write_bmps(folder, arrays):
    # BMP: uncompressed, so a changed patch keeps its file size exactly
    folder.mkdir(exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"p{i}.bmp")


@pytest.fixture
def patch_folder(rng, tmp_path, monkeypatch):
    monkeypatch.setenv("CEM_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(patches_mod, "_cache_warned", False, raising=False)
    arrays = [rng.randint(0, 256, (8, 8, 3)).astype(np.uint8) for _ in range(3)]
    write_bmps(tmp_path / "bank", arrays)
    return tmp_path / "bank", np.stack(arrays).transpose(0, 3, 1, 2)


def test_a_patch_changed_in_place_is_not_served_stale(patch_folder):
    folder, want = patch_folder
    assert np.array_equal(PatchBank.from_folder(folder).patches.numpy(), want)
    f = folder / "p1.bmp"
    st = f.stat()
    want[1] = 255 - want[1]
    Image.fromarray(want[1].transpose(1, 2, 0)).save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same time: only the content differs
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert np.array_equal(PatchBank.from_folder(folder).patches.numpy(), want)


def test_a_cache_file_with_another_key_is_rebuilt(patch_folder, tmp_path):
    folder, want = patch_folder
    PatchBank.from_folder(folder)
    [cached] = (tmp_path / "cache" / "patch_banks").glob("*.npz")
    np.savez(cached, patches=np.zeros_like(want), names=np.array(["a", "b", "c"]), key=np.array("0" * 64))
    bank = PatchBank.from_folder(folder)
    assert np.array_equal(bank.patches.numpy(), want) and bank.names == ["p0.bmp", "p1.bmp", "p2.bmp"]
    with np.load(cached, allow_pickle=False) as z:
        assert str(z["key"]) != "0" * 64 and np.array_equal(z["patches"], want)  # rewritten


def test_an_unwritable_cache_is_skipped_with_one_warning(patch_folder, tmp_path, monkeypatch):
    folder, want = patch_folder

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    real = patches_mod._atomic_savez
    monkeypatch.setattr(patches_mod, "_atomic_savez", disk_full)
    with pytest.warns(UserWarning, match="cannot be written"):
        bank = PatchBank.from_folder(folder)
    assert np.array_equal(bank.patches.numpy(), want)
    monkeypatch.setattr(patches_mod, "_atomic_savez", real)
    # a cache folder that cannot even be made (a file is in the way; chmod would not stop root)
    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setattr(patches_mod, "_cache_warned", True, raising=False)  # warned already: silent from now on
    monkeypatch.setattr(patches_mod, "cache_dir", lambda: tmp_path / "file" / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bank = PatchBank.from_folder(folder)
    assert np.array_equal(bank.patches.numpy(), want)


def test_a_bank_file_without_its_arrays_says_so_in_one_line(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"patch bank '.*x\.npz' has no array 'patches' \(expected 'patches' "
                                         r"and 'names', as written by PatchBank\.save\)") as e:
        PatchBank.load(tmp_path / "x.npz")
    assert "\n" not in str(e.value)
    # names are optional
    np.savez(tmp_path / "y.npz", patches=np.zeros((2, 3, 8, 8), np.uint8))
    bank = PatchBank.load(tmp_path / "y.npz")
    assert len(bank) == 2 and bank.names == []
