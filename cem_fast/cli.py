"""``cem-fast``: run CEMs from a YAML config, run the offline demo, or show what is available.

    cem-fast run CONFIG.yml --out DIR [--set key=value ...] [--exact] [--fresh]
    cem-fast demo [--out DIR]
    cem-fast convergence CONFIG.yml --out DIR [--truth 1000] [--seeds 3]
    cem-fast study CONFIG.yml --out DIR [--far-px PX]
    cem-fast info

Errors are one line on stderr and a non-zero exit (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from .checks import first_line
from .names import CACHE_DIR, safe_name as _safe_name, take_name as _take, unique_names  # noqa: F401

EXIT_USAGE = 2
EXIT_FAILED = 1


def image_labels(images: list[str]) -> tuple[list[str], list[str]]:
    """(folder name, label) of each image: ``A/img.png`` and ``B/img.png``, or ``a b.png`` and ``a_b.png``, get
    folders of their own (``img``, ``img_2``) and labels that tell them apart (the path where names repeat)."""
    folders = unique_names([_safe_name(Path(i).stem, "image") for i in images])
    names = [Path(i).name for i in images]
    labels = [n if names.count(n) == 1 else str(i) for n, i in zip(names, images)]
    return folders, labels


# the temporaries atomic_write leaves when killed, for the files a run writes (and never anyone else's)
OUR_TEMPORARY = re.compile(r"^\.(result\.npz|summary\.json|rois\.json|error\.json|meta\.json|report\.html|"
                           r"compare\.html|study\.(csv|json|md|html)|diff\.(npz|json|png)|[a-z_]+\.png|[^/]+_cem\.png|"
                           r"\d{9}-\d{6}\.npz)\.tmp\d+$")
RESULT_FILES = ("result.npz", "summary.json", "rois.json", "report.html", "maps.png", "cem.png", "overlay.png",
                "pie.png", "gt.png", "input.png", "output.png")


# a run's outputs are written into .<folder>.staging<pid> beside its folder, then moved in (see _staged)
OUR_STAGING = re.compile(r"^\.[^/]+\.staging(\d+)$")


def _clear_outputs(run_dir: Path, keep: frozenset = frozenset()) -> None:
    """Remove what a run writes into its folder (and nothing else), but the names in ``keep``."""
    if run_dir.is_dir():
        for f in RESULT_FILES + ("error.json",):
            if f not in keep:
                (run_dir / f).unlink(missing_ok=True)
        for d in run_dir.glob("roi_*"):
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _staged(run_dir: Path):
    """A folder beside ``run_dir`` to write a run's outputs into. Once every one is written they replace the earlier
    run's (renames only), and what the earlier run wrote that this one does not (rois.json after a single ROI) is
    removed; an error or an interrupt on the way removes the staging folder and leaves ``run_dir`` as it was."""
    staging = run_dir.with_name(f".{run_dir.name}.staging{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    run_dir.mkdir(parents=True, exist_ok=True)
    written = sorted(staging.iterdir())
    for p in written:
        target = run_dir / p.name
        if p.is_dir() and target.is_dir():
            shutil.rmtree(target)  # the same ROI's folder of the earlier run: os.replace cannot replace a folder
        os.replace(p, target)
    staging.rmdir()
    _clear_outputs(run_dir, keep=frozenset(p.name for p in written))


def _mark_failed(run_dir: Path, message: str) -> None:
    """A failed run leaves no earlier result behind in its folder (it would pass for this run's), and an
    error.json saying what happened."""
    from .fileio import atomic_write
    _clear_outputs(run_dir)
    try:
        atomic_write(run_dir / "error.json", lambda f: f.write(json.dumps({"error": message}).encode()))
    except OSError:
        pass  # a full disk: the report and the exit code still say it failed


def run_config(cfg, out_dir: Path, progress: Optional[bool], title: str = "Causal Effect Maps",
               fresh: bool = False, keep: Optional[list] = None,
               entries: Optional[list] = None, keep_all: Optional[list] = None) -> tuple[Path, int]:
    """Run every model on every image of ``cfg``; returns the report path and the number of failed runs. One run
    failing (a model that does not load, any error, a full disk) does not stop the others; the report is always
    written. With ``keep``, (model name, image label, image folder, CEMResult) of each successful run are appended
    to it; with ``keep_all``, (model name, image label, run folder relative to ``out_dir``, CEMResults of every ROI,
    whether each ROI has a folder of its own)
    to it. Under a process group (torchrun) every rank computes its share of each run and rank 0 alone writes."""
    from . import distributed
    from .fileio import clean_stale_folders, clean_stale_temporaries

    if not str(out_dir).strip():
        raise ValueError("--out must name a folder, got ''")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file, expected a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    # ours only, left by a killed run or a full disk; by rank 0 before any rank writes
    distributed.rank0_first(lambda first: first and (clean_stale_temporaries(out_dir, OUR_TEMPORARY),
                                                     clean_stale_folders(out_dir, OUR_STAGING)), "clean")
    entries = [] if entries is None else entries
    folders, labels = image_labels(cfg.images)
    failed = 0
    taken: set[str] = set()  # model folder names: two models never share one
    completed = False
    try:
        for spec in cfg.models:
            failed += _run_model(cfg, spec, taken, folders, labels, out_dir, progress, fresh, keep, entries,
                                 keep_all)
        completed = True
    finally:
        report = _report(out_dir, entries, title, completed) if distributed.is_lead() else out_dir / "report.html"
    return report, failed


def _report(out_dir: Path, entries: list, title: str, completed: bool = True) -> Optional[Path]:
    """report.html of ``entries``, or None when no run succeeded: a page of error lines only says what stderr and
    each run's error.json say. Then an earlier run's report.html is removed (it would show results that the failed
    runs removed), unless the runs were interrupted."""
    from .report import write_report
    if any("error" not in e for e in entries):
        return write_report(out_dir, entries, title=title)
    if completed:
        (out_dir / "report.html").unlink(missing_ok=True)
    return None


def _say_report(report: Optional[Path]) -> None:
    """Where the report is; nothing when every run failed (their errors, one line each, said it all)."""
    if report is not None:
        print(f"report: {report}")


def _spec_name(spec: str) -> str:
    """A folder name for a model that failed to load (a loaded model is named by :func:`load_model`)."""
    is_path = bool(Path(spec).suffix) or "/" in spec
    return _safe_name(Path(spec).stem if is_path else spec.rsplit(":", 1)[-1], "model")


def _run_model(cfg, spec, taken, folders, labels, out_dir, progress, fresh, keep, entries, keep_all=None) -> int:
    from dataclasses import replace

    from .distributed import GroupLost, agreed_step, is_lead
    from .models import apply_model_options, load_model
    from .options import split_options
    run, task_opts, rest = split_options(cfg.options)
    run = replace(run, progress=progress, cache=out_dir / CACHE_DIR, fresh=fresh)
    name, lead = None, is_lead()  # under torchrun, rank 0 alone writes and speaks
    try:
        with agreed_step("load model"):  # a model that does not load on one rank fails on all
            model, loaded_name = load_model(spec, scale=task_opts.scale, trust_model_code=run.trust_model_code,
                                            module_dirs=cfg.module_dirs)
            name = _take(_safe_name(loaded_name, "model"), taken)
            scale = task_opts.scale if str(rest["task"]).upper() == "SR" else 1
            model = apply_model_options(model, rest.get("model_options"), scale)
    except GroupLost:
        raise  # a rank of the study is gone: no further run can go on
    except (Exception, SystemExit) as e:  # every image of this model gets its row; the other models run
        name = name or _take(_spec_name(spec), taken)
        msg = first_line(e)
        for image, folder, label in zip(cfg.images, folders, labels):
            if lead:
                _mark_failed(out_dir / name / folder, msg)
            entries.append({"model": name, "image": label, "dir": f"{name}/{folder}", "error": msg})
        if lead:
            print(f"cem-fast: error: {msg if msg.startswith('model') else f'model {name}: {msg}'}", file=sys.stderr)
        return len(cfg.images)
    failed = 0
    for image, folder, label in zip(cfg.images, folders, labels):
        rel = f"{name}/{folder}"
        if lead:
            print(f"[cem-fast] {name} on {label} ...", file=sys.stderr, flush=True)
        try:
            with agreed_step("run"):  # one rank failing (a missing image file) fails the run on all
                entry = _run_one(cfg, model, spec, name, image, label, out_dir, rel, run, task_opts, rest)
        except GroupLost:
            raise
        except (Exception, SystemExit) as e:  # SystemExit: a model's own sys.exit / argparse ends this run only
            failed += 1
            msg = first_line(e)
            entries.append({"model": name, "image": label, "dir": rel, "error": msg})
            if lead:
                print(f"cem-fast: error: {name} on {label}: {msg}", file=sys.stderr)
                _mark_failed(out_dir / rel, msg)
            continue
        result = entry.pop("_result")  # _run_one cleared the folder's earlier outputs, error.json included
        results = entry.pop("_results")
        entries.append(entry)
        if keep is not None:
            keep.append((name, label, folder, result))
        if keep_all is not None:
            keep_all.append((name, label, rel, results, cfg.multi_roi))
    return failed


def _run_one(cfg, model, spec, name, image, label, out_dir, rel, run, task_opts, rest) -> dict:
    """One model on one image: compute, save, and the report entry (with the result under ``_result``)."""
    from .distributed import is_lead
    from .models import factory_module_origin
    from .pipeline.run import run_cem
    source = _load_cropped(image, rest["crop"], run.max_pixels) if rest.get("crop") else image
    results = run_cem(model, source, rest["task"], None if cfg.roi_grid else cfg.rois, cfg.roi_grid,
                      rest["patches"], run, task_opts, model_name=name, image_name=Path(image).name)
    res = results[0]
    if not is_lead():  # another rank of a torchrun study: it computed its share, rank 0 writes
        return {"model": name, "image": label, "dir": rel, "_result": res, "_results": results}
    if "cropped_from" in res.extra:
        h, w = res.extra["cropped_from"]
        print(f"[cem-fast]   note: {label} ({h}x{w}) was cropped to {res.gt.shape[-2]}x"
              f"{res.gt.shape[-1]}, a multiple of the scale", file=sys.stderr)
    for note in res.extra.get("cache_dropped_chunks", []):
        print(f"[cem-fast]   note: cached chunk {note}; recomputed", file=sys.stderr)
    if "switched_to_eval" in res.extra:
        print(f"[cem-fast]   note: {res.extra['switched_to_eval']['submodules_in_training']} submodule(s) of the "
              "model were in training mode: run in eval mode, their modes restored after", file=sys.stderr)
    extra = {"config": json_safe(cfg.raw), "model_spec": spec, "image_path": str(image)}
    origin = factory_module_origin(spec, cfg.module_dirs)  # pkg.module:factory: which file, found where
    if origin:
        extra.update(model_module_path=origin["path"], model_module_found_in=origin["found_in"])
    loc = _locality_note(res.extra.get("locality", {}))
    if cfg.multi_roi:
        for r in results:
            r.extra.update(extra)
        with _staged(out_dir / rel) as staging:  # the earlier results stay until these are all written
            results.save(staging, scale=rest["plot_scale"])
        shared = "rois_in_pass" in res.extra  # one pass for all; else one run per ROI (the cheaper plan)
        forwards = res.num_forwards if shared else sum(r.num_forwards for r in results)
        wall = res.wall_time if shared else sum(r.wall_time for r in results)
        how = "" if shared else " (one run per ROI: fewer input pixels)"
        print(f"[cem-fast]   {len(results)} ROIs from {forwards} forwards{how}{_reused(res)}{loc}, "
              f"{wall:.1f} s -> {out_dir / rel}", file=sys.stderr, flush=True)
        return {"model": name, "image": label, "dir": rel, "rois": json_safe(results.summary()), "_result": res,
                "_results": results}
    colours = res.colour_scale(rest["plot_scale"])
    with _staged(out_dir / rel) as staging:
        res.save(staging, summary_extra=extra, scale=colours)
    st = res.stats()
    print(f"[cem-fast]   Y(I) {res.psnr_origin:.2f} dB, {st['positive']} help, {st['negative']} hurt, "
          f"{st['zero']} no effect, range {st.get('range_db', 0):.3f} dB, {res.num_forwards} forwards"
          f"{_reused(res)}{loc}, {res.wall_time:.1f} s -> {out_dir / rel}", file=sys.stderr, flush=True)
    summary = json_safe({**res.summary(), **extra, "display_scale": colours.as_dict()})  # as in summary.json
    return {"model": name, "image": label, "dir": rel, "summary": summary, "_result": res, "_results": results}


def _load_cropped(image: str, box, max_pixels):
    """The ``crop`` box of an image, read the way the estimator reads images (orientation, 16-bit, pixel limit)."""
    from .images import load_image
    full, _ = load_image(image, max_pixels)
    h, w = full.shape[-2:]
    if box[2] > w or box[3] > h:
        raise ValueError(f"crop {list(box)} must lie inside the {w}x{h} image {Path(image).name}")
    return full[:, box[1]:box[3], box[0]:box[2]].contiguous()


def _locality_note(info: dict) -> str:
    """How locality changed the run, for the progress line."""
    if not info.get("active"):
        return f" (whole image: {info['reason']})" if info.get("mode") == "auto" and info.get("reason") else ""
    crop = info.get("crop")
    what = [f"{info['skipped_blocks']} blocks skipped"] + ([f"crop {crop[2]}x{crop[3]} input px"] if crop else [])
    if (info.get("incremental") or {}).get("used"):
        what.append("recomputed layer by layer")
    elif (info.get("windows") or {}).get("used"):
        what.append("each intervention on its own window")
    return f" (locality: {', '.join(what)}, verified)"


def _reused(res) -> str:
    n = res.extra.get("reused_from_cache", 0)
    return f" (+{n} samples from the cache)" if n else ""


def json_safe(obj):
    from .jsonsafe import json_safe as safe  # numpy: imported when needed, not at start-up
    return safe(obj)


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


def _lead() -> bool:
    from .distributed import is_lead
    return is_lead()


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
    from .plotting import cem_figure, colour_scale, save_figure
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
        report = _report(out, entries, "cem_fast demo: the shipped denoiser, x4 SR and deraining models")
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
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--fresh", action="store_true", help="ignore cached samples and recompute")
    c.add_argument("--exact", action="store_true", help="exact mode (locality off, fp32)")
    c.add_argument("--trust-model", action="store_true", help=TRUST_HELP)
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
        if args.command in ("run", "compare", "demo", "study"):
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
