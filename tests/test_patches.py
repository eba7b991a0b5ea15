import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import cem_fast
import cem_fast.patches as patches_mod
from cem_fast.patches import PatchBank, load_patch_bank, sharpness
from helpers import Evil


def test_div2k_bank_loads_in_rgb_order_and_caches(shared, tmp_path, monkeypatch):
    monkeypatch.setenv("CEM_FAST_CACHE", str(tmp_path))
    folder = shared / "patches" / "div2k-8"
    bank = PatchBank.from_folder(folder)
    assert len(bank) == 10000 and bank.patch_size == 8
    name = bank.names[123]
    want = np.asarray(Image.open(folder / name).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(bank.patches[123].numpy(), want)
    assert list((tmp_path / "patch_banks").glob("*.npz")), "the stacked bank is cached"
    again = PatchBank.from_folder(folder)
    assert torch.equal(again.patches, bank.patches) and again.names == bank.names


def test_sharpness_closed_form():
    p = np.zeros((8, 8, 3), np.uint8)
    p[:, 4:] = 100  # a vertical edge: 8 rows x one step of 100 in x, nothing in y
    assert sharpness(p) == pytest.approx(800.0)
    p[4:, :] += 50  # adds a horizontal step of 50 in y on all 8 columns
    assert sharpness(p) == pytest.approx(np.hypot(800.0, 400.0))


def test_build_bank_from_images(tmp_path, rng):
    for i in range(2):
        Image.fromarray(rng.randint(0, 256, (40, 30, 3)).astype(np.uint8)).save(tmp_path / f"im{i}.png")
    bank = PatchBank.build(sorted(tmp_path.glob("*.png")), count=10, size=8, seed=0)
    assert bank.patches.shape == (10, 3, 8, 8)
    name = bank.names[3]
    src, x, y = name.split("_")[0], int(name.split("_")[1]), int(name.split("_")[2])
    img = np.asarray(Image.open(tmp_path / src))
    assert np.array_equal(bank.patches[3].permute(1, 2, 0).numpy(), img[y:y + 8, x:x + 8])
    assert name.endswith(f"sharpness-{sharpness(img[y:y + 8, x:x + 8]):.1f}.png")
    bank.save(tmp_path / "b.npz")
    assert torch.equal(load_patch_bank(tmp_path / "b.npz").patches, bank.patches)


def test_default_bank_is_shipped():
    bank = load_patch_bank(None)
    assert len(bank) >= 1000 and bank.patch_size == 8
    assert bank.patches.float().std() > 20  # natural content, not a constant


def test_sampling_is_seeded_and_uniform():
    bank = PatchBank(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8))
    a = bank.sample(torch.Generator().manual_seed(0), (5000,))
    b = bank.sample(torch.Generator().manual_seed(0), (5000,))
    assert torch.equal(a, b)
    counts = torch.bincount(a, minlength=10).double()
    chi2 = ((counts - 500) ** 2 / 500).sum().item()
    assert chi2 < 30  # 9 degrees of freedom: p < 0.001 above ~27.9


def test_bad_banks_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PatchBank.from_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no images"):
        PatchBank.from_folder(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + 9).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8) + 9).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="expected square patches of one size"):
        PatchBank.from_folder(tmp_path, use_cache=False)


def _settled_bank_folder(tmp_path, monkeypatch, rng):
    """A 3-patch folder whose files the bank code sees as settled (its clock runs 10 s ahead)."""
    import cem_fast.patches as patches_mod
    monkeypatch.setenv("CEM_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(patches_mod, "_BANKS_BY_STAT", {})
    real_ns = patches_mod.time.time_ns
    monkeypatch.setattr(patches_mod.time, "time_ns", lambda: real_ns() + 10_000_000_000)
    folder = tmp_path / "bank"
    folder.mkdir()
    arrays = [rng.randint(0, 256, (8, 8, 3)).astype(np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"p{i}.bmp")  # BMP: a rewrite keeps the size
    return folder, np.stack(arrays).transpose(0, 3, 1, 2), patches_mod


def test_a_settled_folder_is_not_read_again(tmp_path, monkeypatch, rng):
    """The content key is remembered by the files' stat figures: a warm call reads no patch file, in this process
    (the bank kept) or another (the stat index names the cached bank)."""
    from pathlib import Path
    folder, want, patches_mod = _settled_bank_folder(tmp_path, monkeypatch, rng)
    assert np.array_equal(PatchBank.from_folder(folder).patches.numpy(), want)
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real(self))
    assert np.array_equal(PatchBank.from_folder(folder).patches.numpy(), want)
    patches_mod._BANKS_BY_STAT.clear()  # as a new process would start
    bank = PatchBank.from_folder(folder)
    assert np.array_equal(bank.patches.numpy(), want) and bank.source == str(folder)
    assert reads == []


def test_a_rewrite_with_its_old_mtime_is_read_again(tmp_path, monkeypatch, rng):
    """ctime cannot be set back: a same-size rewrite whose mtime is restored still changes the stat key."""
    import os
    import time
    folder, want, _ = _settled_bank_folder(tmp_path, monkeypatch, rng)
    PatchBank.from_folder(folder)
    f = folder / "p1.bmp"
    st = f.stat()
    time.sleep(0.05)  # not synchronisation: the file system's clock must tick past the first write's ctime
    want[1] = 255 - want[1]
    Image.fromarray(want[1].transpose(1, 2, 0)).save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert np.array_equal(PatchBank.from_folder(folder).patches.numpy(), want)


def test_a_settled_folder_listing_is_remembered_but_never_stale(tmp_path, monkeypatch, rng):
    """The listing of a settled folder is remembered by the folder's figures: a patch added, one removed, the
    folder's mtime set back (its ctime moves), and a dangling link that gets its target are each seen."""
    import time
    folder, want, patches_mod = _settled_bank_folder(tmp_path, monkeypatch, rng)
    monkeypatch.setattr(patches_mod, "_LISTINGS", {})
    lists = []
    real = os.listdir
    monkeypatch.setattr(patches_mod.os, "listdir", lambda *a: lists.append(a) or real(*a))
    PatchBank.from_folder(folder)
    PatchBank.from_folder(folder)
    assert len(lists) == 1, "a settled folder is listed once"
    extra = rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)
    Image.fromarray(extra).save(folder / "p3.bmp")
    assert PatchBank.from_folder(folder).names == ["p0.bmp", "p1.bmp", "p2.bmp", "p3.bmp"]
    st = folder.stat()
    time.sleep(0.05)  # not synchronisation: the file system's clock must tick past the listing's ctime
    (folder / "p0.bmp").unlink()
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))  # the folder's mtime as it was: its ctime moved
    assert PatchBank.from_folder(folder).names == ["p1.bmp", "p2.bmp", "p3.bmp"]
    (folder / "p4.bmp").symlink_to(tmp_path / "outside.bmp")  # dangling: not a patch
    assert PatchBank.from_folder(folder).names == ["p1.bmp", "p2.bmp", "p3.bmp"]
    Image.fromarray(extra).save(tmp_path / "outside.bmp")  # the folder itself does not change
    bank = PatchBank.from_folder(folder)
    assert bank.names == ["p1.bmp", "p2.bmp", "p3.bmp", "p4.bmp"]
    extra_chw = extra.transpose(2, 0, 1)[None]
    assert np.array_equal(bank.patches.numpy(), np.concatenate([want[1:], extra_chw, extra_chw]))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_only_regular_files_named_like_patches_are_patches(tmp_path, monkeypatch, rng):
    """A pipe (it would never finish reading), a folder and a dangling link named like patches are not patches, on
    the first listing and on a remembered one; a link to a patch file is one."""
    folder, want, patches_mod = _settled_bank_folder(tmp_path, monkeypatch, rng)
    monkeypatch.setattr(patches_mod, "_LISTINGS", {})
    os.mkfifo(folder / "pipe.png")
    (folder / "folder.png").mkdir()
    (folder / "dangling.png").symlink_to(tmp_path / "nothing.png")
    (folder / "q.bmp").symlink_to(folder / "p2.bmp")
    for _ in range(2):
        bank = PatchBank.from_folder(folder)
        assert bank.names == ["p0.bmp", "p1.bmp", "p2.bmp", "q.bmp"]
        assert np.array_equal(bank.patches.numpy(), np.concatenate([want, want[2:]]))


def test_a_bank_changed_by_its_caller_is_not_served_to_the_next(tmp_path, monkeypatch, rng):
    """Each call gets its own copy of the bank kept in this process, with the kept bank's digest: patches a caller
    writes in place never reach the next call."""
    folder, want, _ = _settled_bank_folder(tmp_path, monkeypatch, rng)
    first = PatchBank.from_folder(folder)
    first.patches.zero_()
    bank, digest = patches_mod.load_patch_bank_with_digest(folder)
    assert bank is not first and np.array_equal(bank.patches.numpy(), want) and digest == bank.digest()
    bank.patches[0] = 255
    again, digest_again = patches_mod.load_patch_bank_with_digest(folder)
    assert np.array_equal(again.patches.numpy(), want) and digest_again == digest == again.digest()


def test_a_folder_changed_moments_ago_is_not_remembered(tmp_path, monkeypatch, rng):
    """Timestamps are coarse: a folder with a change in the last SETTLE_NS is read and hashed on every call."""
    import cem_fast.patches as patches_mod
    monkeypatch.setenv("CEM_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(patches_mod, "_BANKS_BY_STAT", {})
    folder = tmp_path / "fresh"
    folder.mkdir()
    Image.fromarray(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(folder / "p0.png")
    PatchBank.from_folder(folder)
    assert patches_mod._BANKS_BY_STAT == {} and not (tmp_path / "cache" / "patch_banks" / "by_stat").exists()


def test_a_bank_remembered_for_one_cache_folder_is_cached_in_another(tmp_path, monkeypatch, rng):
    """The in-process memory is per cache folder: asked with another CEM_FAST_CACHE, the bank is cached there too
    (a bank remembered from another folder's cache once skipped that, and the whole suite failed on it)."""
    folder, want, _ = _settled_bank_folder(tmp_path, monkeypatch, rng)
    PatchBank.from_folder(folder)
    monkeypatch.setenv("CEM_FAST_CACHE", str(tmp_path / "other"))
    assert np.array_equal(PatchBank.from_folder(folder).patches.numpy(), want)
    assert list((tmp_path / "other" / "patch_banks").glob("*.npz"))


# ---- banks that are not what they should be: one line each -----------------------------------------------------------

def test_patch_bank_mismatched_with_the_image_channels(rng):
    with pytest.raises(ValueError, match=r"patch bank must be \(P, 3, pb, pb\) uint8, got \(4, 1, 8, 8\)"):
        PatchBank(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="is empty"):
        PatchBank(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))


def test_an_array_given_as_the_patch_bank_is_named(rng):
    """An array is not one of the bank's forms: say which forms are (it was a TypeError from Path)."""
    img = (rng.rand(16, 16, 3) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match="patches must be None, 'default', a folder .* got ndarray"):
        cem_fast.causal_effect_map(torch.nn.Identity(), img, task="DN", sigma=10, roi=(0, 0, 8), block=8, coarse=1,
                                   fine=1, patches=np.zeros((2, 8, 8, 3)))


def test_patch_bank_with_a_pickled_array_is_refused(tmp_path, rng):
    marker = tmp_path / "pwned"
    names = np.empty(2, dtype=object)
    names[:] = [Evil(marker), "b"]
    np.savez(tmp_path / "bank.npz", patches=rng.randint(0, 256, (2, 3, 8, 8)).astype(np.uint8), names=names)
    with pytest.raises(ValueError) as e:
        cem_fast.load_patch_bank(tmp_path / "bank.npz")
    assert "\n" not in str(e.value) and "bank.npz" in str(e.value) and not marker.exists()


# ---- the patch-bank cache: keyed by content --------------------------------------------------------------------------

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


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
@pytest.mark.skipif(patches_mod._native_stat_rows() is None, reason="needs the built extension cem_fast._C")
def test_the_native_folder_stat_gives_what_python_gives(tmp_path, rng):
    """The extension's one-call stat of a folder's patches: the same names (regular files only) and the same stat
    rows, byte for byte, hence the same stat key, as os.stat name by name."""
    folder = tmp_path / "bank"
    write_bmps(folder, rng.randint(0, 256, (3, 8, 8, 3)).astype(np.uint8))
    os.mkfifo(folder / "pipe.png")
    (folder / "folder.png").mkdir()
    (folder / "dangling.png").symlink_to(tmp_path / "nothing.png")
    (folder / "q.bmp").symlink_to(folder / "p2.bmp")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = patches_mod._patch_names(os.listdir(folder))
        encoded = [os.fsencode(n) for n in names]
        native = patches_mod._keep_regular(names, *patches_mod._native_stat_rows()(fd, encoded))
        python = patches_mod._regular(names, encoded, lambda p: os.stat(p, dir_fd=fd))
        with pytest.raises(TypeError):
            patches_mod._native_stat_rows()(fd, names)  # str, not bytes
        with pytest.raises(OSError):
            patches_mod._native_stat_rows()(-1, encoded)  # not an open folder: an error, never a wrong row
    finally:
        os.close(fd)
    assert native == python and native[0] == ["p0.bmp", "p1.bmp", "p2.bmp", "q.bmp"]
    assert np.frombuffer(native[1], np.int64).reshape(-1, 5)[:, 0].tolist() == [(folder / n).stat().st_size
                                                                                  for n in native[0]]
