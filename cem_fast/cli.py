"""``cem-fast``: run CEMs from a YAML config, run the offline demo, or show what is available.

    cem-fast run CONFIG.yml --out DIR [--set key=value ...] [--exact] [--fresh]
    cem-fast demo [--out DIR]
    cem-fast convergence CONFIG.yml --out DIR [--truth 1000] [--seeds 3]
    cem-fast study CONFIG.yml --out DIR [--far-px PX]
    cem-fast field CONFIG.yml --out DIR [--set key=value ...] [--fresh]
    cem-fast info

Errors are one line on stderr and a non-zero exit (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from .checks import first_line
from .config_runs import run_config, runs_report
from .names import CACHE_DIR

EXIT_USAGE = 2
EXIT_FAILED = 1


def _say_report(report: Optional[Path]) -> None:
    """Where the report is; nothing when every run failed (their errors, one line each, said it all)."""
    if report is not None:
        print(f"report: {report}")


def _with_exact(args) -> list[str]:
    return (list(args.set) + (["locality=off", "precision=fp32"] if args.exact else [])
            + (["trust_model_code=true"] if args.trust_model else []))


def cmd_run(args) -> int:
    from .config import load_config
    cfg = load_config(args.config, _with_exact(args))
    report, failed = run_config(cfg, Path(args.out), progress=False if args.no_progress else None,
                                fresh=args.fresh)
    if _lead():
        _say_report(report)
    return EXIT_FAILED if failed else 0


def cmd_field(args) -> int:
    from .field import causal_field
    from .options import split_options
    from .config import load_config
    cfg = load_config(args.config, _with_exact(args), field=True)
    if len(cfg.models) != 1 or len(cfg.images) != 1:
        raise ValueError(f"cem-fast field takes one model and one image, got {len(cfg.models)} model(s) and "
                         f"{len(cfg.images)} image(s)")
    run, task, rest = split_options(cfg.options)
    given = {k: v for k, v in {**vars(run), **vars(task)}.items()
             if v is not None and k not in ("cache", "fresh", "roi_plan", "progress")}
    from .models import apply_model_options, load_model
    model, name = load_model(cfg.models[0], scale=task.scale, trust_model_code=run.trust_model_code,
                             module_dirs=cfg.module_dirs)
    model = apply_model_options(model, rest.get("model_options"), task.scale if str(rest["task"]).upper() == "SR"
                                else 1)
    out = Path(args.out)
    field = causal_field(model, cfg.images[0], rest["task"], model_name=name, tile=cfg.raw.get("tile", 32),
                         max_memory=cfg.raw.get("max_memory"), patches=rest["patches"], out=out, fresh=args.fresh,
                         progress=False if args.no_progress else None, image_name=Path(cfg.images[0]).name,
                         **given)
    if _lead():
        print(f"{field}", file=sys.stderr)
        _say_report(field.save(out))
    return 0


def _lead() -> bool:
    from .distributed import is_lead
    return is_lead()


def cmd_compare(args) -> int:
    from .compare import difference, save_difference
    from .config import load_config
    from .jsonsafe import json_safe
    from .report import write_compare_report
    cfg = load_config(args.config, _with_exact(args))
    if cfg.multi_roi:
        raise ValueError("compare takes one roi, got rois / roi_grid")
    if len(cfg.models) < 2:
        raise ValueError(f"compare needs at least two models in the config, got {len(cfg.models)}")
    out = Path(args.out)
    kept: list = []
    report, failed = run_config(cfg, out, progress=False if args.no_progress else None, fresh=args.fresh, keep=kept)
    if not _lead():  # the other ranks of a torchrun study computed their shares; rank 0 compares and writes
        return EXIT_FAILED if failed else 0
    by_image: dict[str, list] = {}
    for name, label, folder, res in kept:
        by_image.setdefault((label, folder), []).append((name, res))
    rows = []
    for (label, folder), runs in by_image.items():
        (base_name, base), diffs = runs[0], []
        for name, res in runs[1:]:
            d = difference(res, base)
            rel = f"compare/{folder}/{name}_vs_{base_name}"
            save_difference(d, res, out / rel)
            diffs.append({"name": f"{name} - {base_name}", "dir": rel, "summary": d.summary()})
        rows.append({"image": label, "runs": [(n, f"{n}/{folder}", json_safe(r.summary())) for n, r in runs],
                     "diffs": diffs, "maps": _shared_scale_maps(runs, out, f"compare/{folder}", cfg)})
    if not kept:  # every run failed: nothing to compare
        (out / "compare.html").unlink(missing_ok=True)
        return EXIT_FAILED
    path = write_compare_report(out, rows)
    _say_report(report)
    print(f"comparison: {path}")
    return EXIT_FAILED if failed else 0


def _shared_scale_maps(runs: list, out: Path, rel: str, cfg) -> dict[str, str]:
    """Each model's map again, all on one colour scale (each run's own cem.png has its own "auto" bound, so equal
    colours there need not mean equal effects); returns model name -> picture relative to ``out``."""
    from .map_pictures import colour_scale
    from .plotting import cem_figure, save_figure
    shared = colour_scale(cfg.options.get("plot_scale", "auto"), [res for _, res in runs])
    maps = {}
    for name, res in runs:
        maps[name] = f"{rel}/{name}_cem.png"
        save_figure(cem_figure(res, scale=shared), out / maps[name])
    return maps


def cmd_demo(args) -> int:
    """The three shipped defaults on the shipped image: DN sigma 50, SR x4 and DR (medium rain)."""
    from .config import normalise
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
    if _lead():  # under torchrun the ranks shared the runs; rank 0 writes
        report = runs_report(out, entries, "cem_fast demo: the shipped denoiser, x4 SR and deraining models")
        if report is not None:
            print(f"demo report written in {time.perf_counter() - t0:.1f} s: {report.resolve()}")
    return EXIT_FAILED if failed else 0


DEMO_ROI = (48, 56, 24)  # on the cat's eye in demo.png (128x128)


def cmd_convergence(args) -> int:
    """The map error of each sampling plan against a high-sample truth (the config's first model, image, ROI)."""
    from . import convergence
    from .config import load_config
    from .models import load_model
    from .options import split_options
    cfg = load_config(args.config, _with_exact(args))
    if cfg.multi_roi:
        raise ValueError("convergence takes one roi, got rois / roi_grid")
    for name, value in (("--truth", args.truth), ("--seeds", args.seeds)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    run, task_opts, rest = split_options(cfg.options)
    model, name = load_model(cfg.models[0], scale=task_opts.scale, trust_model_code=run.trust_model_code,
                             module_dirs=cfg.module_dirs)
    opts = {k: getattr(run, k) for k in ("block", "tol", "locality", "precision", "batch_size", "device", "backend",
                                         "max_pixels")}
    print(f"[cem-fast] convergence of {name} on {Path(cfg.images[0]).name}: truth with {args.truth} draws per "
          f"block, then {len(convergence.PLANS)} plans x {args.seeds} seeds ...", file=sys.stderr, flush=True)
    result = convergence.study(model, cfg.images[0], rest["task"], cfg.roi.as_tuple(), truth_draws=args.truth,
                               seeds=range(args.seeds), patches=rest["patches"], **opts, **task_opts.as_kwargs())
    out = convergence.save(result, Path(args.out))
    print(convergence.table(result) + f"written: {out}")
    return 0


def cmd_study(args) -> int:
    """Every model x image x ROI of the config (as ``run``: maps under OUT/<model>/<image>, resumable from
    OUT/.cem_cache, sharded under torchrun), then the study's tables, profiles and page in OUT (rank 0)."""
    from .config import load_config
    from .studies import Study
    cfg = load_config(args.config, _with_exact(args))
    if args.far_px is not None and not args.far_px >= 0:
        raise ValueError(f"--far-px must be a distance >= 0 in output px, got {args.far_px}")
    out = Path(args.out)
    kept: list = []
    report, failed = run_config(cfg, out, progress=False if args.no_progress else None, fresh=args.fresh,
                                keep_all=kept, title="Causal Effect Maps of a study")
    if not _lead():
        return EXIT_FAILED if failed else 0
    if not kept:
        print("cem-fast: error: no run of the study succeeded: no study written", file=sys.stderr)
        return EXIT_FAILED
    from .options import split_options
    study = Study.from_runs(kept, far_px=args.far_px, seed=split_options(cfg.options)[0].seed)
    written = study.save(out, maps=False)
    _say_report(report)
    print(f"study: {written / 'study.html'} ({len(study.rows)} maps; study.md, study.csv, study.json, "
          "profiles.png)")
    return EXIT_FAILED if failed else 0


def cmd_info(args) -> int:
    from .info import info_text
    print(info_text())
    return 0


TRUST_HELP = ("load model files that hold programs (TorchScript, torch.export .pt2), which can run code: only for "
              "files you trust (config: trust_model_code: true)")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line (``cem-fast run --help`` still shows the usage)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"cem-fast: error: {message} (see {self.prog} --help)\n")


def _add_field_parser(sub) -> None:
    f = sub.add_parser("field", help="every tile of an image an ROI: a causal field, its metric maps and report")
    f.add_argument("config", help="YAML config: model, image, task options and tile (default 32 px)")
    f.add_argument("--out", required=True, help="output folder (chunks, metrics.npz, pictures, report.html); a "
                                                "killed field resumes from it")
    _run_flags(f, "discard what OUT holds and start again")
    f.set_defaults(func=cmd_field)


def _run_flags(p, fresh_help: str) -> None:
    """--set, --no-progress, --fresh, --exact and --trust-model, as the commands that run CEMs take them."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fresh", action="store_true", help=fresh_help)
    p.add_argument("--exact", action="store_true", help="exact mode (locality off, fp32)")
    p.add_argument("--trust-model", action="store_true", help=TRUST_HELP)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    p = _OneLineParser(prog="cem-fast", description="Causal Effect Maps for image-restoration networks.")
    p.add_argument("--version", action="version", version=f"cem-fast {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", parser_class=_OneLineParser)
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
    r.add_argument("--trust-model", action="store_true", help=TRUST_HELP)
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("compare", help="run several models with the same draws and compare their maps")
    c.add_argument("config", help="YAML config with `models:` (two or more)")
    c.add_argument("--out", required=True, help="output folder")
    _run_flags(c, "ignore cached samples and recompute")
    c.set_defaults(func=cmd_compare)
    d = sub.add_parser("demo", help="run the offline demo and write a report")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--fine", type=int, default=20,
                   help="fine interventions per gated block (default 20 to keep the demo short; the paper uses 50)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)
    v = sub.add_parser("convergence", help="map error of each sampling plan against a high-sample truth")
    v.add_argument("config", help="YAML config (its first model, image and roi)")
    v.add_argument("--out", required=True, help="output folder (convergence.json, .md, .png)")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    v.add_argument("--truth", type=int, default=1000, help="draws per block of the truth (default 1000)")
    v.add_argument("--seeds", type=int, default=3, help="runs of each plan, seeds 0, 1, ... (default 3)")
    v.add_argument("--exact", action="store_true", help="exact mode (locality off, fp32)")
    v.add_argument("--trust-model", action="store_true", help=TRUST_HELP)
    v.set_defaults(func=cmd_convergence)
    st = sub.add_parser("study", help="models x images x ROIs: every map, its metrics, and the models compared")
    st.add_argument("config", help="YAML config with models, images and roi / rois / roi_grid")
    st.add_argument("--out", required=True, help="output folder (the maps, study.md/.csv/.json/.html, profiles.png)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    st.add_argument("--far-px", type=float, default=None,
                    help="far_mass_share counts the |CE| mass beyond this distance (output px; default: the ROI's "
                         "larger side)")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    st.add_argument("--fresh", action="store_true", help="ignore cached samples and recompute")
    st.add_argument("--exact", action="store_true", help="exact mode (locality off, fp32)")
    st.add_argument("--trust-model", action="store_true", help=TRUST_HELP)
    st.set_defaults(func=cmd_study)
    _add_field_parser(sub)
    i = sub.add_parser("info", help="versions, device, available backends and why others are not")
    i.set_defaults(func=cmd_info)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, ``cem-fast: warning: ...`` (Python's adds the file, line and source line)."""
    print(f"cem-fast: warning: {first_line(message)}", file=sys.stderr if file is None else file)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `cem-fast` alone: what it can do, not an error
        parser.print_help()
        return 0
    import warnings
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning  # restored below: main may run inside another program (tests)
    try:
        if args.command in ("run", "compare", "demo", "study", "field"):
            from .distributed import init_from_env
            init_from_env()  # under torchrun: join the group, each rank takes its share of every run
        return args.func(args)
    except KeyboardInterrupt:
        print("cem-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, never a traceback (``--debug`` shows it)
        if args.debug:
            raise
        msg = first_line(e)
        if not isinstance(e, (ValueError, RuntimeError, OSError)):
            msg = f"{type(e).__name__}: {msg} (an unexpected error: --debug shows where)"
        print(f"cem-fast: error: {msg}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) else EXIT_FAILED
    finally:
        warnings.showwarning = shown
        if "torch.distributed" in sys.modules:
            from .distributed import shutdown
            shutdown()


if __name__ == "__main__":
    sys.exit(main())
