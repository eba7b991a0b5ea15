"""Reading the clean image (cem_fast/images.py): corrupt files, greyscale, RGBA, 16-bit and float images,
EXIF orientation, arrays in any layout, the pixel limit checked before decoding, and the names of arrays and
tensors. Every mistake is one line."""
import numpy as np
import pytest
import torch
from PIL import Image

import cem_fast
from cem_fast.models import Bicubic
from helpers import dim_run, one_error_line, one_line, random_bank, run_cli, write_png, x4_config


@pytest.fixture
def bank(rng):
    return random_bank(rng, 8)


def test_corrupt_image_file(tmp_path, bank):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="bad.png' cannot be read") as e:
        dim_run(tmp_path / "bad.png", bank)
    one_line(e)


def test_greyscale_and_rgba_images_are_converted(tmp_path, bank, rng):
    grey = rng.randint(0, 256, (16, 16)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgba = rng.randint(0, 256, (16, 16, 4)).astype(np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    g = dim_run(tmp_path / "g.png", bank)
    assert torch.equal(g.gt, torch.from_numpy(grey).expand(3, 16, 16))  # replicated to RGB
    a = dim_run(tmp_path / "a.png", bank)
    assert torch.equal(a.gt, torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1))  # alpha dropped


def test_flipped_read_only_and_strided_arrays_are_read_as_given(bank, rng):
    img = rng.randint(0, 256, (24, 20, 3)).astype(np.uint8)
    ro = img.copy()
    ro.flags.writeable = False
    for arr in (img[::-1], ro, img[:, ::2], np.asfortranarray(img)):
        res = dim_run(arr, bank)
        assert torch.equal(res.gt, torch.from_numpy(np.array(arr)).permute(2, 0, 1))
    res = dim_run(img, bank)
    img[:] = 0  # the result does not alias the caller's array
    assert res.gt.sum() > 0


def test_an_array_image_never_aliases_the_callers_array():
    """Whatever the array's shape (a 1x1 image's transpose is contiguous already), the tensor is a copy."""
    from cem_fast.images import load_image
    for shape in ((1, 1, 3), (1, 5, 3), (5, 1, 3), (4, 6, 3)):
        arr = np.zeros(shape, np.uint8)
        tensor, _ = load_image(arr)
        arr[...] = 7
        assert tensor.shape == (3,) + shape[:2] and tensor.is_contiguous() and int(tensor.max()) == 0, shape


# ---- 16 bits, floats, orientation, size ------------------------------------------------------------------------------

def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path, bank):
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    gt, _ = cem_fast.load_image(tmp_path / "g16.png")
    want = np.round(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(gt[0].numpy(), want) and np.array_equal(gt[2].numpy(), want)
    assert len(np.unique(gt.numpy())) == 256  # not two levels
    arr, _ = cem_fast.load_image(np.repeat(ramp[..., None], 3, axis=2))  # a uint16 array, the same way
    assert np.array_equal(arr[1].numpy(), want)


def test_float_tiff_in_unit_range_is_scaled_and_out_of_range_refused(tmp_path):
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    gt, _ = cem_fast.load_image(tmp_path / "f.tif")
    assert np.array_equal(gt[0].numpy(), np.round(a.astype(np.float64) * 255).astype(np.uint8))
    Image.fromarray(a * 300, mode="F").save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"big.tif.*float pixels in \[0, 300\], expected \[0, 1\]") as e:
        cem_fast.load_image(tmp_path / "big.tif")
    assert "\n" not in str(e.value)


def test_exif_orientation_is_applied(tmp_path, rng):
    a = rng.randint(0, 256, (10, 20, 3)).astype(np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    im.save(tmp_path / "turned.png", exif=exif)
    gt, _ = cem_fast.load_image(tmp_path / "turned.png")
    assert tuple(gt.shape) == (3, 20, 10)
    assert np.array_equal(gt.permute(1, 2, 0).numpy(), np.rot90(a, k=-1))


def test_images_above_max_pixels_are_refused_before_decoding(tmp_path, rng, monkeypatch):
    path = write_png(tmp_path / "big.png", rng, size=(64, 48))
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or (_ for _ in ()).throw(
        AssertionError("decoded")))
    with pytest.raises(ValueError, match=r"big.png' is 48x64 = 3,072 pixels, above max_pixels=1,000") as e:
        cem_fast.load_image(path, max_pixels=1000)
    assert "\n" not in str(e.value) and not decoded
    assert cem_fast.estimator.DEFAULT_MAX_PIXELS == 8192 * 8192
    monkeypatch.undo()
    p = run_cli("run", x4_config(tmp_path, [path], max_pixels=1000), "--out", tmp_path / "o", "--no-progress")
    assert "above max_pixels=1,000" in one_error_line(p)


# ---- names -----------------------------------------------------------------------------------------------------------

def test_an_array_or_tensor_image_is_named_for_what_it_is():
    from cem_fast.images import load_image
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert load_image(a)[1] == "array"
    assert load_image(torch.from_numpy(a).permute(2, 0, 1))[1] == "tensor"
    res = cem_fast.causal_effect_map(Bicubic(2), a, "SR", scale=2, roi=(8, 8, 8), coarse=1, fine=1, locality="off")
    assert res.image_name == "array" and res.summary()["image"] == "array"
