"""Speed at the seams between the engines: fixed costs, the engine choice, many ROIs, a busy machine, a second call.

Each group is ratios in one run against its baseline row (``CEM_FAST_BENCH_SIZE=ci`` shrinks every case so that
CI keeps them running; the targets hold for the full sizes on the 2-core CPU):

* ``fixed costs``: bicubic x4 SR of demo_2 (3 + 20, ROI 32): the reference's plain per-intervention loop (the
  baseline) against a warm call of the pipeline (a first call timed as ``cold_s``, then the median of 5); its
  stages. Targets: warm call <= 0.08 s (>= 200x the loop), prepare no longer than sampling.
* ``engine choice``: five configurations, the automatic choice against each engine forced by options (the crop;
  the windows; layer by layer, each "on": wherever it applies), each warm, median of 3 (9 for runs under 0.2 s).
  Target: auto within 1.15x of the fastest.
* ``ROI grid``: every 32-px tile as one call against the loop of single-tile runs (on a sample of tiles, scaled),
  the same draws, every sampled map equal to its single run. Targets: >= 1.5x for a local 6-layer residual conv
  net on 96x96, >= 4x for the shipped DnCNN on 256x256 (``grid_bound``: the loop's interventions over the grid's,
  what one shared pass can save at most).
* ``busy machine``: the DnCNN crop and the DN demo on the quiet machine (the baseline) and beside one CPU-bound
  process, with the threads fitted to the load (the default) and with torch's own count
  (``CEM_FAST_THREADS``). Target: <= 2.5x the quiet time.
* ``second call``: the DN demo called again in the same process: the share of its time outside the model's
  forwards (the model module, or the layer-by-layer engine's recomputation). Target: <= 10 %.
"""
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cem_fast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_cem import BANK, DNCNN, SIZE, demo2, plain_loop_cem  # noqa: E402

CI = SIZE == "ci"
DEMO = str(Path(cem_fast.__file__).parent / "data" / "demo.png")
ROWS: dict = {}


def warm_median(call, rounds: int) -> tuple[float, float, object]:
    """(first call's seconds, median of ``rounds`` more, the last result)."""
    t = time.perf_counter()
    out = call()
    cold = time.perf_counter() - t
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
    return cold, float(np.median(times)), out


# ---- fixed costs: a warm bicubic SR call against the reference's loop -------------------------------------------

def sr_case() -> dict:
    if CI:  # the plain loop runs every block: a crop keeps it to seconds
        return dict(image=demo2()[128:192, 80:144].copy(), task="SR", scale=4, roi=(16, 16, 32), coarse=3, fine=2)
    return dict(image=demo2(), task="SR", scale=4, roi=(152, 96, 32), coarse=3, fine=20)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fixed-cost targets are the CPU's")
def test_fixed_costs_plain_loop(benchmark):
    c = sr_case()
    bank = cem_fast.load_patch_bank(BANK)
    model, _ = cem_fast.load_model("bicubic", scale=4)
    task = cem_fast.make_task("SR", scale=4)
    benchmark.group = "fixed costs: bicubic SR"
    roi = cem_fast.ROI.parse(c["roi"]).as_tuple()
    benchmark.pedantic(plain_loop_cem, args=(model.eval(), task, c["image"], bank, roi, 8, c["coarse"], c["fine"],
                                             0.01, 0), rounds=1, iterations=1)
    ROWS["sr_plain"] = benchmark.stats.stats.median if benchmark.stats else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fixed-cost targets are the CPU's")
def test_fixed_costs_warm_call(benchmark):
    c = sr_case()
    image = c.pop("image")
    call = lambda: cem_fast.causal_effect_map("bicubic", image, patches=BANK, progress=False, **c)  # noqa: E731
    t = time.perf_counter()
    call()
    cold = time.perf_counter() - t
    benchmark.group = "fixed costs: bicubic SR"
    res = benchmark.pedantic(call, rounds=5, iterations=1)
    t = res.extra["timings_s"]
    benchmark.extra_info.update(cold_s=cold, timings_s=t, prepare_over_sampling=t["prepare"] / t["sampling"],
                                forwards=res.num_forwards)
    if ROWS.get("sr_plain") and benchmark.stats:
        benchmark.extra_info["plain_over_warm"] = ROWS["sr_plain"] / benchmark.stats.stats.median


# ---- the engine choice ---------------------------------------------------------------------------------------------

def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                               torch.nn.ReLU(), torch.nn.Conv2d(16, 3, 3, padding=1)).eval()


def engine_configs() -> dict:
    fine = 2 if CI else 20
    crop = demo2()[104:200, 48:144]
    rng_img = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)
    return {
        "bicubic-SR": dict(model="bicubic", image=demo2(), task="SR", scale=4, roi=(152, 96, 32), patches=BANK),
        "tiny-conv": dict(model=tiny_net(), image=rng_img, task="DN", sigma=30, roi=(24, 24, 16)),
        "default-SR": dict(model="default:sr", image=DEMO, task="SR", scale=4, roi=(48, 56, 24)),
        "default-DN": dict(model="default:dn", image=DEMO, task="DN", sigma=50, roi=(48, 56, 24)),
        "DnCNN-crop": dict(model=DNCNN, image=crop if not CI else crop[16:64, 16:64].copy(), task="DN", sigma=50,
                           roi=(32, 32, 32) if not CI else (16, 16, 16), patches=BANK),
    }, dict(coarse=3, fine=fine)


# each engine forced wherever it applies and verifies ("on"), whatever the automatic choice would weigh
FORCED = {"crop": dict(windows="crop", incremental="off"), "windows": dict(windows="on", incremental="off"),
          "layer by layer": dict(windows="on", incremental="on")}


@pytest.mark.parametrize("config", ["bicubic-SR", "tiny-conv", "default-SR", "default-DN", "DnCNN-crop"])
def test_engine_choice(benchmark, config):
    configs, draws = engine_configs()
    c = dict(configs[config])
    model = c.pop("model")
    if isinstance(model, str) and model.startswith("default"):
        model, _ = cem_fast.load_model(model)  # loaded once: the rows time the runs, not the loading

    def run(**forced):
        return cem_fast.causal_effect_map(model, progress=False, **c, **draws, **forced)
    forced = {}
    t = time.perf_counter()
    run()
    cold = time.perf_counter() - t
    rounds = 2 if CI else 3 if cold > 0.2 else 9  # a run of milliseconds: more rounds against the noise
    for name, opts in FORCED.items():
        _, t, res = warm_median(lambda: run(**opts), rounds)
        loc = res.extra["locality"]
        engine = "layer by layer" if loc["incremental"]["used"] else "windows" if loc["windows"]["used"] else "crop"
        forced[name] = dict(seconds=t, engine=engine)  # a forced engine that does not apply runs its fallback
    benchmark.group = "engine choice"
    res = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    loc = res.extra["locality"]
    chosen = "layer by layer" if loc["incremental"]["used"] else "windows" if loc["windows"]["used"] else "crop"
    fastest = min(forced, key=lambda k: forced[k]["seconds"])
    benchmark.extra_info.update(config=config, chosen=chosen, forced=forced, fastest=fastest)
    if benchmark.stats:
        benchmark.extra_info["auto_over_fastest"] = benchmark.stats.stats.median / forced[fastest]["seconds"]


# ---- many ROIs: the grid against the loop of single runs ------------------------------------------------------------

class Res6(torch.nn.Module):
    """A local 6-layer residual conv net (reach 6 px)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.body = torch.nn.ModuleList([torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(4)])
        self.tail = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.head(x))
        for c in self.body:
            h = torch.relu(c(h))
        return x + 0.1 * self.tail(h)


def grid_cases() -> dict:
    res6_img = (np.random.RandomState(0).rand(96, 96, 3) * 255).astype(np.uint8)
    if CI:
        return {"res6-96": (Res6().eval(), res6_img[:64, :64].copy(), None, 4)}
    dncnn, _ = cem_fast.load_model(DNCNN)
    return {"res6-96": (Res6().eval(), res6_img, None, 9), "DnCNN-256": (dncnn, demo2(), BANK, 6),
            "DnCNN-256-exhaustive": (dncnn, demo2(), BANK, 6)}


@pytest.mark.parametrize("case", ["res6-96"] + ([] if CI else ["DnCNN-256", "DnCNN-256-exhaustive"]))
def test_roi_grid_against_single_runs(benchmark, case):
    """``-exhaustive``: every block a tile reaches gets all its draws (no gate), the setting in which the bound is
    the reach's (a tile reaches about 5x its own blocks on DnCNN); coarse-to-fine shares only what the gates share."""
    model, image, bank, sampled = grid_cases()[case]
    kw = dict(task="DN", sigma=50, block=8, coarse=3, fine=2 if CI else 20, patches=bank, progress=False)
    if case.endswith("exhaustive"):
        kw.update(mode="exhaustive", samples=10)
    rois = cem_fast.reference.roi_grid(image.shape[0], image.shape[1], 32)
    pick = np.sort(np.random.RandomState(0).choice(len(rois), sampled, replace=False))
    cem_fast.causal_effect_map(model, image, roi=rois[0].as_tuple(), **kw)  # warm: both sides in a warm process
    t = time.perf_counter()
    singles = [cem_fast.causal_effect_map(model, image, roi=rois[i].as_tuple(), **kw) for i in pick]
    loop_s = (time.perf_counter() - t) * len(rois) / len(pick)
    benchmark.group = f"ROI grid: {case}"
    maps = benchmark.pedantic(lambda: cem_fast.causal_effect_maps(model, image, roi_grid=32, **kw), rounds=1,
                              iterations=1)
    delta = max(float(np.abs(maps[i].effect - s.effect).max()) for i, s in zip(pick, singles))
    loop_forwards = sum(s.num_forwards for s in singles) * len(rois) / len(pick)
    benchmark.extra_info.update(rois=len(rois), sampled_tiles=len(pick), loop_s_scaled=loop_s,
                                grid_bound=loop_forwards / maps[0].num_forwards, max_abs_delta_effect_db=delta,
                                batch=maps[0].extra["final_batch_size"], timings_s=maps[0].extra["timings_s"],
                                plan=maps[0].extra["plan"])
    if benchmark.stats:
        benchmark.extra_info["loop_over_grid"] = loop_s / benchmark.stats.stats.median
    assert delta <= 1e-3, delta


# ---- a busy machine ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def one_busy_process():
    """One CPU-bound process beside the run (a Python loop that never sleeps)."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # scheduled and spinning
    try:
        yield
    finally:
        p.kill()
        p.wait()


@contextlib.contextmanager
def env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def busy_cases() -> dict:
    crop = demo2()[104:200, 48:144]
    return {
        "DnCNN-crop": dict(model=DNCNN, image=crop if not CI else crop[16:64, 16:64].copy(), task="DN", sigma=50,
                           roi=(32, 32, 32) if not CI else (16, 16, 16), patches=BANK),
        "DN-demo": dict(model="default:dn", image=DEMO, task="DN", sigma=50, roi=(48, 56, 24)),
    }


@pytest.mark.skipif(torch.cuda.is_available() or (os.cpu_count() or 1) < 2,
                    reason="a CPU machine with two cores or more: the contention is for them")
@pytest.mark.parametrize("case", ["DnCNN-crop", "DN-demo"])
@pytest.mark.parametrize("load", ["quiet", "busy", "busy, torch's threads"])
def test_busy_machine(benchmark, case, load):
    c = dict(busy_cases()[case])
    model, _ = cem_fast.load_model(c.pop("model"))
    draws = dict(coarse=3, fine=2 if CI else 20)
    call = lambda: cem_fast.causal_effect_map(model, progress=False, **c, **draws)  # noqa: E731
    threads = str(torch.get_num_threads()) if load == "busy, torch's threads" else None
    call()  # warm, quiet
    benchmark.group = f"busy machine: {case}"
    with env(CEM_FAST_THREADS=threads), (one_busy_process() if load != "quiet" else contextlib.nullcontext()):
        res = benchmark.pedantic(call, rounds=1 if load == "busy, torch's threads" and not CI else 3, iterations=1)
    benchmark.extra_info.update(cpu_threads=res.extra.get("cpu_threads"), timings_s=res.extra["timings_s"])
    if benchmark.stats:
        if load == "quiet":
            ROWS[f"busy_{case}"] = benchmark.stats.stats.median
        elif ROWS.get(f"busy_{case}"):
            benchmark.extra_info["over_quiet"] = benchmark.stats.stats.median / ROWS[f"busy_{case}"]


# ---- a second call in the same process ------------------------------------------------------------------------------

class ModelTime:
    """Seconds spent in the model's forwards: the placed module's calls, and the layer-by-layer engine's forward of
    the unintervened region (``materialise``) and recomputations (``run``)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, owner, name):
        old = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return old(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t
        setattr(owner, name, timed)
        return old


def test_second_call_outside_the_model(benchmark):
    from cem_fast.layerwise.compute import LayerwiseGraph
    from cem_fast.pipeline.model import ModelForward
    model, _ = cem_fast.load_model("default:dn")
    call = lambda: cem_fast.causal_effect_map(model, DEMO, task="DN", sigma=50, roi=(48, 56, 24), coarse=3,  # noqa
                                              fine=2 if CI else 20, progress=False)
    call()
    clock = ModelTime()
    saved = [(ModelForward, "__call__", clock.wrap(ModelForward, "__call__")),
             (LayerwiseGraph, "run", clock.wrap(LayerwiseGraph, "run")),
             (LayerwiseGraph, "materialise", clock.wrap(LayerwiseGraph, "materialise"))]
    try:
        benchmark.group = "second call: DN demo"
        res = benchmark.pedantic(call, rounds=1, iterations=1)
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)
    if benchmark.stats:
        wall = benchmark.stats.stats.median
        benchmark.extra_info.update(model_s=clock.seconds, outside_share=1 - clock.seconds / wall,
                                    timings_s=res.extra["timings_s"], forwards=res.num_forwards)
