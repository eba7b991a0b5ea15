"""The GPU check's short microbenchmark: rows appended to a JSONL file as they are measured (a deadline loses only
the row in progress).

* DnCNN forward (the shipped checkpoint, else the packaged default): NCHW against channels-last, fp32 / TF32 /
  bf16, at 72x72 (the speed mode's pixel-tight crop) and 256x256 (the whole demo image); CUDA events, warm-up
  first, the median of several runs, never on zeros. On the CPU: fp32, 72x72, small batch (a rehearsal).
* Host synchronisations of one small speed-mode CEM call: on CUDA counted by torch itself
  (``torch.cuda.set_sync_debug_mode("warn")``: one warning per synchronising call), and everywhere by the
  instrumentation of tests/pipeline/test_runner.py (host_syncs.SyncCounter), per batch.

    python benchmarks/micro_gpu.py ROWS.jsonl
"""
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cem_fast  # noqa: E402
from cem_fast.pipeline.model import precision_mode  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHARED = Path(os.environ.get("CEM_FAST_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def write(path, row):
    row = {"kind": "micro", "device": str(DEV), **row}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str))


def timed(fn, reps):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if DEV.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def model():
    ckpt = SHARED / "models" / "dncnn_color_blind.pth"
    m, _ = cem_fast.load_model(str(ckpt) if ckpt.is_file() else "default")
    return m.to(DEV).eval()


def forwards(path):
    net = model()
    cases = ([(72, 64), (256, 16)] if DEV.type == "cuda" else [(72, 2)])
    precisions = ["fp32", "tf32", "bf16"] if DEV.type == "cuda" else ["fp32"]
    g = torch.Generator(device=DEV).manual_seed(0)
    for side, batch in cases:
        x0 = torch.rand(batch, 3, side, side, generator=g, device=DEV)
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            net = net.to(memory_format=fmt)
            x = x0.contiguous(memory_format=fmt)
            for precision in precisions:
                def run():
                    with torch.inference_mode(), precision_mode(precision, DEV):
                        net(x)
                t = timed(run, 10 if DEV.type == "cuda" else 3)
                write(path, dict(what="dncnn_forward", side=side, batch=batch, layout=layout, precision=precision,
                                 median_s=t, px_per_s=batch * side * side / t))


def syncs(path):
    from host_syncs import SyncCounter
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (96, 96, 3)).astype(np.uint8)
    kw = dict(task="DN", roi=(40, 36, 16), coarse=3, fine=2, progress=False, device=DEV.type, batch_size=16)
    cem_fast.causal_effect_map("default", image, **kw)  # warm
    with SyncCounter() as c:
        res = cem_fast.causal_effect_map("default", image, **kw)
    row = dict(what="host_syncs_instrumented", forwards=res.num_forwards, locality=res.extra["locality"].get(
        "incremental", {}).get("used"), **c.report())
    write(path, row)
    if DEV.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                res = cem_fast.causal_effect_map("default", image, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        where = {}
        for w in caught:
            if "synchroniz" in str(w.message).lower():
                key = f"{Path(w.filename).name}:{w.lineno}"
                where[key] = where.get(key, 0) + 1
        write(path, dict(what="host_syncs_cuda_debug_mode", syncs_per_call=sum(where.values()),
                         forwards=res.num_forwards, top_sites=dict(sorted(where.items(), key=lambda kv: -kv[1])[:12])))


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "micro.jsonl"
    for step in (syncs, forwards):
        try:
            step(out)
        except Exception as e:  # noqa: BLE001 - the next measurement still runs
            import traceback
            traceback.print_exc()
            write(out, dict(what=step.__name__, error=f"{type(e).__name__}: {e}"))
