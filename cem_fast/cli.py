"""``cem-fast``: run CEMs from a YAML config, run the offline demo, or show what is available.

    cem-fast run CONFIG.yml --out DIR [--set key=value ...] [--exact] [--fresh]
    cem-fast demo [--out DIR]
    cem-fast info

Errors are one line on stderr and a non-zero exit (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

CACHE_DIR = ".cem_cache"  # inside --out: per-batch samples, so a re-run resumes after a crash
EXIT_USAGE = 2
EXIT_FAILED = 1


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def run_config(cfg, out_dir: Path, progress: Optional[bool], title: str = "Causal Effect Maps",
               fresh: bool = False, keep: Optional[list] = None,
               entries: Optional[list] = None) -> tuple[Path, int]:
    """Run every model on every image of ``cfg``; returns the report path and the number of failed runs.
    With ``keep``, (model name, image name, CEMResult) of each successful run are appended to it."""
    from .estimator import causal_effect_maps
    from .models import apply_model_options, load_model
    from .report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    opts = dict(cfg.options)
    # make_task takes the options of the configured task and ignores the others
    task_opts = {k: opts.pop(k) for k in ("scale", "sigma", "noise_seed", "input_noise", "rain_preset", "rain_beta",
                                          "rain_seed")}
    entries = [] if entries is None else entries
    failed, used = 0, set()
    for spec in cfg.models:
        model, name = load_model(spec, scale=int(task_opts["scale"]))
        scale = int(task_opts["scale"]) if str(opts["task"]).upper() == "SR" else 1
        model = apply_model_options(model, opts.get("model_options"), scale)
        name = _safe_name(name)
        while name in used:
            name += "_"
        used.add(name)
        for image in cfg.images:
            stem = _safe_name(Path(image).stem)
            rel = f"{name}/{stem}"
            print(f"[cem-fast] {name} on {Path(image).name} ...", file=sys.stderr, flush=True)
            try:
                source = _load_cropped(image, opts["crop"]) if opts.get("crop") else image
                results = causal_effect_maps(
                    model, source, image_name=Path(image).name, task=opts["task"],
                    rois=None if cfg.roi_grid else cfg.rois, roi_grid=cfg.roi_grid, block=opts["block"],
                    coarse=opts["coarse"], fine=opts["fine"], tol=opts["tol"], patches=opts["patches"],
                    seed=opts["seed"], device=opts["device"], batch_size=opts["batch_size"], mode=opts["mode"],
                    samples=opts["samples"], backend=opts["backend"], locality=opts["locality"],
                    precision=opts["precision"], progress=progress, model_name=name,
                    cache=out_dir / CACHE_DIR, fresh=fresh, **task_opts)
            except (ValueError, RuntimeError) as e:
                failed += 1
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"cem-fast: error: {name} on {Path(image).name}: {msg}", file=sys.stderr)
                entries.append({"model": name, "image": Path(image).name, "dir": rel, "error": msg})
                continue
            res = results[0]
            if "cropped_from" in res.extra:
                h, w = res.extra["cropped_from"]
                print(f"[cem-fast]   note: {Path(image).name} ({h}x{w}) was cropped to {res.gt.shape[-2]}x"
                      f"{res.gt.shape[-1]}, a multiple of the scale", file=sys.stderr)
            extra = {"config": _jsonable(cfg.raw), "model_spec": spec}
            loc = _locality_note(res.extra.get("locality", {}))
            if cfg.multi_roi:
                for r in results:
                    r.extra.update(extra)
                results.save(out_dir / rel)
                print(f"[cem-fast]   {len(results)} ROIs from {res.num_forwards} forwards{_reused(res)}{loc}, "
                      f"{res.wall_time:.1f} s -> {out_dir / rel}", file=sys.stderr, flush=True)
                entries.append({"model": name, "image": Path(image).name, "dir": rel,
                                "rois": json.loads((out_dir / rel / "rois.json").read_text())})
            else:
                res.save(out_dir / rel, summary_extra=extra)
                st = res.stats()
                print(f"[cem-fast]   Y(I) {res.psnr_origin:.2f} dB, +{st['positive']} / -{st['negative']} / "
                      f"0 {st['zero']} blocks, range {st.get('range_db', 0):.3f} dB, {res.num_forwards} forwards"
                      f"{_reused(res)}{loc}, {res.wall_time:.1f} s -> {out_dir / rel}", file=sys.stderr, flush=True)
                entries.append({"model": name, "image": Path(image).name, "dir": rel,
                                "summary": json.loads((out_dir / rel / "summary.json").read_text())})
            if keep is not None:
                keep.append((name, Path(image).name, res))
    report = write_report(out_dir, entries, title=title)
    return report, failed


def _load_cropped(image: str, box):
    import numpy as np
    from PIL import Image
    path = Path(image)
    if not path.is_file():
        raise ValueError(f"image {image!r} does not exist")
    with Image.open(path) as im:
        if box[2] > im.width or box[3] > im.height:
            raise ValueError(f"crop {list(box)} must lie inside the {im.width}x{im.height} image {path.name}")
        return np.array(im.convert("RGB").crop(tuple(box)))


def _locality_note(info: dict) -> str:
    """How locality changed the run, for the progress line."""
    if not info.get("active"):
        return f" (whole image: {info['reason']})" if info.get("mode") == "auto" and info.get("reason") else ""
    crop = info.get("crop")
    what = [f"{info['skipped_blocks']} blocks skipped"] + ([f"crop {crop[2]}x{crop[3]} input px"] if crop else [])
    return f" (locality: {', '.join(what)}, verified)"


def _reused(res) -> str:
    n = res.extra.get("reused_from_cache", 0)
    return f" (+{n} samples from the cache)" if n else ""


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def _with_exact(args) -> list[str]:
    return list(args.set) + (["locality=off", "precision=fp32"] if args.exact else [])


def cmd_run(args) -> int:
    from .config import load_config
    cfg = load_config(args.config, _with_exact(args))
    report, failed = run_config(cfg, Path(args.out), progress=False if args.no_progress else None,
                                fresh=args.fresh)
    print(f"report: {report}")
    return EXIT_FAILED if failed else 0


def cmd_compare(args) -> int:
    from .compare import difference, save_difference
    from .config import load_config
    from .report import write_compare_report
    cfg = load_config(args.config, _with_exact(args))
    if cfg.multi_roi:
        raise ValueError("compare takes one roi, got rois / roi_grid")
    if len(cfg.models) < 2:
        raise ValueError(f"compare needs at least two models in the config, got {len(cfg.models)}")
    out = Path(args.out)
    kept: list = []
    report, failed = run_config(cfg, out, progress=False if args.no_progress else None, fresh=args.fresh, keep=kept)
    by_image: dict[str, list] = {}
    for name, image, res in kept:
        by_image.setdefault(image, []).append((name, res))
    rows = []
    for image, runs in by_image.items():
        (base_name, base), diffs = runs[0], []
        for name, res in runs[1:]:
            d = difference(res, base)
            rel = f"compare/{_safe_name(Path(image).stem)}/{name}_vs_{base_name}"
            save_difference(d, res, out / rel)
            diffs.append({"name": f"{name} - {base_name}", "dir": rel, "summary": d.summary()})
        rows.append({"image": image, "runs": [(n, f"{n}/{_safe_name(Path(image).stem)}", r.summary())
                                              for n, r in runs], "diffs": diffs})
    path = write_compare_report(out, rows)
    print(f"report: {report}\ncomparison: {path}")
    return EXIT_FAILED if failed else 0


def cmd_demo(args) -> int:
    """The three shipped defaults on the shipped image: DN sigma 50, SR x4 and DR (medium rain)."""
    from .config import normalise
    from .report import write_report
    out = Path(args.out)
    entries: list = []
    failed = 0
    t0 = time.perf_counter()
    with resources.as_file(resources.files("cem_fast") / "data" / "demo.png") as demo_image:
        for task, model in (("DN", "default"), ("SR", "default:sr"), ("DR", "default:dr")):
            cfg = normalise({"model": model, "images": [str(demo_image)], "task": task, "sigma": 50, "scale": 4,
                             "roi": list(DEMO_ROI), "block": 8, "coarse": 3, "fine": args.fine})
            _, n_failed = run_config(cfg, out, progress=False if args.no_progress else None, entries=entries)
            failed += n_failed
    report = write_report(out, entries, title="cem_fast demo: the shipped denoiser, x4 SR and deraining models")
    print(f"demo report written in {time.perf_counter() - t0:.1f} s: {report.resolve()}")
    return EXIT_FAILED if failed else 0


DEMO_ROI = (48, 56, 24)  # on the cat's eye in demo.png (128x128)


def cmd_info(args) -> int:
    from .info import info_text
    print(info_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cem-fast", description="Causal Effect Maps for image-restoration networks.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the CEMs of a YAML config")
    r.add_argument("config", help="YAML config (reference keys or ours; see README)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--fresh", action="store_true",
                   help=f"ignore samples cached by an earlier run (in OUT/{CACHE_DIR}) and recompute")
    r.add_argument("--exact", action="store_true",
                   help="exact mode: every block on the whole input in fp32 (same as --set locality=off "
                        "--set precision=fp32)")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("compare", help="run several models with the same draws and compare their maps")
    c.add_argument("config", help="YAML config with `models:` (two or more)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--fresh", action="store_true", help="ignore cached samples and recompute")
    c.add_argument("--exact", action="store_true", help="exact mode (locality off, fp32)")
    c.set_defaults(func=cmd_compare)
    d = sub.add_parser("demo", help="run the offline demo and write a report")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--fine", type=int, default=20,
                   help="fine interventions per gated block (default 20 to keep the demo short; the paper uses 50)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="versions, device, available backends and why others are not")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("cem-fast: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"cem-fast: error: {msg}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
