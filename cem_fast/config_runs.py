"""The runs of a config: every model on every image, each run's outputs in OUT/<model>/<image>, and the report.

``cem-fast run``, ``compare``, ``demo`` and ``study`` all run a config through :func:`run_config`. One run failing
(a model that does not load, a missing image, a full disk) does not stop the others: its folder holds an
error.json instead of results, and stderr says why in one line. A run's outputs are written into a staging
folder beside its own and moved in once all are written, so that an interrupted run leaves the earlier results
as they were. Under torchrun every rank computes its share of each run and rank 0 alone writes and speaks.

Start-up stays light: torch, numpy and the pipeline are imported inside the functions that run something.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

from .checks import first_line
from .names import CACHE_DIR, safe_name, take_name, unique_names

# the temporaries atomic_write leaves when killed, for the files a run writes (and never anyone else's)
OUR_TEMPORARY = re.compile(r"^\.(result\.npz|summary\.json|rois\.json|error\.json|meta\.json|report\.html|"
                           r"compare\.html|study\.(csv|json|md|html)|diff\.(npz|json|png)|[a-z_]+\.png|[^/]+_cem\.png|"
                           r"\d{9}-\d{6}\.npz)\.tmp\d+$")
RESULT_FILES = ("result.npz", "summary.json", "rois.json", "report.html", "maps.png", "cem.png", "overlay.png",
                "pie.png", "gt.png", "input.png", "output.png")


# a run's outputs are written into .<folder>.staging<pid> beside its folder, then moved in (see _staged)
OUR_STAGING = re.compile(r"^\.[^/]+\.staging(\d+)$")


def image_labels(images: list[str]) -> tuple[list[str], list[str]]:
    """(folder name, label) of each image: ``A/img.png`` and ``B/img.png``, or ``a b.png`` and ``a_b.png``, get
    folders of their own (``img``, ``img_2``) and labels that tell them apart (the path where names repeat)."""
    folders = unique_names([safe_name(Path(i).stem, "image") for i in images])
    names = [Path(i).name for i in images]
    labels = [n if names.count(n) == 1 else str(i) for n, i in zip(names, images)]
    return folders, labels


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
        report = runs_report(out_dir, entries, title, completed) if distributed.is_lead() else out_dir / "report.html"
    return report, failed


def runs_report(out_dir: Path, entries: list, title: str, completed: bool = True) -> Optional[Path]:
    """report.html of ``entries``, or None when no run succeeded: a page of error lines only says what stderr and
    each run's error.json say. Then an earlier run's report.html is removed (it would show results that the failed
    runs removed), unless the runs were interrupted."""
    from .report import write_report
    if any("error" not in e for e in entries):
        return write_report(out_dir, entries, title=title)
    if completed:
        (out_dir / "report.html").unlink(missing_ok=True)
    return None


def _spec_name(spec: str) -> str:
    """A folder name for a model that failed to load (a loaded model is named by :func:`load_model`)."""
    is_path = bool(Path(spec).suffix) or "/" in spec
    return safe_name(Path(spec).stem if is_path else spec.rsplit(":", 1)[-1], "model")


def _run_model(cfg, spec, taken, folders, labels, out_dir, progress, fresh, keep, entries, keep_all=None) -> int:
    """Every image of ``cfg`` on the model of ``spec``; returns the number of failed runs (every image when the
    model does not load)."""
    from dataclasses import replace

    from .options import split_options
    run, task_opts, rest = split_options(cfg.options)
    run = replace(run, progress=progress, cache=out_dir / CACHE_DIR, fresh=fresh)
    loaded = _load_for_runs(cfg, spec, taken, folders, labels, out_dir, run, task_opts, rest, entries)
    if loaded is None:
        return len(cfg.images)
    model, name = loaded
    failed = 0
    for image, folder, label in zip(cfg.images, folders, labels):
        entry = _run_image(cfg, model, spec, name, image, folder, label, out_dir, run, task_opts, rest, entries)
        if entry is None:
            failed += 1
            continue
        result = entry.pop("_result")  # _run_one cleared the folder's earlier outputs, error.json included
        results = entry.pop("_results")
        entries.append(entry)
        if keep is not None:
            keep.append((name, label, folder, result))
        if keep_all is not None:
            keep_all.append((name, label, entry["dir"], results, cfg.multi_roi))
    return failed


def _load_for_runs(cfg, spec, taken, folders, labels, out_dir, run, task_opts, rest, entries):
    """(model with the config's model options, its folder name), or None when it does not load: then every image
    of this model gets its error entry and error.json (the other models still run)."""
    from .distributed import GroupLost, agreed_step, is_lead
    from .models import apply_model_options, load_model
    name = None
    try:
        with agreed_step("load model"):  # a model that does not load on one rank fails on all
            model, loaded_name = load_model(spec, scale=task_opts.scale, trust_model_code=run.trust_model_code,
                                            module_dirs=cfg.module_dirs)
            name = take_name(safe_name(loaded_name, "model"), taken)
            scale = task_opts.scale if str(rest["task"]).upper() == "SR" else 1
            return apply_model_options(model, rest.get("model_options"), scale), name
    except GroupLost:
        raise  # a rank of the study is gone: no further run can go on
    except (Exception, SystemExit) as e:  # every image of this model gets its row; the other models run
        name = name or take_name(_spec_name(spec), taken)
        msg = first_line(e)
        lead = is_lead()  # under torchrun, rank 0 alone writes and speaks
        for folder, label in zip(folders, labels):
            if lead:
                _mark_failed(out_dir / name / folder, msg)
            entries.append({"model": name, "image": label, "dir": f"{name}/{folder}", "error": msg})
        if lead:
            print(f"cem-fast: error: {msg if msg.startswith('model') else f'model {name}: {msg}'}", file=sys.stderr)
        return None


def _run_image(cfg, model, spec, name, image, folder, label, out_dir, run, task_opts, rest,
               entries) -> Optional[dict]:
    """One run, with its failure recorded: the report entry of :func:`_run_one`, or None when it failed (its
    error entry appended to ``entries``, its folder marked failed)."""
    from .distributed import GroupLost, agreed_step, is_lead
    rel, lead = f"{name}/{folder}", is_lead()
    if lead:
        print(f"[cem-fast] {name} on {label} ...", file=sys.stderr, flush=True)
    try:
        with agreed_step("run"):  # one rank failing (a missing image file) fails the run on all
            return _run_one(cfg, model, spec, name, image, label, out_dir, rel, run, task_opts, rest)
    except GroupLost:
        raise
    except (Exception, SystemExit) as e:  # SystemExit: a model's own sys.exit / argparse ends this run only
        msg = first_line(e)
        entries.append({"model": name, "image": label, "dir": rel, "error": msg})
        if lead:
            print(f"cem-fast: error: {name} on {label}: {msg}", file=sys.stderr)
            _mark_failed(out_dir / rel, msg)
        return None


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
    _say_notes(res, label)
    extra = {"config": _json_safe(cfg.raw), "model_spec": spec, "image_path": str(image)}
    origin = factory_module_origin(spec, cfg.module_dirs)  # pkg.module:factory: which file, found where
    if origin:
        extra.update(model_module_path=origin["path"], model_module_found_in=origin["found_in"])
    entry = {"model": name, "image": label, "dir": rel}
    if cfg.multi_roi:
        entry["rois"] = _save_rois(results, extra, out_dir, rel, rest["plot_scale"])
    else:
        entry["summary"] = _save_one(res, extra, out_dir, rel, rest["plot_scale"])
    return {**entry, "_result": res, "_results": results}


def _say_notes(res, label: str) -> None:
    """What the run changed on its own (a crop to the scale, dropped cache chunks, eval mode), on stderr."""
    if "cropped_from" in res.extra:
        h, w = res.extra["cropped_from"]
        print(f"[cem-fast]   note: {label} ({h}x{w}) was cropped to {res.gt.shape[-2]}x"
              f"{res.gt.shape[-1]}, a multiple of the scale", file=sys.stderr)
    for note in res.extra.get("cache_dropped_chunks", []):
        print(f"[cem-fast]   note: cached chunk {note}; recomputed", file=sys.stderr)
    if "switched_to_eval" in res.extra:
        print(f"[cem-fast]   note: {res.extra['switched_to_eval']['submodules_in_training']} submodule(s) of the "
              "model were in training mode: run in eval mode, their modes restored after", file=sys.stderr)


def _save_rois(results, extra: dict, out_dir: Path, rel: str, plot_scale) -> dict:
    """Save the maps of several ROIs in ``out_dir / rel`` and say so; returns the report entry's ``rois``."""
    res = results[0]
    for r in results:
        r.extra.update(extra)
    with _staged(out_dir / rel) as staging:  # the earlier results stay until these are all written
        results.save(staging, scale=plot_scale)
    shared = "rois_in_pass" in res.extra  # one pass for all; else one run per ROI (the cheaper plan)
    forwards = res.num_forwards if shared else sum(r.num_forwards for r in results)
    wall = res.wall_time if shared else sum(r.wall_time for r in results)
    how = "" if shared else " (one run per ROI: fewer input pixels)"
    loc = _locality_note(res.extra.get("locality", {}))
    print(f"[cem-fast]   {len(results)} ROIs from {forwards} forwards{how}{_reused(res)}{loc}, "
          f"{wall:.1f} s -> {out_dir / rel}", file=sys.stderr, flush=True)
    return _json_safe(results.summary())


def _save_one(res, extra: dict, out_dir: Path, rel: str, plot_scale) -> dict:
    """Save the map of one ROI in ``out_dir / rel`` and say what it shows; returns the report entry's ``summary``
    (as in summary.json)."""
    colours = res.colour_scale(plot_scale)
    with _staged(out_dir / rel) as staging:
        res.save(staging, summary_extra=extra, scale=colours)
    st = res.stats()
    loc = _locality_note(res.extra.get("locality", {}))
    print(f"[cem-fast]   Y(I) {res.psnr_origin:.2f} dB, {st['positive']} help, {st['negative']} hurt, "
          f"{st['zero']} no effect, range {st.get('range_db', 0):.3f} dB, {res.num_forwards} forwards"
          f"{_reused(res)}{loc}, {res.wall_time:.1f} s -> {out_dir / rel}", file=sys.stderr, flush=True)
    return _json_safe({**res.summary(), **extra, "display_scale": colours.as_dict()})


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


def _json_safe(obj):
    from .jsonsafe import json_safe as safe  # numpy: imported when needed, not at start-up
    return safe(obj)
