"""Print pytest-benchmark JSON files as one markdown table: group, row, median, forwards, and the ratios that the
rows recorded against their group's baseline row (see the extra_info keys)."""
import json
import sys

RATIOS = ("exact_over_floor", "exact_over_speed", "pearson_vs_golden", "max_abs_delta_ce_db", "over_demo_speed",
          "over_one_roi", "plain_over_pipeline", "pearson_vs_plain", "cold_s", "interventions_per_s",
          "effective_GBps", "speedup_sampling", "speedup_run", "speedup_command", "crop_over_windows",
          "loop_over_this", "windows_over_incremental", "crop_over_incremental", "max_abs_delta_cem_db",
          "max_abs_delta_effect_db")
STAGES = ("prepare", "probe", "sampling", "finish")


def main(paths):
    print("| group | row | median s | forwards | locality | stages s (prepare/probe/sampling/finish) | ratios |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        data = json.load(open(path))
        for b in data["benchmarks"]:
            e = b.get("extra_info", {})
            loc = e.get("locality") or {}
            where = ("off" if not loc.get("active") else
                     f"{loc.get('skipped_blocks')} skipped, crop {loc.get('crop')}") if loc else ""
            ratios = ", ".join(f"{k} {e[k]:.3g}" for k in RATIOS if isinstance(e.get(k), (int, float)))
            t = e.get("timings_s") or {}
            stages = " / ".join(f"{t[k]:.3g}" for k in STAGES if k in t)
            print(f"| {b['group']} | {b['name'].replace('test_', '')} | {b['stats']['median']:.4g} | "
                  f"{e.get('forwards', '')} | {where} | {stages} | {ratios} |")


if __name__ == "__main__":
    main(sys.argv[1:])
