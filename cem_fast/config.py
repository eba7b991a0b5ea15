"""Run configurations: YAML files with the reference's keys or ours, plus ``--set key=value`` overrides.

Reference keys (mapped): task (SR|DN|DR), sr (scale), TextImg_path + Imagelist (images), patch_path, h, w and
ROI_size (roi = (h, w, ROI_size)), mask_block_size (block), coarse_num, fine_num, tol, Modellist (models).
Reference keys accepted and ignored: prefix, batch_size_dict, load_previous.
Ours beyond the reference: rois (a list) or roi_grid (a tile size) for many ROIs from one set of forwards,
locality (auto | off), precision (fp32 | tf32 | bf16 | fp16), input_noise (DN: numpy | counter), batch_size (auto or
a number), crop, model_options,
plot_scale (auto | paper | a bound in dB: the colour scale of the pictures).
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .geometry import ROI
from .paths import looks_like_file, missing
from .options import INCREMENTAL, LOCALITY, TASKS, WINDOWS, config_defaults, split_options


MAX_DEPTH = 32  # a config nests 3 levels (rois: a list of lists); deeper would only exhaust the stack


class _Refused(yaml.composer.ComposerError):
    """YAML that is valid but refused: an alias (``*name``), nesting past MAX_DEPTH, a key that is not a name."""

    def __init__(self, problem: str, mark):
        super().__init__(None, None, problem, mark)


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses, while composing and before anything is expanded: aliases (a "billion laughs"
    under an ignored key would be expanded when the config is written out, and an alias may hold itself),
    nesting deeper than MAX_DEPTH (the composer recurses), keys that are lists or mappings, and a key given twice
    (YAML would keep the last one silently)."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"YAML aliases are not accepted, got *{event.anchor}", event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"values may nest {MAX_DEPTH} levels deep, got more", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise _Refused(f"keys must be names or numbers, got a {kind}", key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem:
        return f"{problem}" + (f" (line {mark.line + 1})" if mark is not None and "line" not in problem else "")
    return str(e).splitlines()[0]


def _load_yaml(text: str, what: str) -> Any:
    """``text`` read with :class:`_ConfigLoader`; ``what`` (the config, a --set key) names it in the errors."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except _Refused as e:
        hint = ": write the value out" if "alias" in e.problem else ""
        raise ValueError(f"{what}: {_yaml_error(e)}{hint}") from None

# our keys: what to run on, then every run and task option with its default (defined in options)
OURS = {
    "model": None, "models": None, "images": None, "image": None, "roi": None, "rois": None, "roi_grid": None,
    "task": "DN", "patches": None, "crop": None, "model_options": None, "plot_scale": "auto", **config_defaults(),
}
REFERENCE = {"sr": "scale", "patch_path": "patches", "mask_block_size": "block", "coarse_num": "coarse",
             "fine_num": "fine", "Modellist": "models"}
REFERENCE_ROI = ("h", "w", "ROI_size")
REFERENCE_IMAGES = ("TextImg_path", "Imagelist")
IGNORED = ("prefix", "batch_size_dict", "load_previous")
VALID_KEYS = sorted(set(OURS) | set(REFERENCE) | set(REFERENCE_ROI) | set(REFERENCE_IMAGES) | set(IGNORED))
# the names of one option, ours first: given together, one would silently win
SAME_OPTION = [(ours, (ref,)) for ref, ours in REFERENCE.items()] + [("roi", REFERENCE_ROI)]


def _other_names(key: str) -> tuple[str, ...]:
    """The other names of ``key``'s option (``fine``: fine_num; ``roi``: h, w, ROI_size; ``h``: roi)."""
    for ours, refs in SAME_OPTION:
        if key == ours:
            return refs
        if key in refs:
            return (ours,)
    return ()


def _check_one_name_each(raw: dict[str, Any]) -> None:
    for ours, refs in SAME_OPTION:
        given = [k for k in refs if k in raw]
        if ours in raw and given:
            raise ValueError(f"config gives {ours!r} and {', '.join(map(repr, given))}, two names of one option: "
                             "keep one")


@dataclass
class RunConfig:
    """``rois``: the ROIs (one for ``roi``; several for ``rois``); ``roi_grid``: a tile size instead."""

    models: list[str]
    images: list[str]
    rois: list[ROI]
    options: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    roi_grid: Optional[int] = None
    config_dir: Optional[Path] = None  # the config file's folder (None without a config file)

    @property
    def module_dirs(self) -> list[Path]:
        """Where a ``pkg.module:factory`` model's module is looked for before sys.path: the config file's folder,
        then the current folder."""
        return [d for d in (self.config_dir, Path.cwd()) if d is not None]

    @property
    def roi(self) -> ROI:
        return self.rois[0]

    @property
    def multi_roi(self) -> bool:
        return self.roi_grid is not None or len(self.rois) > 1


def _closest(key: str) -> str:
    m = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.5)
    return f" (did you mean {m[0]!r}?)" if m else ""


def parse_value(text: str, key: str = "value") -> Any:
    """``--set`` values are YAML scalars or lists: ``8``, ``0.01``, ``[152, 96, 32]``, ``DN``; what YAML cannot
    read is the text itself; what a config refuses (an alias, deep nesting) is refused here too."""
    try:
        return _load_yaml(text, f"--set {key}")
    except yaml.YAMLError:
        return text


FIELD_KEYS = ("tile", "max_memory")  # cem-fast field's own keys (its ROIs are its tiles)
# options whose words include on / off, which YAML 1.1 reads as booleans (``windows: on`` is True)
ON_OFF_KEYS = tuple(k for k, words in (("locality", LOCALITY), ("windows", WINDOWS), ("incremental", INCREMENTAL))
                    if "on" in words or "off" in words)


def load_config(path: Optional[str], overrides: Optional[list[str]] = None, field: bool = False) -> RunConfig:
    """The config at ``path`` with ``--set`` ``overrides``; ``field``: a causal field's (``tile`` instead of ROIs)."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        reason = missing(p) or (None if p.is_file() else "is not a file")
        if reason:
            raise ValueError(f"config {os.path.abspath(path)!r} {reason}")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"config {path!r} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})"
                             ) from None
        try:
            raw = _load_yaml(text, f"config {path!r}") or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config {path!r} is not valid YAML: {_yaml_error(e)}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config {path!r} must be a mapping of keys to values, got {type(raw).__name__}")
        base = Path(os.path.abspath(path)).parent
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        for name in _other_names(k.strip()):  # --set fine=2 replaces the config's fine_num, roi its h, w, ROI_size
            raw.pop(name, None)
        raw[k.strip()] = parse_value(v, k.strip())
    for k in ON_OFF_KEYS:
        if isinstance(raw.get(k), bool):
            raw[k] = "on" if raw[k] else "off"
    for k in raw:
        if not isinstance(k, str):
            raise ValueError(f"config keys must be names (text), got {k!r}")
        if k not in VALID_KEYS and not (field and k in FIELD_KEYS):
            raise ValueError(f"unknown config key {k!r}{_closest(k)}")
    cfg = normalise(raw, base, {item.split("=", 1)[0].strip() for item in overrides or []}, field)
    cfg.config_dir = base if path is not None else None
    return cfg


def _as_list(v: Any) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _resolve(path: str, base: Path) -> str:
    """``path`` made absolute: a relative one against ``base`` alone (the config file's folder, or the current
    folder for ``--set`` values), whether or not a file of that name is elsewhere."""
    p = Path(str(path)).expanduser()
    return str(p if p.is_absolute() else base.absolute() / p)


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".pt2")
NAMED_MODEL = re.compile(r"\s*(bicubic(:.*)?|default(:\w*)?)\s*", re.IGNORECASE)  # what load_model knows by name


def _model_spec(spec: str, base: Path) -> str:
    """A model spec with its file made absolute against ``base``; a named model, a factory as given."""
    if NAMED_MODEL.fullmatch(spec):
        return spec
    if spec.lower().startswith("spandrel:"):
        return "spandrel:" + _resolve(spec.split(":", 1)[1], base)
    path = _resolve(spec, base)
    return path if os.path.lexists(path) or looks_like_file(spec) else spec  # else load_model says what it takes


def _expand_folder(spec: str) -> list[str]:
    """A folder of checkpoints stands for every checkpoint in it, in name order."""
    p = Path(spec)
    if not p.is_dir():
        return [spec]
    found = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in CHECKPOINT_SUFFIXES)
    if not found:
        raise ValueError(f"model folder {spec!r} holds no checkpoints ({', '.join(CHECKPOINT_SUFFIXES)})")
    return found


def _bases(base: Path, set_keys: "set[str]"):
    """key -> the folder its relative paths resolve against: the current one for a key given with --set (under
    either of its names), else ``base``."""
    cwd = Path.cwd()
    return lambda key: cwd if {key, *_other_names(key)} & set_keys else base


def _images(opts: dict[str, Any], raw: dict[str, Any], base_of) -> list[str]:
    """The images of ``images``, ``image`` and the reference's TextImg_path + Imagelist, made absolute."""
    images = [_resolve(_path_text("images", i), base_of(k)) for k in ("images", "image") for i in _as_list(opts.pop(k))]
    if "Imagelist" in raw:
        folder_key = "TextImg_path" if "TextImg_path" in raw else "Imagelist"
        folder = Path(_resolve(_path_text("TextImg_path", raw.get("TextImg_path", ".")), base_of(folder_key)))
        images += [str(folder / _path_text("Imagelist", n)) for n in _as_list(raw["Imagelist"])]
    if not images:
        raise ValueError("config must name images (key 'images', or the reference's TextImg_path + Imagelist)")
    return images


def _models(opts: dict[str, Any], base_of) -> list[str]:
    """The model specs of ``models`` and ``model``, files made absolute, a folder standing for its checkpoints."""
    specs = [(_path_text("model", m), base_of(k)) for k in ("models", "model") for m in _as_list(opts.pop(k))]
    if not specs:
        raise ValueError("config must name a model (key 'model' or 'models': a checkpoint, bicubic, default, "
                         "or pkg.module:factory)")
    return [x for m, base in specs for x in _expand_folder(_model_spec(m, base))]


def normalise(raw: dict[str, Any], base: Path = Path("."), set_keys: "set[str]" = frozenset(),
              field: bool = False) -> RunConfig:
    """A RunConfig from a config's keys; relative paths resolve against ``base``, those of ``set_keys`` (given with
    --set) against the current folder; ``field``: a causal field's config, which gives no ROI."""
    _check_one_name_each(raw)
    opts = {k: v for k, v in OURS.items()}
    for k, v in raw.items():
        if k in REFERENCE:
            opts[REFERENCE[k]] = v
        elif k in OURS:
            opts[k] = v
    base_of = _bases(base, set(set_keys))
    models = _models(opts, base_of)
    images = _images(opts, raw, base_of)
    roi = opts.pop("roi")
    rois, roi_grid = opts.pop("rois"), opts.pop("roi_grid")
    if roi is None and any(k in raw for k in REFERENCE_ROI):
        missing = [k for k in REFERENCE_ROI if k not in raw]
        if missing:
            raise ValueError(f"reference ROI keys need h, w and ROI_size; missing {', '.join(missing)}")
        roi = (raw["h"], raw["w"], raw["ROI_size"])
    given = [k for k, v in (("roi", roi), ("rois", rois), ("roi_grid", roi_grid)) if v is not None]
    if field and given:
        raise ValueError(f"a field's ROIs are its tiles: give tile: SIZE, not {', '.join(given)}")
    if not given and not field:
        raise ValueError("config must give roi: [y, x, size] or [y, x, height, width] (or h, w, ROI_size), "
                         "rois: a list of them, or roi_grid: a tile size")
    if len(given) > 1:
        raise ValueError(f"config must give one of roi, rois, roi_grid, got {', '.join(given)}")
    if rois is not None and (not isinstance(rois, (list, tuple)) or not rois):
        raise ValueError(f"rois must be a non-empty list of [y, x, size] or [y, x, height, width], got {rois!r}")
    if roi_grid is not None and (not isinstance(roi_grid, int) or isinstance(roi_grid, bool) or roi_grid < 1):
        raise ValueError(f"roi_grid must be a positive tile size in pixels, got {roi_grid!r}")
    if isinstance(opts["locality"], bool):  # YAML reads a bare `off` / `on` as a boolean
        opts["locality"] = "auto" if opts["locality"] else "off"
    if opts.get("patches") is not None and opts["patches"] != "default":
        opts["patches"] = _resolve(opts["patches"], base_of("patches"))
    task = str(opts["task"]).strip()
    if task.upper() not in (t.upper() for t in TASKS):
        raise ValueError(f"task must be {', '.join(TASKS[:-1])} or {TASKS[-1]}, got {task!r}")
    crop = opts.get("crop")
    if crop is not None and (not isinstance(crop, (list, tuple)) or len(crop) != 4
                             or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in crop)
                             or crop[2] <= crop[0] or crop[3] <= crop[1]):
        raise ValueError(f"crop must be a PIL box [left, upper, right, lower] of non-negative integers with right > "
                         f"left and lower > upper, got {crop!r}")
    _check_plot_scale(opts["plot_scale"])
    _check_values(opts)
    roi_list = [ROI.parse(r) for r in rois] if rois is not None else [ROI.parse(roi)] if roi is not None else []
    return RunConfig([str(m) for m in models], images, roi_list, opts, raw, roi_grid)


def _check_plot_scale(value: Any) -> None:
    """plot_scale: what cem_fast.map_pictures.colour_scale accepts (checked here: the pictures come after the run)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (value in ("auto", "paper") or (number and 0 < value < float("inf"))):
        raise ValueError(f"plot_scale must be auto, paper or a positive bound in dB, got {value!r}")


def _path_text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} entries must be file names or specs (text), got {value!r}")
    return value


def _check_values(opts: dict[str, Any]) -> None:
    """Values the runs would only trip over later, checked once for the whole config (a usage error, not one
    failed run per model and image): the run and task options check themselves."""
    run, task, _ = split_options(opts)
    run.check()
    task.check()
    from .models.wrappers import check_model_options  # imports torch: only here
    check_model_options(opts.get("model_options"))
