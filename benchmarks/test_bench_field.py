"""Causal fields (:func:`cem_fast.causal_field`), each group against its baseline row in one run:

* ``field vs loop``: the shipped DnCNN on demo_2 (256x256), 32-px tiles, 3 + 50: the loop of single-tile runs
  (a sample of tiles, timed and scaled to all) is the baseline, the field the other row. ``bound``: what one
  shared pass can save at most, the loop's interventions over the field's, counted from the field's own
  (tile, block) pairs (each tile's reachable blocks x coarse + its gated blocks x fine, against every block x
  coarse + the blocks some tile gated x fine). Three random tiles' maps must equal their single runs.
* ``sizes``: a small conv net over 256^2 ... 2048^2, each field in a process of its own (its peak memory): time
  per intervention against a single-ROI run's (the baseline row, on the 256^2 image), peak RSS and disk.
* ``resume``: the 1024^2 field killed (SIGKILL) once chunks are on disk, then run again to the end: the chunks on
  disk are reused, the maps equal an uninterrupted field's, and the peak memory stays under 3 GB.

``CEM_FAST_BENCH_SIZE=ci`` shrinks every case (a small net, small images) to seconds for ``make test``.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.pipeline.field_pass import field_tiles

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_bench_cem import BANK, DNCNN, SIZE, demo2  # noqa: E402

CI = SIZE == "ci"
PEAK_RSS_LIMIT_GB = 3.0


class SmallNet(torch.nn.Module):
    """A small residual conv net (3 -> 16 -> 16 -> 3, ReLU), fixed weights: the 'small model' of the size rows."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, padding=1) for a, b in ((3, 16), (16, 16), (16, 3)))
        with torch.no_grad():
            for c in self.convs:
                c.weight.copy_(torch.randn(c.weight.shape, generator=g) * 0.15)
                c.bias.zero_()

    def forward(self, x):
        h = x
        for i, c in enumerate(self.convs):
            h = c(h)
            if i < len(self.convs) - 1:
                h = torch.relu(h)
        return x + 0.2 * h


def noise_image(size: int) -> np.ndarray:
    return (np.random.RandomState(size).rand(size, size, 3) * 255).astype(np.uint8)


def sharing_bound(field) -> float:
    """The loop's interventions over the field's, from the field's (tile, block) pairs."""
    p, i = field.data.pairs, field.info
    c, f = i["coarse"], i["fine"]
    loop = len(p["tiles"]) * c + int(p["gated"].sum()) * f
    mine = len(np.unique(p["blocks"])) * c + len(np.unique(p["blocks"][p["gated"]])) * f
    return loop / mine


# ---- the field against the loop of single-tile runs ---------------------------------------------------------------

def loop_case() -> dict:
    if CI:
        return dict(model=SmallNet().eval(), image=noise_image(64), tile=16, coarse=3, fine=5, patches=None,
                    sampled=3)
    dncnn, _ = cem_fast.load_model(DNCNN)
    return dict(model=dncnn, image=demo2(), tile=32, coarse=3, fine=50, patches=BANK, sampled=4)


ROWS: dict = {}


@pytest.mark.parametrize("row", ["loop", "field"])
def test_field_against_the_loop_of_single_tiles(benchmark, row):
    case = loop_case()
    model, image, tile = case["model"], case["image"], case["tile"]
    kw = dict(task="DN", sigma=50, block=8, coarse=case["coarse"], fine=case["fine"], patches=case["patches"],
              progress=False)
    tiles = field_tiles(image.shape[0], image.shape[1], tile)
    pick = np.sort(np.random.RandomState(0).choice(len(tiles), case["sampled"], replace=False))
    benchmark.group = f"field vs loop: {'small net 64^2' if CI else 'DnCNN demo_2 256^2'}, {tile}-px tiles"
    if row == "loop":
        cem_fast.causal_effect_map(model, image, roi=tiles[pick[0]].as_tuple(), **kw)  # a warm process, as the field

        def loop():
            return [cem_fast.causal_effect_map(model, image, roi=tiles[j].as_tuple(), **kw) for j in pick]
        singles = benchmark.pedantic(loop, rounds=1, iterations=1)
        ROWS["singles"] = dict(zip(pick.tolist(), singles))
        per_tile = benchmark.stats.stats.median / len(pick) if benchmark.stats else None
        benchmark.extra_info.update(tiles=len(tiles), sampled_tiles=len(pick),
                                    forwards_sampled=sum(s.num_forwards for s in singles),
                                    **({"loop_s_scaled": per_tile * len(tiles)} if per_tile else {}))
        if per_tile:
            ROWS["loop_s"] = per_tile * len(tiles)
        return
    field = benchmark.pedantic(lambda: cem_fast.causal_field(model, image, tile=tile, **kw), rounds=1,
                               iterations=1)
    singles = ROWS.get("singles") or {j: cem_fast.causal_effect_map(model, image, roi=tiles[j].as_tuple(), **kw)
                                      for j in pick}
    delta = max(float(np.abs(field.tile_result(j).effect - s.effect).max()) for j, s in singles.items())
    benchmark.extra_info.update(tiles=len(tiles), forwards=field.info["num_forwards"], bound=sharing_bound(field),
                                engine=field.info["engine"], batch=field.info["batch_size"],
                                timings_s=field.info["timings_s"], max_abs_delta_effect_db=delta)
    if benchmark.stats and "loop_s" in ROWS:
        benchmark.extra_info["loop_over_field"] = ROWS["loop_s"] / benchmark.stats.stats.median
    assert delta <= 1e-3, delta


# ---- over sizes, each in a process of its own ------------------------------------------------------------------

FIELD_SCRIPT = r"""
import json, resource, sys, time, os
sys.path.insert(0, sys.argv[1])
import cem_fast
from cem_fast.pipeline.field_pass import field_tiles
from test_bench_field import SmallNet, noise_image
size, out, fine = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
t = time.perf_counter()
f = cem_fast.causal_field(SmallNet().eval(), noise_image(size), task="DN", sigma=50, tile=32, coarse=3, fine=fine,
                          out=out, progress=False)
wall = time.perf_counter() - t
disk = sum(p.stat().st_size for p in __import__("pathlib").Path(out).rglob("*") if p.is_file())
# VmHWM: this process's own peak (ru_maxrss keeps the forking parent's peak across exec on Linux)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")] if os.path.exists("/proc/self/status") else []
peak_kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": wall, "forwards": f.info["num_forwards"], "timings_s": f.info["timings_s"],
                  "chunks": f.info["chunks"], "engine": f.info["engine"], "disk_bytes": disk,
                  "peak_rss_gb": peak_kb / 2**20}))
"""

SIZES = [64, 128] if CI else [256, 512, 1024, 2048]
SIZE_FINE = 5 if CI else 50


def run_field_process(size: int, out: Path, fine: int = SIZE_FINE, **popen) -> dict:
    p = subprocess.run([sys.executable, "-c", FIELD_SCRIPT, str(HERE), str(size), str(out), str(fine)],
                       capture_output=True, text=True, timeout=3600, **popen)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("size", ["single"] + SIZES)
def test_field_over_sizes(benchmark, size, tmp_path):
    benchmark.group = "field over sizes: small net, 32-px tiles, time per intervention"
    if size == "single":  # the baseline: one ROI's run, per intervention
        image, model = noise_image(SIZES[0]), SmallNet().eval()
        kw = dict(task="DN", sigma=50, coarse=3, fine=SIZE_FINE, progress=False)
        roi = (SIZES[0] // 2 - 16, SIZES[0] // 2 - 16, 32)
        cem_fast.causal_effect_map(model, image, roi=roi, **kw)
        res = benchmark.pedantic(lambda: cem_fast.causal_effect_map(model, image, roi=roi, **kw), rounds=3,
                                 iterations=1)
        benchmark.extra_info.update(forwards=res.num_forwards)
        if benchmark.stats:
            benchmark.extra_info["ms_per_intervention"] = 1e3 * benchmark.stats.stats.median / res.num_forwards
        return
    got = {}

    def field():
        got.update(run_field_process(size, tmp_path / "f"))
    benchmark.pedantic(field, rounds=1, iterations=1)
    benchmark.extra_info.update(got, ms_per_intervention=1e3 * got["timings_s"]["sampling"] / got["forwards"])
    assert got["peak_rss_gb"] < PEAK_RSS_LIMIT_GB


# ---- resumed after a kill ----------------------------------------------------------------------------------------

def test_a_killed_field_resumes(benchmark, tmp_path):
    size = 128 if CI else 1024
    benchmark.group = f"field resume: small net {size}^2, killed once chunks are on disk"
    out = tmp_path / "f"
    script = [sys.executable, "-c", FIELD_SCRIPT, str(HERE), str(size), str(out), str(SIZE_FINE)]
    proc = subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(list((out / "chunks").glob("*.npz"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    on_disk = len(list((out / "chunks").glob("*.npz")))
    got = {}

    def resume():
        got.update(run_field_process(size, out))
    benchmark.pedantic(resume, rounds=1, iterations=1)
    whole = run_field_process(size, tmp_path / "whole")
    a, b = np.load(out / "field.npz"), np.load(tmp_path / "whole" / "field.npz")
    for k in ("pair_effect", "pair_blocks", "pair_tiles", "psnr_origin"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    benchmark.extra_info.update(chunks_on_disk_at_kill=on_disk, resumed=got["chunks"], peak_rss_gb=got["peak_rss_gb"],
                                uninterrupted_s=whole["seconds"], resumed_s=got["seconds"])
    assert got["chunks"]["reused"] >= on_disk > 0 or got["chunks"]["count"] == got["chunks"]["reused"]
    assert got["peak_rss_gb"] < PEAK_RSS_LIMIT_GB
