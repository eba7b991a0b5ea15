"""Print pytest-benchmark JSON files as one markdown table: group, row, median, forwards, and the ratios that the
rows recorded against their group's baseline row (see the extra_info keys)."""
import json
import sys

RATIOS = ("exact_over_floor", "exact_over_speed", "pearson_vs_golden", "max_abs_delta_ce_db", "over_demo_speed",
          "over_one_roi", "plain_over_pipeline", "pearson_vs_plain", "cold_s", "interventions_per_s",
          "effective_GBps", "speedup_sampling", "speedup_run", "speedup_command", "crop_over_windows",
          "loop_over_this", "windows_over_incremental", "crop_over_incremental", "max_abs_delta_cem_db",
          "max_abs_delta_effect_db", "loop_over_field", "bound", "ms_per_intervention", "peak_rss_gb")
STAGES = ("prepare", "probe", "sampling", "finish")


def load(path):
    """pytest-benchmark JSON, or the rows the GPU check appends as they finish (JSONL: benchmark rows, micro rows,
    cross-shape differences), as (benchmarks, other rows)."""
    if not path.endswith(".jsonl"):
        return json.load(open(path))["benchmarks"], []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line cut by a kill
    benches = [dict(r, stats={"median": r["median"]}) for r in rows if r.get("kind") == "benchmark" and "median" in r]
    return benches, [r for r in rows if r.get("kind") != "benchmark" or "median" not in r]


def main(paths):
    other = []
    print("| group | row | median s | forwards | locality | stages s (prepare/probe/sampling/finish) | ratios |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        benches, rest = load(path)
        other += rest
        for b in benches:
            e = b.get("extra_info", {})
            loc = e.get("locality") or {}
            where = ("off" if not loc.get("active") else
                     f"{loc.get('skipped_blocks')} skipped, crop {loc.get('crop')}") if loc else ""
            ratios = ", ".join(f"{k} {e[k]:.3g}" for k in RATIOS if isinstance(e.get(k), (int, float)))
            t = e.get("timings_s") or {}
            stages = " / ".join(f"{t[k]:.3g}" for k in STAGES if k in t)
            print(f"| {b['group']} | {b['name'].replace('test_', '')} | {b['stats']['median']:.4g} | "
                  f"{e.get('forwards', '')} | {where} | {stages} | {ratios} |")
    failed = [r for r in other if r.get("kind") == "benchmark" and r.get("outcome") == "failed"]
    for r in failed:
        print(f"\nFAILED benchmark {r['name']}: {r.get('error', '')[-300:]}")
    micro = [r for r in other if r.get("kind") == "micro"]
    if micro:
        print("\n| micro | case | result |\n|---|---|---|")
        for r in micro:
            if r.get("what") == "dncnn_forward":
                print(f"| DnCNN forward | {r['side']}px x{r['batch']} {r['layout']} {r['precision']} | "
                      f"{r['median_s'] * 1e3:.3g} ms, {r['px_per_s'] / 1e6:.3g} Mpx/s |")
            elif "syncs" in r or "syncs_per_call" in r:
                print(f"| host syncs | {r['what']} | {r.get('syncs', r.get('syncs_per_call'))} per call"
                      f"{', %s per batch' % r['per_batch'] if 'per_batch' in r else ''} |")
            else:
                print(f"| {r.get('what')} | | {r.get('error', '')} |")
    diffs = [r for r in other if r.get("kind") == "cross_shape_difference"]
    if diffs:
        worst = max(diffs, key=lambda r: r["max_abs_db"])
        print(f"\ncross-shape differences: {len(diffs)} comparisons, {sum(r['max_abs_db'] > 0 for r in diffs)} not "
              f"bit-identical, largest {worst['max_abs_db']:.3g} dB ({worst['test']} {worst['what']}), largest "
              f"fraction differing {max(r['differ_fraction'] for r in diffs):.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
