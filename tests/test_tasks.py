"""Degradations: SR resize (PIL / OpenCV conventions), DN noise, DR rain re-add, custom tasks."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import counter_noise_by_hand

from cem_fast.tasks import (CustomTask, Denoise, Derain, Identity, SuperResolution, make_task,
                             resize_patches)


def cubic_weights(t, a=-0.75):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def naive_inter_cubic(img, out):
    """OpenCV INTER_CUBIC semantics (a = -0.75, half-pixel centres, replicated border), one pixel at a time."""
    n = img.shape[0]
    s = n / out
    res = np.zeros((out, out))
    for i in range(out):
        for j in range(out):
            sy, sx = (i + 0.5) * s - 0.5, (j + 0.5) * s - 0.5
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            acc = 0.0
            for m in range(-1, 3):
                for k in range(-1, 3):
                    yy, xx = min(max(y0 + m, 0), n - 1), min(max(x0 + k, 0), n - 1)
                    acc += cubic_weights(sy - (y0 + m)) * cubic_weights(sx - (x0 + k)) * img[yy, xx]
            res[i, j] = acc
    return np.clip(np.round(res), 0, 255)


def test_sr_patch_resize_matches_opencv_inter_cubic(rng):
    bank = torch.from_numpy(rng.randint(0, 256, (4, 3, 8, 8)).astype(np.uint8))
    got = resize_patches(bank, 2)
    for p in range(4):
        for c in range(3):
            want = naive_inter_cubic(bank[p, c].numpy().astype(np.float64), 2)
            assert np.array_equal(got[p, c].numpy(), want), (p, c)


def test_sr_input_is_pil_bicubic_of_the_cropped_image(rng):
    img = rng.randint(0, 256, (3, 30, 22)).astype(np.uint8)  # not a multiple of 4: cropped to 28x20
    task = SuperResolution(4)
    prep = task.prepare(torch.from_numpy(img), block=8)
    assert tuple(prep.gt.shape) == (3, 28, 20)
    pil = Image.fromarray(img.transpose(1, 2, 0)[:28, :20]).resize((5, 7), Image.BICUBIC)
    assert np.array_equal((prep.base * 255).round().byte().permute(1, 2, 0).numpy(), np.asarray(pil))
    assert (prep.grid.rows, prep.grid.cols, prep.grid.in_block) == (4, 3, 2)


def test_dn_input_noise_follows_the_reference_convention(demo2):
    task = Denoise(50, noise_seed=0)
    prep = task.prepare(torch.from_numpy(demo2).permute(2, 0, 1), block=8)
    np.random.seed(0)  # the reference: np.random.seed(0); np.random.normal(0, sigma/255, img.shape)
    noise = np.random.normal(0, 50 / 255, demo2.shape)
    want = np.uint8(np.clip(demo2 / 255.0 + noise, 0, 1) * 255)
    assert np.array_equal((prep.base * 255).round().byte().permute(1, 2, 0).numpy(), want)
    resid = (prep.base * 255 - prep.gt.float())
    inner = (prep.gt > 100) & (prep.gt < 155)  # mostly away from clipping, which shrinks the spread a little
    assert 45 < resid[inner].std().item() < 51


def test_dn_intervention_adds_fresh_noise_only_inside_the_block(rng):
    img = torch.from_numpy(rng.randint(0, 256, (3, 24, 16)).astype(np.uint8))
    task = Denoise(30)
    prep = task.prepare(img, block=8)
    bank = task.bank_at_input(torch.full((2, 3, 8, 8), 100, dtype=torch.uint8), 8)
    out = task.intervene(prep, bank, torch.tensor([0, 1]), torch.tensor([4, 4]), torch.tensor([1, 2]), seed=0)
    block = (slice(None), slice(None), slice(16, 24), slice(0, 8))  # block 4 = row 2, col 0
    outside = torch.ones(24, 16, dtype=torch.bool)
    outside[16:24, 0:8] = False
    assert torch.equal(out[:, :, outside], prep.base[:, outside].expand(2, -1, -1))
    vals = out[block] * 255
    assert not torch.equal(vals[0], vals[1])  # different ids -> different noise
    assert abs(vals.mean().item() - 99.5) < 4 and 20 < vals.std().item() < 40


def test_dr_rain_is_re_added_over_the_pasted_patch(rng):
    img = torch.from_numpy(rng.randint(0, 256, (3, 40, 32)).astype(np.uint8))
    task = Derain("medium", rain_seed=3)
    prep = task.prepare(img, block=8)
    rain = prep.extra["rain"]
    assert torch.equal(prep.base * 255, torch.floor(torch.clamp(img.float() + rain, max=255)))
    assert (prep.base * 255 >= img.float()).all()
    patch = torch.from_numpy(rng.randint(0, 256, (1, 3, 8, 8)).astype(np.uint8))
    out = task.intervene(prep, task.bank_at_input(patch, 8), torch.tensor([0]), torch.tensor([5]),
                         torch.tensor([0]), seed=0)[0]
    # block 5 = row 1, col 1 -> pixels [8:16, 8:16]
    want = torch.floor(torch.clamp(patch[0].float() + rain[:, 8:16, 8:16], max=255)) / 255
    assert torch.equal(out[:, 8:16, 8:16], want)
    out[:, 8:16, 8:16] = prep.base[:, 8:16, 8:16]
    assert torch.equal(out, prep.base)


def test_custom_task_degrades_the_intervened_clean_image(rng):
    img = torch.from_numpy(rng.randint(0, 256, (3, 16, 16)).astype(np.uint8))
    pool = lambda x: torch.nn.functional.avg_pool2d(x, 2)  # noqa: E731
    task = CustomTask(pool, scale=2)
    prep = task.prepare(img, block=8)
    assert tuple(prep.base.shape) == (3, 8, 8)
    patch = torch.full((1, 3, 8, 8), 7, dtype=torch.uint8)
    out = task.intervene(prep, task.bank_at_input(patch, 8), torch.tensor([0]), torch.tensor([3]),
                         torch.tensor([0]), seed=0)[0]
    clean = img.float() / 255
    clean[:, 8:16, 8:16] = 7 / 255
    assert torch.allclose(out, pool(clean[None])[0])
    with pytest.raises(ValueError, match="custom degrade must return"):
        CustomTask(pool, scale=1).prepare(img, block=8)


def test_make_task_names_and_errors():
    assert isinstance(make_task("sr", scale=2), SuperResolution)
    assert isinstance(make_task("DN"), Denoise) and isinstance(make_task("dr"), Derain)
    assert isinstance(make_task("identity"), Identity)
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("deblur")
    with pytest.raises(ValueError, match="sigma must be positive"):
        Denoise(0)


def test_dn_input_noise_in_row_chunks_is_the_same_draw(demo2, monkeypatch):
    want = Denoise(50, noise_seed=3).prepare(torch.from_numpy(demo2).permute(2, 0, 1), block=8).base
    monkeypatch.setattr(Denoise, "NOISE_CHUNK", 1000)  # 1 row of 256x3 per chunk
    got = Denoise(50, noise_seed=3).prepare(torch.from_numpy(demo2).permute(2, 0, 1), block=8).base
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(3, 20, 12), (3, 9, 17), (3, 16, 16)])
def test_dn_counter_input_noise_is_the_counter_rng(rng, shape):
    gt = torch.from_numpy(rng.randint(0, 256, shape).astype(np.uint8))
    prep = Denoise(25, noise_seed=5, input_noise="counter").prepare(gt, block=4)
    assert prep.base.dtype == torch.float32 and tuple(prep.base.shape) == shape
    assert torch.equal(prep.base, counter_noise_by_hand(gt, 25, 5))
    assert not torch.equal(prep.base, Denoise(25, noise_seed=6, input_noise="counter").prepare(gt, block=4).base)


def test_dn_counter_input_noise_has_the_statistics_of_numpys():
    grey = torch.full((3, 128, 128), 128, dtype=torch.uint8)  # far from clipping at sigma 25
    counter = Denoise(25, input_noise="counter").prepare(grey, block=8).base * 255 - 128
    numpy_ = Denoise(25).prepare(grey, block=8).base * 255 - 128
    assert not torch.equal(counter, numpy_)
    # both truncate: mean -0.5 grey levels; spread sigma (49152 values: standard errors 0.11 and 0.08)
    assert abs(counter.mean().item() - numpy_.mean().item()) < 0.5
    assert abs(counter.std().item() - numpy_.std().item()) < 0.4 and abs(counter.std().item() - 25) < 0.4


def test_dn_input_noise_must_be_known():
    with pytest.raises(ValueError, match="input_noise must be one of numpy, counter, got 'philox'"):
        Denoise(50, input_noise="philox")
    assert make_task("DN", input_noise="counter").describe()["input_noise"] == "counter"
