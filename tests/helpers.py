"""Helpers shared by several test files (one module: no test file imports another).

Cases for the ops (random inputs, a naive one-pixel-at-a-time intervention, the backends to compare with the
reference and cases sized for them), the DN counter noise by hand, the locality expectations (of
model_factories.ConvStack), and the golden-reference agreement; random images and patch banks of a given size,
the small runs several files share, and what the CLI tests need (running it, its one error line, strict JSON).
"""
import builtins
import io
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cem_fast import rng as crng
from cem_fast.geometry import ROI, BlockGrid
from cem_fast.locality import Window, plan_locality
from cem_fast.patches import PatchBank
from cem_fast.result import CEMResult
from cem_fast.tasks import INPUT_NOISE_ID


def random_case(seed, C=3, h=13, w=11, pb=4, K=7, P=5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (C, h, w), generator=g).float() / 255
    patches = torch.randint(0, 256, (P, C, pb, pb), generator=g, dtype=torch.uint8)
    idx = torch.randint(0, P, (K,), generator=g)
    # block origins on a pb grid, including the partial edge blocks
    by = torch.randint(0, (h + pb - 1) // pb, (K,), generator=g) * pb
    bx = torch.randint(0, (w + pb - 1) // pb, (K,), generator=g) * pb
    origins = torch.stack([by, bx], 1)
    sizes = torch.stack([(h - by).clamp(max=pb), (w - bx).clamp(max=pb)], 1)
    return base, patches, idx, origins, sizes


def naive_intervene(base, patches, idx, origins, sizes, noise=None, rain=None, windows=None, wsize=None):
    """One intervention at a time, one pixel at a time. ``noise[k]`` is (C, pb, pb) in 0..255 units."""
    C, h, w = base.shape
    wh, ww = wsize or (h, w)
    outs = []
    for k in range(len(idx)):
        wy, wx = (windows[k] if windows is not None else (0, 0))
        full = base.clone()
        p = patches[idx[k]].double()
        for c in range(C):
            for dy in range(int(sizes[k][0])):
                for dx in range(int(sizes[k][1])):
                    y, x = int(origins[k][0]) + dy, int(origins[k][1]) + dx
                    v = float(p[c, dy, dx])
                    if noise is not None:
                        v = math.floor(min(max(v + float(noise[k][c, dy, dx]), 0.0), 255.0))
                    if rain is not None:
                        v = math.floor(min(v + float(rain[c, y, x]), 255.0))
                    full[c, y, x] = v / 255.0
        outs.append(full[:, wy:wy + wh, wx:wx + ww])
    return torch.stack(outs)


# Backends that run on CPU tensors (triton through the interpreter, TRITON_INTERPRET=1 set by conftest.py where there is
# no GPU), and those that need one; each skipped with its own reasons where it cannot run (the conftest hook).
CPU_BACKENDS = [pytest.param("cpp", marks=pytest.mark.needs_backend("cpp")),
                pytest.param("triton", marks=pytest.mark.needs_backend("triton"))]
GPU_BACKENDS = [pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.needs_backend(b, device="cuda")])
                for b in ("triton", "cuda")]


def backend_case(seed, C=3, h=21, w=19, pb=8, K=37, P=11):
    """random_case as keyword arguments of the ops, plus intervention ids beyond 32 bits and a rain layer."""
    base, patches, idx, origins, sizes = random_case(seed, C=C, h=h, w=w, pb=pb, K=K, P=P)
    g = torch.Generator().manual_seed(seed + 1000)
    ids = torch.randint(0, 2 ** 40, (K,), generator=g)
    rain = torch.rand(C, h, w, generator=g) * 180
    return dict(base=base, patches=patches, patch_idx=idx, origins=origins, sizes=sizes), ids, rain


def interpreted(backend) -> bool:
    """The Triton kernels run in Python, one program at a time: cases must be interpreter-sized."""
    return backend == "triton" and not torch.cuda.is_available()


def sized_case(backend, seed):
    """backend_case, interpreter-sized for Triton on the CPU (all of them on a GPU)."""
    return backend_case(seed, h=11, w=9, pb=4, K=6, P=5) if interpreted(backend) else backend_case(seed)


def assert_same(got, want):
    """Bit-identical, same shape and dtype; the message says how many elements differ and where."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    bad = (got != want)
    assert not bad.any(), f"{int(bad.sum())} elements differ, first at {bad.nonzero()[0].tolist()}, " \
                          f"max diff {(got.float() - want.float()).abs().max():.3g}"


def random_gt(seed=0, size=(3, 6, 5)):
    return torch.randint(20, 230, size, generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def in_layout(t, layout):
    """``t`` as "contiguous", "channels_last" or "strided" (every other column of a twice-as-wide tensor)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


def multi_roi_case(dtype, layout, small):
    """Outputs with a NaN in the bottom row (only the ROIs holding it become NaN), a full-size target, a ROI grid
    plus an odd ROI, the whole output and the last pixel."""
    from cem_fast.reference import roi_grid
    g = torch.Generator().manual_seed(7)
    K, H, W = (3, 12, 10) if small else (7, 30, 26)
    out = (torch.rand(K, 3, H, W, generator=g) * 1.4 - 0.2).to(dtype)
    out[1, 2, H - 1, 3] = float("nan")
    out = in_layout(out, layout)
    target = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
    tile = 4 if small else 8
    rois = roi_grid(H, W, tile) + [ROI(1, 2, H - 3, 5), ROI(0, 0, H, W), ROI(H - 1, W - 1, 1, 1)]
    return out, target, rois


def counter_noise_by_hand(gt: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Input noise from the RNG primitives: pixel (c, y, x) of an H x W image uses counter (c * S + y) * S + x,
    S = max(H, W), and the integer arithmetic of the interventions (units of 2^-24 grey levels, floor, clip)."""
    C, H, W = gt.shape
    S = max(H, W)
    c, y, x = torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    key = crng.stream_key(seed, torch.tensor(INPUT_NOISE_ID))
    z = crng.gaussian12(key, (c * S + y) * S + x)
    total = gt.long() * (1 << 24) + z * round(sigma * 256)
    return torch.div(total, 1 << 24, rounding_mode="floor").clamp(0, 255).float() / 255


def reach_from_radius(grid: BlockGrid, roi: ROI, radius_in_px: int) -> np.ndarray:
    """Blocks whose input pixels lie within ``radius`` (input px) of the ROI's input footprint."""
    s = grid.scale
    y0, y1 = roi.y // s - radius_in_px, (roi.y + roi.height - 1) // s + radius_in_px
    x0, x1 = roi.x // s - radius_in_px, (roi.x + roi.width - 1) // s + radius_in_px
    want = np.zeros((grid.rows, grid.cols), bool)
    for r in range(grid.rows):
        for c in range(grid.cols):
            by0, bx0 = r * grid.in_block, c * grid.in_block
            by1, bx1 = min(by0 + grid.in_block, grid.in_h) - 1, min(bx0 + grid.in_block, grid.in_w) - 1
            want[r, c] = by1 >= y0 and by0 <= y1 and bx1 >= x0 and bx0 <= x1
    return want


def tight_window(roi: ROI, radius: int, H: int, W: int, step: int = 1) -> Window:
    """The box of the input pixels the ROI depends on (scale 1), grown to a multiple of 4 px at the end, or at the
    start where the image ends; a side that cannot reach 4 px more keeps the whole extent. ``step``: the model
    reads offsets that are multiples of it (a stack of convs with dilation ``step``), so a ROI narrower than the
    dilation depends on a comb of pixels whose box can be smaller than ``radius`` on each side."""
    out = []
    for start, size_roi, limit in ((roi.y, roi.height, H), (roi.x, roi.width, W)):
        reach = range(-(radius // step) * step, radius + 1, step)
        needed = [p + k for p in range(start, start + size_roi) for k in reach if 0 <= p + k < limit]
        a, b = min(needed), max(needed) + 1
        size = min(limit, -(-(b - a) // 4) * 4)
        out.append((a if a + size <= limit else limit - size, size))
    (y, h), (x, w) = out
    return Window(y, x, h, w)


def probe(model, shape, block, rois, scale=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (3,) + shape, generator=g).float() / 255
    grid = BlockGrid(shape[0] * scale, shape[1] * scale, block, scale)
    with torch.inference_mode():
        full = model(base[None])  # as the estimator does when the whole input is affordable
        return plan_locality(model, base, grid, [ROI.parse(r) for r in rois], batch_size=16, full_output=full), grid


def reference_map(folder: Path, tol: float = 0.01):
    """Y(I) and the thresholded map of a reference run saved as .mat files (coarse, fine, origin)."""
    import scipy.io as sio

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


# ---- random inputs of a given size (the fixtures of each file draw them from its ``rng``) ---------------------------

def random_image(rng, h: int, w: int) -> np.ndarray:
    """An h x w x 3 uint8 noise image."""
    return rng.randint(0, 256, (h, w, 3)).astype(np.uint8)


def random_bank(rng, n: int) -> PatchBank:
    """A bank of ``n`` random 8x8 patches."""
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (n, 3, 8, 8)).astype(np.uint8)))


# derandomize: the same examples on every run, so CI cannot turn red by chance
def hypothesis_settings():
    from hypothesis import settings
    return settings(max_examples=60, deadline=None, derandomize=True)


# ---- small runs shared by several files ------------------------------------------------------------------------

def dim_run(image, bank, **kw):
    """One identity-task run of model_factories.Dim (not an exact restorer, so Y(I) is finite)."""
    import cem_fast
    from model_factories import Dim
    args = dict(model=Dim(), task="identity", roi=(0, 0, 8), patches=bank, coarse=1, fine=1)
    args.update(kw)
    return cem_fast.causal_effect_map(image=image, **args)


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def exact_cem(model, img, bank, **kw):
    """A DN run in exact mode: the tests that count forwards (locality has its own resume test)."""
    import cem_fast
    args = dict(task="DN", sigma=30, roi=(8, 8, 8), coarse=3, fine=6, patches=bank, seed=4, batch_size=5,
                locality="off")
    args.update(kw)
    return cem_fast.causal_effect_map(model, img, **args)


def small_run(model, image, bank, **kw):
    import cem_fast
    args = dict(task="identity", roi=(8, 8, 8), coarse=2, fine=2, patches=bank, **kw)
    return cem_fast.causal_effect_map(model, image, **args)


def ols_hc3(y, x):
    """Least squares and the HC3 covariance, written out row by row: the intercept and its standard error."""
    a = np.column_stack([np.ones(len(y)), x])
    inv = np.linalg.inv(a.T @ a)
    coef = inv @ a.T @ y
    e = y - a @ coef
    h = np.array([a[i] @ inv @ a[i] for i in range(len(y))])
    meat = sum(e[i] ** 2 / (1 - h[i]) ** 2 * np.outer(a[i], a[i]) for i in range(len(y)))
    return coef[0], np.sqrt((inv @ meat @ inv)[0, 0])


def control_variate_case():
    """An exhaustive DN map of a ConvStack on 16 draws per block, for the control-variate tests."""
    from model_factories import ConvStack
    g = np.random.RandomState(3)
    image = g.randint(0, 256, (48, 48, 3)).astype(np.uint8)
    bank = PatchBank(torch.from_numpy(g.randint(0, 256, (64, 3, 8, 8)).astype(np.uint8)))
    return dict(model=ConvStack(2), image=image, task="DN", sigma=25, roi=(16, 16, 16), patches=bank, seed=4,
                mode="exhaustive", samples=16)


def make_result(cem, task="DN", roi=None, psnr=30.0, coarse=None, crop=None, name="m", reachable=None):
    """A CEMResult of a given (rows, cols) map on a white 8-px-block image (no model run)."""
    cem = np.asarray(cem, dtype=np.float64)
    roi = roi or ROI(0, 0, 8, 8)
    rows, cols = cem.shape
    white = torch.full((3, rows * 8, cols * 8), 255, dtype=torch.uint8)
    coarse = np.full((rows, cols, 1), psnr) - cem[..., None] if coarse is None else coarse
    return CEMResult(cem=cem, effect=cem, samples_coarse=coarse, samples_fine=np.full((rows, cols, 0), np.nan),
                     gated=np.zeros((rows, cols), bool), psnr_origin=psnr, roi=roi, block=8, scale=1, tol=0.01,
                     task={"task": task}, seed=0, mode="coarse-to-fine", model_name=name, image_name="i",
                     num_forwards=1, wall_time=0.0, backend="torch", device="cpu", patch_bank={"digest": "x"},
                     gt=white, degraded=white, output=white, extra={"locality": {"crop": crop}} if crop else {},
                     reachable=reachable)


# ---- state dicts in public key layouts -------------------------------------------------------------------------

def conv(cout, cin, k=3):
    return {"weight": (cout, cin, k, k), "bias": (cout,)}


def layout(prefix_shapes):
    """Flatten {"prefix": {"weight": shape, "bias": shape}} into state-dict key -> shape."""
    return {f"{p}.{n}": shape for p, d in prefix_shapes.items() for n, shape in d.items()}


def random_state_dict(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


# ---- files that run code when loaded ---------------------------------------------------------------------------

class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this opens (creates) the marker file: code ran
        return (builtins.open, (self.marker, "w"))


def crafted_pt2(path: Path, marker: Path) -> Path:
    """A torch.export archive whose sample inputs are a pickle that runs code: torch.export.load falls back to
    ``weights_only=False`` when the safe loader refuses it."""
    ep = torch.export.export(torch.nn.Conv2d(3, 3, 3, padding=1), (torch.rand(1, 3, 8, 8),))
    good = io.BytesIO()
    torch.export.save(ep, good)
    evil = io.BytesIO()
    torch.save(Evil(marker), evil)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = evil.getvalue() if info.filename.endswith("sample_inputs/model.pt") else src.read(info.filename)
            out.writestr(info, data)
    return path


# ---- the CLI as a user runs it ---------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "cem_fast.cli"]
# tests/ on the path of the CLI's process: model specs such as model_factories:make
CLI_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=CLI_ENV)


def one_error_line(p) -> str:
    """The CLI failed with exactly one error line and no traceback: that line."""
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, p.stderr
    return errors[0]


def strict_json(path: Path):
    """json.loads that refuses NaN / Infinity, as browsers and most other languages do."""
    def refuse(name):
        raise AssertionError(f"{path} holds the non-JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def write_png(path: Path, rng, size=(16, 16)) -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 256, (*size, 3)).astype(np.uint8)).save(path)
    return path


def x4_config(tmp_path: Path, images, **extra) -> Path:
    """c.yml: bicubic x4 SR on ``images``, one coarse and one fine draw."""
    cfg = {"task": "SR", "scale": 4, "model": "bicubic", "images": [str(i) for i in images], "roi": [0, 0, 8],
           "coarse": 1, "fine": 1, **extra}
    path = tmp_path / "c.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path
