"""End to end on the CPU: a bicubic-SR CEM of demo_2 (ROI 32 at (152, 96), 8-px blocks, 3 + 20 draws) with the
pipeline against a plain per-intervention loop with the reference's structure (one intervention at a time, the
full output to the host, PSNR there) on the same draws."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cem_fast

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CFG = dict(task="SR", scale=4, roi=(152, 96, 32), block=8, coarse=3, fine=20, seed=0)


@pytest.fixture(scope="module")
def setup():
    bank = cem_fast.load_patch_bank(SHARED / "patches" / "div2k-8")
    return bank, SHARED / "images" / "demo_2.png"


def plain_loop(bank, image):
    """One intervention at a time, like the reference scripts (but with our draws), coarse stage only."""
    task = cem_fast.SuperResolution(4)
    gt, _ = cem_fast.load_image(image)
    prep = task.prepare(gt, 8)
    bank_in = task.bank_at_input(bank.patches, 8)
    gen = torch.Generator().manual_seed(0)
    idx = bank.sample(gen, (32, 32, 3))
    gt_np = gt.permute(1, 2, 0).numpy().astype(np.float64)[152:184, 96:128]
    scores = []
    for b in range(1024):
        for k in range(3):
            lr = prep.base.clone()
            y, x = (b // 32) * 2, (b % 32) * 2
            lr[:, y:y + 2, x:x + 2] = bank_in[idx[b // 32, b % 32, k]].float() / 255
            out = F.interpolate(lr[None], scale_factor=4.0, mode="bicubic", align_corners=False)[0]
            q = np.round(np.clip(out.permute(1, 2, 0).numpy().astype(np.float64), 0, 1) * 255)
            scores.append(10 * np.log10(255 ** 2 / ((q[152:184, 96:128] - gt_np) ** 2).mean()))
    return scores


def test_plain_loop_coarse_stage(benchmark, setup):
    bank, image = setup
    benchmark.group = "bicubic-SR CEM, demo_2, CPU"
    benchmark.pedantic(plain_loop, args=(bank, image), rounds=1, iterations=1)
    benchmark.extra_info.update(forwards=3072, seconds_per_forward=benchmark.stats.stats.median / 3072)


def test_pipeline_full_cem(benchmark, setup):
    bank, image = setup
    benchmark.group = "bicubic-SR CEM, demo_2, CPU"
    res = benchmark.pedantic(lambda: cem_fast.causal_effect_map("bicubic", image, patches=bank, batch_size=256,
                                                                progress=False, **CFG), rounds=1, iterations=1)
    benchmark.extra_info.update(forwards=res.num_forwards, backend=res.backend,
                                seconds_per_forward=benchmark.stats.stats.median / res.num_forwards)
