"""Whole CEMs (issue 6), each group measured as ratios against a baseline row of the same run.

Groups (``SIZE``: ``full`` by default; ``CEM_FAST_BENCH_SIZE=ci`` shrinks every case so that CI runs them all in
about a minute; on a GPU the full sizes are those of PRODUCT.md):

* ``DN demo``: the model-forward floor (the model alone on as many inputs as the exact run used, same batch),
  the exact mode (locality off, fp32), the speed mode (locality auto, fp32, recomputed layer by layer: the
  default; Pearson r against the golden map) and its earlier paths (each intervention on its own window; on the
  crop), with the largest per-block difference of their maps.
* ``SR default demo``: the shipped x4 SR model on the shipped image, layer by layer against the crop.
* ``ROI grid plan``: every 32-px ROI of demo_2 (64) with the shipped DnCNN, one shared pass against the loop of
  64 single runs, exhaustive and coarse-to-fine, every map checked against its single run.
* ``DN speed vs image size``: the speed-mode CEM of the same ROI on the demo image and on the demo tiled to
  2048x2048 (and 8192x8192 on a GPU), with the reference's numpy input noise and with the counter-based one.
* On a GPU the speed rows are warm (a first, timed call, then the median of 3) and the demo also runs in tf32 and
  bf16.
* ``many ROIs``: every 32-px ROI against one ROI, same sampling (exhaustive, 3 draws: the forwards are shared).
* ``plain loop``: on the CPU, a plain per-intervention loop with the reference's structure (one intervention at a
  time, the whole output to the host, PSNR there) against the pipeline, for bicubic SR (demo_2) and DnCNN (a
  96x96 crop), same draws.
"""
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cem_fast
from cem_fast import rng
from cem_fast.options import DRAW_STRIDE
from cem_fast.pipeline.samples import effects

SHARED = Path(os.environ.get("CEM_FAST_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SIZE = os.environ.get("CEM_FAST_BENCH_SIZE", "full")
if not SHARED.is_dir() and __name__ != "__main__":  # a clone alone: skipped with the reason, never failed
    pytest.skip(f"needs the project's shared data ({SHARED}: ../shared/data beside the repository, or "
                "CEM_FAST_SHARED_DATA)", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DNCNN = str(SHARED / "models" / "dncnn_color_blind.pth")
BANK = SHARED / "patches" / "div2k-8"
ROWS: dict = {}  # numbers shared between the rows of a group (same process, same run)


def demo2() -> np.ndarray:
    return np.asarray(Image.open(SHARED / "images" / "demo_2.png").convert("RGB")).copy()


def dn_case():
    """(image, roi, coarse, fine, golden folder) of the DN demo at this size on this device."""
    if SIZE == "ci":
        return demo2()[120:168, 80:128], (16, 16, 16), 3, 2, None
    if DEV == "cuda":
        return demo2(), (152, 96, 32), 3, 50, SHARED / "golden" / "dn_demo2_full_gpu"
    return demo2()[104:200, 48:144], (32, 32, 32), 3, 20, SHARED / "golden" / "dn_demo2_crop_cpu"


def golden_map(folder: Path) -> np.ndarray:
    import scipy.io as sio
    origin = sio.loadmat(next(folder.glob("*-PSNR-Origin.mat")))["PSNR"][0, 0]
    coarse = sio.loadmat(next(folder.glob("*-C3.mat")))["PSNR"]
    fine = sio.loadmat(next(folder.glob("*-PSNR_all_perturb-F*.mat")))["PSNR"]
    gated = (fine != 0).any(2)
    ce = np.where(gated, origin - fine.sum(2) / fine.shape[2], origin - coarse.mean(2))
    return np.where(np.abs(ce) >= 0.01, ce, 0.0)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def run_cem(benchmark, group, warm=False, **kw):
    """One CEM call per round. ``warm`` (on a GPU, for the sub-second rows): a first call, timed as ``cold_s``,
    then the median of 3 (the process keeps CUDA, cuDNN and Triton state, as in a session that maps many ROIs)."""
    benchmark.group = group
    call = lambda: cem_fast.causal_effect_maps(device=DEV, progress=False, **kw)  # noqa: E731
    rounds = 1
    if warm and DEV == "cuda":
        t = time.perf_counter()
        call()
        benchmark.extra_info["cold_s"] = time.perf_counter() - t
        rounds = 3
    res = benchmark.pedantic(call, rounds=rounds, iterations=1)
    r = res[0]
    benchmark.extra_info.update(forwards=r.num_forwards, device=DEV, backend=r.backend, size=SIZE,
                                locality=r.extra["locality"], final_batch_size=r.extra["final_batch_size"],
                                rois=len(res), timings_s=r.extra["timings_s"])
    return res


# ---- DN demo: forward floor, exact mode, speed mode -------------------------------------------------------------

def test_dn_demo_exact(benchmark):
    image, roi, coarse, fine, _ = dn_case()
    res = run_cem(benchmark, "DN demo", model=DNCNN, image=image, task="DN", rois=[roi], coarse=coarse, fine=fine,
                  patches=BANK, locality="off")[0]
    ROWS["dn_exact"] = dict(forwards=res.num_forwards, batch=res.extra["final_batch_size"],
                            seconds=benchmark.stats.stats.median if benchmark.stats else None)


def test_dn_demo_forward_floor(benchmark):
    """The model alone on the exact run's number of inputs, same batch size, same precision (fp32, no TF32)."""
    image, *_ = dn_case()
    exact = ROWS.get("dn_exact") or pytest.skip("runs after test_dn_demo_exact")
    model, _ = cem_fast.load_model(DNCNN)
    model = model.to(DEV).eval().to(memory_format=torch.channels_last)
    x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255).to(DEV)
    batch = exact["batch"]
    inputs = x.unsqueeze(0).repeat(batch, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    n = exact["forwards"]
    flags = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False

    def floor():
        with torch.inference_mode():
            done = 0
            while done < n:
                k = min(batch, n - done)
                model(inputs[:k])
                done += k
        sync()

    benchmark.group = "DN demo"
    try:
        benchmark.pedantic(floor, rounds=1, iterations=1)
    finally:
        torch.backends.cudnn.allow_tf32 = flags
    if benchmark.stats and exact["seconds"]:
        benchmark.extra_info.update(forwards=n, batch=batch, exact_over_floor=exact["seconds"] /
                                    benchmark.stats.stats.median)


def speed_precisions():
    """fp32 everywhere; on a GPU also the opt-in reduced precisions (each checked against fp32 in the run)."""
    return ["fp32", "tf32", "bf16"] if DEV == "cuda" and SIZE != "ci" else ["fp32"]


@pytest.mark.parametrize("precision", speed_precisions())
def test_dn_demo_speed(benchmark, precision):
    image, roi, coarse, fine, golden = dn_case()
    res = run_cem(benchmark, "DN demo", warm=True, model=DNCNN, image=image, task="DN", rois=[roi], coarse=coarse,
                  fine=fine, patches=BANK, precision=precision)[0]
    if golden is not None:
        benchmark.extra_info["pearson_vs_golden"] = float(np.corrcoef(res.cem.ravel(),
                                                                      golden_map(golden).ravel())[0, 1])
    if "precision_check" in res.extra:
        benchmark.extra_info["max_abs_delta_ce_db"] = res.extra["precision_check"]["max_abs_delta_ce_db"]
    if benchmark.stats and ROWS.get("dn_exact", {}).get("seconds"):
        benchmark.extra_info["exact_over_speed"] = ROWS["dn_exact"]["seconds"] / benchmark.stats.stats.median
    if precision == "fp32":
        ROWS["dn_speed"] = benchmark.stats.stats.median if benchmark.stats else None
        ROWS["dn_speed_cem"] = res.cem
        benchmark.extra_info.update(windows=res.extra["locality"].get("windows"),
                                    incremental=res.extra["locality"].get("incremental"))


@pytest.mark.parametrize("path", ["windows", "crop"])
def test_dn_demo_speed_without_incremental(benchmark, path):
    """The speed mode's earlier paths, each the baseline of the next: every intervention on the ROI's crop, then
    on windows of their own (issue 14), then (the fp32 row above, the default) recomputed layer by layer (issue
    15). Ratios against the default row; the map's largest difference from it, per block."""
    image, roi, coarse, fine, _ = dn_case()
    res = run_cem(benchmark, "DN demo", warm=True, model=DNCNN, image=image, task="DN", rois=[roi], coarse=coarse,
                  fine=fine, patches=BANK, windows="auto" if path == "windows" else "crop", incremental="off")[0]
    benchmark.extra_info["windows"] = res.extra["locality"].get("windows")
    if benchmark.stats and ROWS.get("dn_speed"):
        benchmark.extra_info[f"{path}_over_incremental"] = benchmark.stats.stats.median / ROWS["dn_speed"]
        benchmark.extra_info["max_abs_delta_cem_db"] = float(np.abs(res.cem - ROWS["dn_speed_cem"]).max())
    ROWS[f"dn_{path}"] = benchmark.stats.stats.median if benchmark.stats else None
    if path == "crop" and ROWS.get("dn_windows") and benchmark.stats:
        benchmark.extra_info["crop_over_windows"] = benchmark.stats.stats.median / ROWS["dn_windows"]


# ---- the shipped SR default on the shipped demo image: layer by layer against the crop --------------------------

@pytest.mark.parametrize("incremental", ["auto", "off"])
def test_sr_default_demo(benchmark, incremental):
    """``cem-fast demo``'s SR run (the shipped MSRResNet-type x4 model, the cat's eye, 3 + 20 draws; 3 + 2 at the
    CI size): recomputed layer by layer (the default) against incremental off, which for this model is the crop
    (its windows save too little)."""
    from importlib.resources import files
    from cem_fast.cli import DEMO_ROI
    fine = 2 if SIZE == "ci" else 20
    res = run_cem(benchmark, "SR default demo", warm=True, model="default:sr", image=str(files("cem_fast") / "data" /
                  "demo.png"), task="SR", scale=4, rois=[DEMO_ROI], coarse=3, fine=fine, incremental=incremental)[0]
    benchmark.extra_info.update(incremental=res.extra["locality"]["incremental"],
                                windows=res.extra["locality"]["windows"])
    if incremental == "auto":
        ROWS["sr_default"] = dict(seconds=benchmark.stats.stats.median if benchmark.stats else None, cem=res.cem)
    elif ROWS.get("sr_default", {}).get("seconds") and benchmark.stats:
        benchmark.extra_info["crop_over_incremental"] = benchmark.stats.stats.median / ROWS["sr_default"]["seconds"]
        benchmark.extra_info["max_abs_delta_cem_db"] = float(np.abs(res.cem - ROWS["sr_default"]["cem"]).max())


# ---- the same ROI on larger images ------------------------------------------------------------------------------

def large_cases():
    """(side, input noise): the reference's numpy noise is drawn on the host, one value after the other (0.3 s at
    2048^2, 4 s at 8192^2); the counter-based noise is drawn on the device."""
    if SIZE == "ci":
        return [(256, "counter")]
    sides = [2048, 8192] if DEV == "cuda" else [2048]
    return [(side, noise) for side in sides for noise in ("numpy", "counter")]


@pytest.mark.parametrize("side,noise", large_cases())
def test_dn_speed_large_image(benchmark, side, noise):
    image, roi, coarse, fine, _ = dn_case()
    reps = math.ceil(side / image.shape[0])
    tiled = np.tile(image, (reps, reps, 1))[:side, :side]
    y, x, s = roi
    roi_mid = (y + (side // 2 // image.shape[0]) * image.shape[0], x + (side // 2 // image.shape[1]) *
               image.shape[1], s)
    res = run_cem(benchmark, "DN speed vs image size", warm=True, model=DNCNN, image=tiled, task="DN",
                  rois=[roi_mid], coarse=coarse, fine=fine, patches=BANK, input_noise=noise)[0]
    benchmark.extra_info.update(side=side, input_noise=noise, cem_wall_s=res.wall_time)
    if benchmark.stats and ROWS.get("dn_speed"):
        benchmark.extra_info["over_demo_speed"] = benchmark.stats.stats.median / ROWS["dn_speed"]


# ---- many ROIs from one set of forwards --------------------------------------------------------------------------

def many_roi_case():
    if SIZE == "ci":
        return demo2()[120:168, 80:128], 16, (16, 16, 16)
    if DEV == "cuda":
        return demo2(), 32, (152, 96, 32)
    return demo2()[104:200, 48:144], 32, (32, 32, 32)


def test_one_roi_exhaustive(benchmark):
    image, _, roi = many_roi_case()
    run_cem(benchmark, "many ROIs", model=DNCNN, image=image, task="DN", rois=[roi], mode="exhaustive",
            samples=3, patches=BANK, locality="off")
    ROWS["one_roi"] = benchmark.stats.stats.median if benchmark.stats else None


def test_every_roi_exhaustive(benchmark):
    image, tile, _ = many_roi_case()
    res = run_cem(benchmark, "many ROIs", model=DNCNN, image=image, task="DN", roi_grid=tile, mode="exhaustive",
                  samples=3, patches=BANK, locality="off")
    if benchmark.stats and ROWS.get("one_roi"):
        benchmark.extra_info["over_one_roi"] = benchmark.stats.stats.median / ROWS["one_roi"]
    benchmark.extra_info["rois"] = len(res)


# ---- CPU: plain per-intervention loop against the pipeline --------------------------------------------------------

def plain_loop_cem(model, task, clean_u8: np.ndarray, bank, roi, block, coarse, fine, tol, seed):
    """The reference's structure with our draws: one intervention at a time built on the host, one forward of
    batch 1 (default memory format), the whole output to numpy, PSNR there; coarse-to-fine gating."""
    prep = task.prepare(torch.from_numpy(clean_u8).permute(2, 0, 1).contiguous(), block)
    bank_in = task.bank_at_input(bank.patches, block)
    grid = prep.grid
    y, x, h, w = roi
    gt = clean_u8[y:y + h, x:x + w].astype(np.float64)

    def psnr(inp):
        with torch.inference_mode():
            out = model(inp[None])[0].permute(1, 2, 0).numpy().astype(np.float64)
        q = np.round(np.clip(out, 0, 1) * 255)[y:y + h, x:x + w]
        return 10 * np.log10(255 ** 2 / ((q - gt) ** 2).mean())

    def sample(b, d):
        ids = torch.tensor([b * DRAW_STRIDE + d])
        p = rng.patch_draws(seed, ids, len(bank))
        inp = task.intervene(prep, bank_in, p, torch.tensor([b]), ids, seed, backend="torch")[0]
        return psnr(inp)

    y0 = psnr(prep.base)
    nb = grid.num_blocks
    sc = np.array([[sample(b, d) for d in range(coarse)] for b in range(nb)])
    gated = (np.abs(effects(y0, sc)) >= tol).any(1)
    ce = effects(y0, sc).mean(1)
    for b in np.flatnonzero(gated):
        ce[b] = effects(y0, np.array([sample(b, coarse + d) for d in range(fine)])).mean()
    ce = np.where(np.abs(ce) >= tol, ce, 0.0)
    return ce.reshape(grid.rows, grid.cols), 1 + nb * coarse + int(gated.sum()) * fine


def plain_cases():
    full = SIZE != "ci"
    sr = dict(model="bicubic", image=demo2(), task="SR", scale=4, roi=(152, 96, 32), coarse=3,
              fine=20 if full else 2)
    dn_img = demo2()[104:200, 48:144] if full else demo2()[120:168, 80:128]
    dn = dict(model=DNCNN, image=dn_img, task="DN", sigma=50, roi=(32, 32, 32) if full else (16, 16, 16), coarse=3,
              fine=20 if full else 2)
    return {"bicubic-SR": sr, "DnCNN-crop": dn}


CPU_ONLY = pytest.mark.skipif(DEV != "cpu", reason="the plain-loop comparison is the CPU target")


@CPU_ONLY
@pytest.mark.parametrize("case", ["bicubic-SR", "DnCNN-crop"])
def test_plain_loop(benchmark, case):
    c = plain_cases()[case]
    bank = cem_fast.load_patch_bank(BANK)
    benchmark.group = f"plain loop: {case}"
    model, _ = cem_fast.load_model(c["model"], scale=c.get("scale", 4))
    task = cem_fast.make_task(c["task"], **{k: c[k] for k in ("scale", "sigma") if k in c})
    roi = cem_fast.ROI.parse(c["roi"]).as_tuple()
    cem, n = benchmark.pedantic(plain_loop_cem, args=(model.eval(), task, c["image"], bank, roi, 8, c["coarse"],
                                                      c["fine"], 0.01, 0), rounds=1, iterations=1)
    ROWS[f"plain_{case}"] = dict(seconds=benchmark.stats.stats.median if benchmark.stats else None, cem=cem)
    benchmark.extra_info.update(forwards=n)


@CPU_ONLY
@pytest.mark.parametrize("case", ["bicubic-SR", "DnCNN-crop"])
def test_pipeline(benchmark, case):
    c = dict(plain_cases()[case])
    bank = cem_fast.load_patch_bank(BANK)
    benchmark.group = f"plain loop: {case}"
    model, image = c.pop("model"), c.pop("image")
    res = benchmark.pedantic(lambda: cem_fast.causal_effect_map(model, image, patches=bank, progress=False,
                                                                device=DEV, **c), rounds=1, iterations=1)
    benchmark.extra_info.update(forwards=res.num_forwards, locality=res.extra["locality"])
    plain = ROWS.get(f"plain_{case}")
    if plain and plain["seconds"] and benchmark.stats:
        benchmark.extra_info["plain_over_pipeline"] = plain["seconds"] / benchmark.stats.stats.median
        benchmark.extra_info["pearson_vs_plain"] = float(np.corrcoef(res.cem.ravel(), plain["cem"].ravel())[0, 1])


# ---- a ROI grid whose union is the whole image: one shared pass against the loop of single runs -----------------

GRID_MODES = {"exhaustive": dict(mode="exhaustive", samples=1), "coarse-to-fine": dict(coarse=1, fine=2)}
# the GPU check has minutes for every row: there the loop of 64 single runs runs once (exhaustive)
GRID_RUN = ["exhaustive"] if DEV == "cuda" and SIZE != "ci" else list(GRID_MODES)


def roi_grid_case():
    """(image, tile, model): issue 14's case, demo_2 (256x256) in 64 ROIs of 32 px with the shipped DnCNN (receptive
    field 20 px), whose union is the whole image: the shared pass runs every block, each single run a 72x72 crop.
    One draw per block (two more where gated): the loop of 64 single runs is minutes on 2 cores."""
    if SIZE == "ci":
        return demo2()[96:160, 64:128], 32, "default"
    return demo2(), 32, DNCNN


@pytest.mark.parametrize("mode", GRID_RUN)
def test_roi_grid_loop_of_single_runs(benchmark, mode):
    image, tile, model = roi_grid_case()
    benchmark.group = f"ROI grid plan: {mode}"
    rois = cem_fast.reference.roi_grid(image.shape[0], image.shape[1], tile)

    def loop():
        return [cem_fast.causal_effect_map(model, image, task="DN", roi=r.as_tuple(), patches=BANK, device=DEV,
                                           progress=False, **GRID_MODES[mode]) for r in rois]
    maps = benchmark.pedantic(loop, rounds=1, iterations=1)
    ROWS[f"grid_loop_{mode}"] = dict(seconds=benchmark.stats.stats.median if benchmark.stats else None,
                                     effects=[m.effect for m in maps])
    benchmark.extra_info.update(rois=len(rois), forwards=sum(m.num_forwards for m in maps),
                                probe_forwards=sum(m.extra["locality"]["probe_forwards"] for m in maps))


def grid_plans():
    """shared-crop: every intervention on the union's crop (the whole image); per-roi-crop: one run per ROI on its
    crop (the loop, inside one call); auto (the default): one shared pass with windows of their own. The first two
    only at the CI size: on the full case shared-crop alone is minutes. windows-only: the shared pass with windows,
    each intervention's window run whole (incremental off)."""
    plans = ["shared-crop", "per-roi-crop", "windows-only", "auto"] if SIZE == "ci" else ["windows-only", "auto"]
    return [(mode, plan) for mode in GRID_RUN for plan in plans]


@pytest.mark.parametrize("mode,plan", grid_plans())
def test_roi_grid_plans(benchmark, mode, plan):
    opts = {"shared-crop": dict(roi_plan="shared", windows="crop"),
            "per-roi-crop": dict(roi_plan="per-roi", windows="crop"), "windows-only": dict(incremental="off"),
            "auto": {}}[plan]
    image, tile, model = roi_grid_case()
    maps = run_cem(benchmark, f"ROI grid plan: {mode}", model=model, image=image, task="DN", roi_grid=tile,
                   patches=BANK, **GRID_MODES[mode], **opts)
    loop = ROWS.get(f"grid_loop_{mode}") or {}
    per_roi = maps[0].extra["plan"]["rois"]["chosen"] == "per-roi"
    benchmark.extra_info.update(plan=maps[0].extra["plan"]["rois"], windows=maps[0].extra["plan"]["windows"],
                                incremental=maps[0].extra["locality"].get("incremental"),
                                forwards=sum(m.num_forwards for m in maps) if per_roi else maps[0].num_forwards)
    if loop.get("seconds") and benchmark.stats:
        benchmark.extra_info["loop_over_this"] = loop["seconds"] / benchmark.stats.stats.median
    if loop.get("effects"):  # the same draws: every map is its single run's, to round-off (the shared pass computes
        # on the whole image what each single run computes on its crop: convolutions of other sizes round
        # differently, and now and then an output lands on the other side of a uint8 step)
        delta = float(max(np.abs(m.effect - e).max() for m, e in zip(maps, loop["effects"])))
        benchmark.extra_info["maps_equal_single_runs"] = delta == 0
        benchmark.extra_info["max_abs_delta_effect_db"] = delta
        # on the CPU the same kernels run for every shape: round-off only (1e-3 dB). cuDNN picks its algorithm per
        # shape, and a uint8 step flips now and then: the cross-shape bound of tests/test_windows.py (recorded)
        assert delta <= (1e-3 if DEV == "cpu" else 0.05), delta
