"""Studies: the maps of many models x images x ROIs, their metrics (:mod:`cem_fast.metrics`) in one table, each
model's means over images with 95 % intervals, and the models compared on the same draws.

``cem_fast.study(models, images, rois=..., **options)`` runs every model on every image through
:func:`cem_fast.causal_effect_maps` with one seed, so every model sees the same interventions (patches and noise)
of every block, and returns a :class:`Study`; ``cem-fast study CONFIG --out DIR`` does the same from a YAML config
(through ``cem-fast run``'s runner: the maps under DIR/<model>/<image>, resumable from DIR/.cem_cache, sharded
under torchrun).

Intervals over images: a study's question is whether a finding holds across images, so each model's mean of a
metric (over its images and ROIs) gets a 95 % percentile bootstrap interval over images (the images resampled
with replacement, each image's ROIs kept together, ``BOOT_DRAWS`` draws, seeded); a study of one image has none.
A paired comparison of model b with model a takes, per image, the mean over its ROIs of (b's metric - a's metric),
both from the same draws; its mean over images gets the same bootstrap interval, and ``sign_agrees`` counts the
images whose difference has the sign of the mean (k of n: a difference that 2 images of 10 carry is no finding).
"""
from __future__ import annotations

import csv
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .fileio import atomic_write
from .jsonsafe import json_bytes
from .metrics import INTERVAL_METRICS, SCALAR_METRICS, flat_metrics
from .names import CACHE_DIR, safe_name, take_name, unique_names
from .result import roi_folder

BOOT_DRAWS = 2000
BOOT_SEED = 29
# the metrics a study summarises and compares, in this order (psnr_roi_db: Y(I), how well the model restores
# the ROI, for the question whether what a model draws on helps it)
STUDY_METRICS = ("psnr_roi_db",) + SCALAR_METRICS + INTERVAL_METRICS


@dataclass
class Study:
    """The maps of a study and their metrics.

    Attributes:
        rows: one dict per (model, image, ROI), in run order: ``model``, ``image``, ``roi`` ([y, x, height,
            width]), ``dir`` (the map's folder relative to the study's folder once saved), ``psnr_roi_db`` (Y(I):
            the ROI PSNR of the unintervened input, dB), every metric of
            :func:`cem_fast.metrics.flat_metrics` (``name``, ``name_low``, ``name_high`` for those with
            intervals) and ``profile`` (the distance profile of :meth:`CEMResult.metrics`).
        maps: (model, image) -> the CEMResults of its ROIs, in ROI order (None for a study read back from runs
            that are saved already).
        far_px: the distance of ``far_mass_share`` (None: each ROI's larger side).
        seed: the seed of the draws, shared by every map.
    """

    rows: list[dict[str, Any]]
    maps: dict = field(default_factory=dict)
    far_px: Optional[float] = None
    seed: int = 0
    models: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    @classmethod
    def from_maps(cls, maps: dict, dirs: Optional[dict] = None, far_px: Optional[float] = None,
                  seed: int = 0) -> "Study":
        """A study of ``maps`` ((model, image) -> sequence of CEMResult, one per ROI); ``dirs``: the same keys
        -> one folder per ROI, where the maps are saved already (relative to the study's folder)."""
        rows = []
        for (model, image), results in maps.items():
            for i, res in enumerate(results):
                m = res.metrics(far_px=far_px)
                psnr = float(res.psnr_origin)
                rows.append({"model": model, "image": image, "roi": list(res.roi.as_tuple()),
                             "dir": None if dirs is None else dirs[model, image][i],
                             "psnr_roi_db": psnr if np.isfinite(psnr) else None, **flat_metrics(m),
                             "profile": m["profile"]})
        models = list(dict.fromkeys(k[0] for k in maps))
        images = list(dict.fromkeys(k[1] for k in maps))
        return cls(rows=rows, maps=dict(maps), far_px=far_px, seed=seed, models=models, images=images)

    @classmethod
    def from_runs(cls, runs: list, far_px: Optional[float] = None, seed: int = 0) -> "Study":
        """A study of the CLI's runs: (model, image label, run folder, CEMResults, one folder per ROI?) each,
        as :func:`cem_fast.config_runs.run_config` keeps them with ``keep_all``."""
        maps, dirs = {}, {}
        for model, image, rel, results, per_roi in runs:
            maps[model, image] = list(results)
            dirs[model, image] = [f"{rel}/{roi_folder(i, r.roi)}" if per_roi else rel for i, r in enumerate(results)]
        return cls.from_maps(maps, dirs, far_px=far_px, seed=seed)

    # ---- numbers over images ----------------------------------------------------------------------------------

    def _per_image(self, model: str, key: str) -> dict[str, float]:
        """image -> mean of ``key`` over the model's ROIs on it (images where it is undefined left out)."""
        vals: dict[str, list] = {}
        for r in self.rows:
            if r["model"] == model and r[key] is not None:
                vals.setdefault(r["image"], []).append(float(r[key]))
        return {im: float(np.mean(v)) for im, v in vals.items()}

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """model -> metric -> ``mean`` over its images and ROIs (each image weighted by its ROIs' mean), ``low``,
        ``high`` (95 % bootstrap interval over images; None with one image) and ``images`` (with a value)."""
        out: dict = {}
        for model in self.models:
            out[model] = {k: _mean_interval(list(self._per_image(model, k).values())) for k in STUDY_METRICS}
        return out

    def mean_profiles(self) -> dict[str, dict[str, list]]:
        """model -> ``ring_px``, ``mean_abs_db`` / ``mean_db`` (the mean over images of each image's mean over
        its ROIs; rings past a map's reach count as 0) with ``_low`` / ``_high`` (95 % bootstrap over images)."""
        out = {}
        if not self.rows:
            return out
        rings = max(len(r["profile"]["ring_px"]) for r in self.rows)  # one range for every model
        step = self.rows[0]["profile"]["ring_width_px"]
        for model in self.models:
            rows = [r for r in self.rows if r["model"] == model]
            if not rows:
                continue
            entry: dict[str, list] = {"ring_px": [k * step for k in range(rings)]}
            for key in ("mean_abs_db", "mean_db"):
                per_image: dict[str, list] = {}
                for r in rows:
                    v = np.zeros(rings)
                    p = np.array([np.nan if x is None else x for x in r["profile"][key]], dtype=np.float64)
                    v[:p.size] = np.nan_to_num(p)
                    per_image.setdefault(r["image"], []).append(v)
                table = np.array([np.mean(v, axis=0) for v in per_image.values()])  # (images, rings)
                mean = table.mean(0)
                lo, hi = _boot_rows(table)
                entry[key], entry[f"{key}_low"], entry[f"{key}_high"] = mean.tolist(), lo, hi
            out[model] = entry
        return out

    def comparisons(self) -> list[dict[str, Any]]:
        """Each model against the first, on the same draws (one seed): per metric the mean over images of the
        per-image difference (b - a), its 95 % bootstrap interval over images, and in how many images the
        difference has the mean's sign (``sign_agrees`` of ``images``)."""
        if len(self.models) < 2:
            return []
        base = self.models[0]
        out = []
        for other in self.models[1:]:
            metrics = {}
            for key in STUDY_METRICS:
                a, b = self._paired(base, other, key)
                d = [b[k] - a[k] for k in a]
                entry = _mean_interval(d)
                sign = np.sign(entry["mean"]) if entry["mean"] is not None else 0
                entry["sign_agrees"] = int(sum(np.sign(x) == sign and sign != 0 for x in d))
                metrics[key] = entry
            out.append({"a": base, "b": other, "difference": "b - a", "seed": self.seed, "metrics": metrics})
        return out

    def _paired(self, a: str, b: str, key: str) -> tuple[dict, dict]:
        """Per image: the mean of ``key`` over the ROIs both models have a value for, for a and for b."""
        va = {(r["image"], tuple(r["roi"])): r[key] for r in self.rows if r["model"] == a and r[key] is not None}
        vb = {(r["image"], tuple(r["roi"])): r[key] for r in self.rows if r["model"] == b and r[key] is not None}
        both = [k for k in va if k in vb]
        out_a: dict[str, list] = {}
        out_b: dict[str, list] = {}
        for k in both:
            out_a.setdefault(k[0], []).append(va[k])
            out_b.setdefault(k[0], []).append(vb[k])
        return ({im: float(np.mean(v)) for im, v in out_a.items()}, {im: float(np.mean(v)) for im, v in out_b.items()})

    # ---- files ---------------------------------------------------------------------------------------------------

    def save(self, out_dir: "str | os.PathLike", maps: bool = True) -> Path:
        """Write study.csv (one line per map, no profiles), study.json (rows with profiles, the per-model summary,
        the mean profiles and the comparisons), study.md (the tables), profiles.png (each model's mean |CE| and
        mean CE per ring with their bands, overlaid) and study.html (the tables and a link to every map). With
        ``maps``, each map not saved yet is saved under ``maps/<model>/<image>/<roi folder>/`` (its figures,
        result.npz and summary.json). Call it on one process (rank 0 under torchrun)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if maps:
            self._save_maps(out)
        flat = [{k: (json.dumps(v) if k == "roi" else v) for k, v in r.items() if k != "profile"} for r in self.rows]
        buf = io.StringIO()
        if flat:
            writer = csv.DictWriter(buf, fieldnames=list(flat[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(flat)
        atomic_write(out / "study.csv", lambda f: f.write(buf.getvalue().encode()))
        summary, profiles, comps = self.summary(), self.mean_profiles(), self.comparisons()
        doc = {"models": self.models, "images": self.images, "seed": self.seed,
               "far_px": self.far_px if self.far_px is not None else "each ROI's larger side",
               "intervals": {"per map": "see each row's metrics: cem_fast.metrics (parametric bootstrap)",
                             "over images": f"95 % percentile bootstrap over images ({BOOT_DRAWS} draws)"},
               "summary": summary, "mean_profiles": profiles, "comparisons": comps, "rows": self.rows}
        atomic_write(out / "study.json", lambda f: f.write(json_bytes(doc)))
        atomic_write(out / "study.md", lambda f: f.write(self.markdown(summary, comps).encode()))
        self._plot_profiles(out / "profiles.png", profiles)
        atomic_write(out / "study.html", lambda f: f.write(self._html(summary, comps).encode()))
        return out

    def _save_maps(self, out: Path) -> None:
        folders = dict(zip(self.images, unique_names([safe_name(Path(i).stem, "image") for i in self.images])))
        model_dirs = dict(zip(self.models, unique_names([safe_name(m, "model") for m in self.models])))
        index = {}
        for (model, image), results in self.maps.items():
            for i, res in enumerate(results):
                index[model, image, tuple(res.roi.as_tuple())] = (i, res)
        for r in self.rows:
            if r["dir"] is not None:
                continue
            i, res = index[r["model"], r["image"], tuple(r["roi"])]
            rel = f"maps/{model_dirs[r['model']]}/{folders[r['image']]}/{roi_folder(i, res.roi)}"
            res.save(out / rel)
            r["dir"] = rel

    def markdown(self, summary: Optional[dict] = None, comps: Optional[list] = None) -> str:
        """study.md: per model, each metric's mean over images and ROIs with its 95 % interval; then each
        comparison."""
        summary = self.summary() if summary is None else summary
        comps = self.comparisons() if comps is None else comps
        n_rois = len({tuple(r["roi"]) for r in self.rows})
        lines = [f"# Study: {len(self.models)} models x {len(self.images)} images x {n_rois} ROIs",
                 "", f"Images: {', '.join(self.images)}. Seed {self.seed} (every model on the same draws). "
                 f"far_px: {self.far_px if self.far_px is not None else 'the ROI size'}.", "",
                 "Each cell: the mean over images (each image the mean over its ROIs) and, in brackets, its 95 % "
                 "bootstrap interval over images (none with one image). psnr_roi_db: the ROI's PSNR on the "
                 "unintervened input (Y(I)). Shares: of the blocks outside the ROI; "
                 "masses in dB; radii in output px (the distance from the ROI within which 50 % / 90 % of the |CE| "
                 "mass lies).", "", "| metric | " + " | ".join(self.models) + " |",
                 "|---|" + "---|" * len(self.models)]
        for k in STUDY_METRICS:
            lines.append(f"| {k} | " + " | ".join(_cell(summary[m][k]) for m in self.models) + " |")
        for c in comps:
            lines += ["", f"## {c['b']} - {c['a']} (paired: same draws)", "",
                      "| metric | mean difference [95 %] | images where the sign agrees |", "|---|---|---|"]
            for k, e in c["metrics"].items():
                lines.append(f"| {k} | {_cell(e, signed=True)} | {e['sign_agrees']} of {e['images']} |")
        return "\n".join(lines) + "\n"

    def _plot_profiles(self, path: Path, profiles: dict) -> None:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from .plotting import save_figure
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for i, (model, p) in enumerate(profiles.items()):
            colour = f"C{i}"
            x = np.array(p["ring_px"], dtype=np.float64)
            for ax, key in zip(axes, ("mean_abs_db", "mean_db")):
                ax.plot(x, p[key], "-o", ms=3, color=colour, label=model)
                lo, hi = p[f"{key}_low"], p[f"{key}_high"]
                if lo is not None:
                    ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
        for ax, what in zip(axes, ("mean |CE| per ring (dB)", "mean CE per ring (dB)")):
            ax.set_xlabel("block-centre distance from the ROI (output px; ring's inner edge)")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        axes[1].axhline(0, color="k", lw=0.6)
        axes[0].legend(fontsize=8)
        fig.suptitle("distance profiles: mean over images, 95 % bootstrap band over images", fontsize=10)
        fig.tight_layout()
        save_figure(fig, path, dpi=110)

    def _html(self, summary: dict, comps: list) -> str:
        e = html.escape
        head = "".join(f"<th>{e(m)}</th>" for m in self.models)
        body = "".join(f"<tr><td>{e(k)}</td>" + "".join(f"<td>{e(_cell(summary[m][k]))}</td>" for m in self.models)
                       + "</tr>" for k in STUDY_METRICS)
        comp = ""
        for c in comps:
            comp += (f"<h2>{e(c['b'])} &minus; {e(c['a'])} (same draws)</h2><table><tr><th>metric</th>"
                     "<th>mean difference [95 %]</th><th>sign agrees</th></tr>"
                     + "".join(f"<tr><td>{e(k)}</td><td>{e(_cell(v, signed=True))}</td>"
                               f"<td>{v['sign_agrees']} of {v['images']}</td></tr>" for k, v in c["metrics"].items())
                     + "</table>")
        cols = ("positive_share", "negative_share", "undecided_share", "radius50_px", "radius90_px", "far_mass_share")
        maps = "".join(
            f"<tr><td>{e(r['model'])}</td><td>{e(r['image'])}</td><td>{e(', '.join(map(str, r['roi'])))}</td>"
            + "".join(f"<td>{e(_row_cell(r, k))}</td>" for k in cols)
            + (f'<td><a href="{e(r["dir"])}/cem.png">map</a> · <a href="{e(r["dir"])}/summary.json">summary</a>'
               f' · <a href="{e(r["dir"])}/report.html">report</a></td>' if r["dir"] else "<td></td>") + "</tr>"
            for r in self.rows)
        return (f"<!doctype html><html><head><meta charset=utf-8><title>Study</title><style>body{{font:14px "
                f"sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;"
                f"padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>"
                f"<h1>Study: {len(self.models)} models x {len(self.images)} images</h1>"
                f"<p>Mean over images with its 95 % bootstrap interval over images. "
                f'<a href="study.md">study.md</a> · <a href="study.csv">study.csv</a> · '
                f'<a href="study.json">study.json</a></p><img src="profiles.png" alt="distance profiles" '
                f'style="max-width:100%"><table><tr><th>metric</th>{head}</tr>{body}</table>{comp}'
                f"<h2>Every map</h2><table><tr><th>model</th><th>image</th><th>ROI (y, x, h, w)</th>"
                + "".join(f"<th>{e(k)}</th>" for k in cols) + f"<th></th></tr>{maps}</table></body></html>")


def _row_cell(r: dict, k: str) -> str:
    v = r[k]
    if v is None:
        return "-"
    if f"{k}_low" in r and r[f"{k}_low"] is not None:
        return f"{v:.3g} [{r[f'{k}_low']:.3g}, {r[f'{k}_high']:.3g}]"
    return f"{v:.3g}"


def _cell(e: dict, signed: bool = False) -> str:
    if e["mean"] is None:
        return "-"
    f = "{:+.3g}" if signed else "{:.3g}"
    ci = f" [{f.format(e['low'])}, {f.format(e['high'])}]" if e["low"] is not None else ""
    return f.format(e["mean"]) + ci


def _boot_rows(table: np.ndarray) -> tuple[Optional[list], Optional[list]]:
    """95 % percentile bootstrap interval of the mean over the rows (images) of ``table`` (n, ...)."""
    n = len(table)
    if n < 2:
        return None, None
    gen = np.random.default_rng(BOOT_SEED)
    idx = gen.integers(0, n, size=(BOOT_DRAWS, n))
    means = table[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5], axis=0)
    return np.atleast_1d(lo).tolist(), np.atleast_1d(hi).tolist()


def _mean_interval(values: list) -> dict[str, Any]:
    v = np.array(values, dtype=np.float64)
    if not v.size:
        return {"mean": None, "low": None, "high": None, "images": 0}
    lo, hi = _boot_rows(v[:, None])
    return {"mean": float(v.mean()), "low": None if lo is None else lo[0], "high": None if hi is None else hi[0],
            "images": int(v.size)}


def study(models: Union[Sequence, dict], images: Sequence, rois=None, roi_grid: Optional[int] = None, *,
          names: Optional[Sequence[str]] = None, image_names: Optional[Sequence[str]] = None,
          far_px: Optional[float] = None, out: Union[None, str, os.PathLike] = None, seed: int = 0,
          **options: Any) -> Study:
    """Causal Effect Maps of every model on every image for every ROI, with one seed, and their metrics.

    Args:
        models: nn.Modules or model specs, or a dict name -> model.
        images: paths, arrays or tensors (the clean ground truth, as :func:`cem_fast.causal_effect_maps`).
        rois, roi_grid: the ROIs of every image, as :func:`cem_fast.causal_effect_maps` (one ROI: ``rois=[roi]``).
        names: the models' names (default: the dict's keys, else each model's class or spec name, made unique);
            image_names: the images' (default: the file names, ``array_2`` ...).
        far_px: the distance of each map's ``far_mass_share`` (default: its ROI's larger side).
        out: a folder: the samples are cached in ``out/.cem_cache`` (a re-run resumes from it; unless ``cache=``
            names another) and the study is saved there (:meth:`Study.save`, on rank 0 under a process group).
        seed: the draws' seed, shared by every map (so that the models are compared on the same draws).
        **options: those of :func:`cem_fast.causal_effect_maps` (task, sigma, block, coarse, fine, patches,
            locality, ...).

    Under ``torchrun`` (an initialised process group) every map is sharded across the ranks as in
    :func:`cem_fast.causal_effect_maps`, and every rank returns the whole study.

    Example:
        >>> s = cem_fast.study({"shallow": net_a, "deep": net_b}, ["a.png", "b.png"], rois=[(40, 40, 16)],
        ...                    task="DN", sigma=25, out="study_out")
        >>> s.rows[0]["radius90_px"], s.comparisons()[0]["metrics"]["radius90_px"]
    """
    from .distributed import is_lead
    from .estimator import causal_effect_maps
    if rois is None and roi_grid is None:
        raise ValueError("study needs rois=[(y, x, size), ...] or roi_grid=size")
    if "model_name" in options or "image_name" in options:
        raise ValueError("study takes names=[...] and image_names=[...], got model_name / image_name")
    if isinstance(models, dict):
        names = list(models) if names is None else names
        models = list(models.values())
    models, images = list(models), list(images)
    if not models or not images:
        raise ValueError(f"study needs at least one model and one image, got {len(models)} and {len(images)}")
    for what, given, want in (("names", names, len(models)), ("image_names", image_names, len(images))):
        if given is not None and len(given) != want:
            raise ValueError(f"{what} must give one name per entry ({want}), got {len(given)}")
    if image_names is None:
        image_names = [Path(str(i)).name if isinstance(i, (str, os.PathLike)) else "array" for i in images]
    image_names = unique_names([str(n) for n in image_names])
    if out is not None and "cache" not in options:
        options["cache"] = Path(out) / CACHE_DIR
    options.setdefault("progress", False)
    if not isinstance(rois, (list, tuple)) or (rois and isinstance(rois[0], int)):
        rois = None if rois is None else [rois]  # one ROI given as (y, x, size)
    maps: dict = {}
    model_names: list[str] = []
    taken: set = set()
    for i, model in enumerate(models):
        name = None if names is None else str(names[i])
        for image, label in zip(images, image_names):
            results = causal_effect_maps(model, image, rois=rois, roi_grid=roi_grid, seed=seed, model_name=name,
                                         image_name=label, **options)
            if name is None:
                name = results[0].model_name
            if len(model_names) == i:
                model_names.append(take_name(name, taken))
            for r in results:
                r.model_name = model_names[i]
            maps[model_names[i], label] = list(results)
    s = Study.from_maps(maps, far_px=far_px, seed=seed)
    if out is not None and is_lead():
        s.save(out)
    return s
