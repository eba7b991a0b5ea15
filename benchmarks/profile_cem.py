"""Profile one speed-mode DN demo CEM (the benchmark's case for this device and size) with torch.profiler: where a
target is missed, this is the profile that goes beside the result.

    python benchmarks/profile_cem.py [OUT_DIR]      # CEM_FAST_BENCH_SIZE=ci for the small case

Writes profile.txt (the top operators by device time, or CPU time without CUDA, and the run's per-stage timings)
and, where supported, a gzipped Chrome trace (trace.json.gz) into OUT_DIR (default: .).
"""
import gzip
import json
import shutil
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cem_fast  # noqa: E402
from test_bench_cem import BANK, DEV, DNCNN, dn_case  # noqa: E402


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    image, roi, coarse, fine, _ = dn_case()
    run = lambda: cem_fast.causal_effect_map(DNCNN, image, task="DN", roi=roi, coarse=coarse, fine=fine,  # noqa
                                             patches=BANK, device=DEV, progress=False)
    run()  # warm: kernels compiled, batch size remembered
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=activities) as prof:
        res = run()
    key = "cuda_time_total" if DEV == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    text = (f"device {DEV} ({torch.cuda.get_device_name(0) if DEV == 'cuda' else 'cpu'}), "
            f"{res.num_forwards} forwards, wall {res.wall_time:.3f} s\n"
            f"timings_s {json.dumps(res.extra['timings_s'])}\nlocality {json.dumps(res.extra['locality'])}\n\n"
            f"{table}\n")
    (out_dir / "profile.txt").write_text(text)
    try:
        trace = out_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as f, gzip.open(out_dir / "trace.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        trace.unlink()
    except Exception as e:  # noqa: BLE001 - the table is what matters
        print(f"no chrome trace: {e}")
    print(text[:2000])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
