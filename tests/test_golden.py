"""Whole-pipeline agreement with the reference CEM results in ../shared/data/golden.

Bounds (issue 2): Pearson r >= 0.95 over all blocks and >= 0.9 outside the ROI, the same sign wherever the
reference's |CE| >= 0.1 dB, total absolute effect within 10 %, Y(I) within 0.01 dB. Two reference runs with
different draws pass these bounds; so must we, with our own draws (and RGB patches, not the reference's BGR).
"""
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image

import cem_fast


def reference_map(folder: Path, tol: float = 0.01):
    origin = sio.loadmat(next(folder.glob("*-PSNR-Origin.mat")))["PSNR"][0, 0]
    coarse = sio.loadmat(next(folder.glob("*-C3.mat")))["PSNR"]
    fine = sio.loadmat(next(folder.glob("*-PSNR_all_perturb-F*.mat")))["PSNR"]
    gated = (fine != 0).any(2)
    ce = np.where(gated, origin - np.where(gated[..., None], fine, 0).sum(2) / fine.shape[2],
                  origin - coarse.mean(2))
    return float(origin), np.where(np.abs(ce) >= tol, ce, 0.0)


def assert_agrees(res, folder: Path, y0_tol: float = 0.01):
    origin, ref = reference_map(folder)
    ours = res.cem
    assert ours.shape == ref.shape
    assert abs(res.psnr_origin - origin) <= y0_tol, (res.psnr_origin, origin)
    r_all = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    out = ~res.roi_mask
    r_out = np.corrcoef(ours[out], ref[out])[0, 1]
    big = np.abs(ref) >= 0.1
    sign_ok = np.sign(ours[big]) == np.sign(ref[big])
    total = np.abs(ours).sum() / np.abs(ref).sum()
    msg = f"r_all={r_all:.4f} r_out={r_out:.4f} total_ratio={total:.3f} sign={sign_ok.mean():.3f}"
    print(f"golden {folder.name}: Y(I) {res.psnr_origin:.4f} vs {origin:.4f}, {msg}")
    assert r_all >= 0.95, msg
    assert r_out >= 0.9, msg
    assert sign_ok.all(), msg + f" sign differs at {np.argwhere(big)[~sign_ok].tolist()}"
    assert abs(total - 1) <= 0.10, msg


@pytest.mark.slow
def test_golden_sr_bicubic_demo2(shared):
    res = cem_fast.causal_effect_map("bicubic", shared / "images" / "demo_2.png", task="SR", scale=4,
                                     roi=(152, 96, 32), block=8, coarse=3, fine=20,
                                     patches=shared / "patches" / "div2k-8", batch_size=256)
    assert_agrees(res, shared / "golden" / "sr_bicubic_demo2_cpu")


@pytest.mark.slow
def test_golden_dn_dncnn_demo2_crop(shared):
    crop = np.asarray(Image.open(shared / "images" / "demo_2.png").convert("RGB").crop((48, 104, 144, 200)))
    res = cem_fast.causal_effect_map(str(shared / "models" / "dncnn_color_blind.pth"), crop.copy(), task="DN",
                                     sigma=50, roi=(32, 32, 32), block=8, coarse=3, fine=20,
                                     patches=shared / "patches" / "div2k-8", image_name="v2.png")
    assert_agrees(res, shared / "golden" / "dn_demo2_crop_cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (5,122 DnCNN forwards at 256x256)")
def test_golden_dn_dncnn_demo2_full_gpu(shared):
    res = cem_fast.causal_effect_map(str(shared / "models" / "dncnn_color_blind.pth"),
                                     shared / "images" / "demo_2.png", task="DN", sigma=50, roi=(152, 96, 32),
                                     block=8, coarse=3, fine=50, patches=shared / "patches" / "div2k-8",
                                     device="cuda")
    assert_agrees(res, shared / "golden" / "dn_demo2_full_gpu")
