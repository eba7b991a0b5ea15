"""The options of a CEM run, defined once: vocabularies (Literal types), defaults and checks.

The Python API (:func:`cem_fast.causal_effect_maps`), the YAML config (:mod:`cem_fast.config`) and the CLI derive
their keys, defaults and allowed values from :class:`RunOptions` and :class:`TaskOptions`. No torch here: the config
and the CLI import this module before torch is loaded.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, Union, get_args

from . import checks

Mode = Literal["coarse-to-fine", "exhaustive", "adaptive"]
Locality = Literal["auto", "off"]
Precision = Literal["fp32", "tf32", "bf16", "fp16"]
Backend = Literal["torch", "triton", "cuda", "cpp"]
TaskName = Literal["SR", "DN", "DR", "identity"]
InputNoise = Literal["numpy", "counter"]
RainPreset = Literal["small", "medium", "large", "random"]
RoiPlan = Literal["auto", "shared", "per-roi"]
Windows = Literal["auto", "crop", "on"]
Incremental = Literal["auto", "off", "on"]
Estimator = Literal["control-variate", "mean"]

MODES: tuple = get_args(Mode)
LOCALITY: tuple = get_args(Locality)
PRECISIONS: tuple = get_args(Precision)
BACKENDS: tuple = get_args(Backend)
BACKEND_CHOICES: tuple = ("auto",) + BACKENDS
TASKS: tuple = get_args(TaskName)
INPUT_NOISES: tuple = get_args(InputNoise)
RAIN_PRESETS: tuple = get_args(RainPreset)
ROI_PLANS: tuple = get_args(RoiPlan)
WINDOWS: tuple = get_args(Windows)
INCREMENTAL: tuple = get_args(Incremental)
ESTIMATORS: tuple = get_args(Estimator)

DEFAULT_MAX_PIXELS = 8192 * 8192  # larger inputs are refused unless max_pixels is raised (memory grows with it)
DRAW_STRIDE = checks.MAX_DRAWS  # intervention id = block * DRAW_STRIDE + draw index


def intervention_ids(blocks: Any, draws: Any) -> Any:
    """The id of draw ``draws`` of block ``blocks`` (int64 arrays or tensors, broadcast): the key of its patch and
    its noise, the same for the runner that draws them and for the control variates that read them."""
    return blocks * DRAW_STRIDE + draws

HALF_WIDTH_REL = 0.2  # adaptive defaults: a block stops once its 95 % half-width is within 20 % of |effect| ...
HALF_WIDTH_DB = 0.05  # ... or 0.05 dB (measured in benchmarks/results/*convergence*)


@dataclass(frozen=True)
class TaskOptions:
    """How the clean image is degraded: ``scale`` (SR), ``sigma``, ``noise_seed``, ``input_noise`` (DN),
    ``rain_preset``, ``rain_beta``, ``rain_seed`` (DR). Each task reads its own and ignores the others."""

    scale: int = 4
    sigma: float = 50.0
    noise_seed: int = 0
    input_noise: InputNoise = "numpy"
    rain_preset: RainPreset = "medium"
    rain_beta: Optional[float] = None
    rain_seed: Optional[int] = None

    def check(self) -> "TaskOptions":
        checks.integer("scale", self.scale, 1)
        checks.number("sigma", self.sigma, 0, 255, lo_open=True)
        checks.integer("noise_seed", self.noise_seed, 0, checks.NUMPY_SEED_MAX)
        checks.choice("input_noise", self.input_noise, INPUT_NOISES)
        checks.choice("rain_preset", self.rain_preset, RAIN_PRESETS)
        if self.rain_beta is not None:
            checks.number("rain_beta", self.rain_beta, 0, 2, lo_open=True)
        if self.rain_seed is not None:
            checks.integer("rain_seed", self.rain_seed, 0, checks.NUMPY_SEED_MAX)
        return self

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def of(cls, **options: Any) -> "TaskOptions":
        """From keyword arguments, an unknown name refused in one line (a misspelt ``sigmaa`` is not ignored)."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise ValueError(f"unknown task option {unknown[0]!r}; expected one of {', '.join(names)}")
        return cls(**options)


@dataclass(frozen=True)
class RunOptions:
    """How a CEM is estimated and run (see :func:`cem_fast.causal_effect_maps` for each option's meaning)."""

    block: int = 8
    coarse: int = 3
    fine: int = 50
    tol: float = 0.01
    seed: int = 0
    mode: Mode = "coarse-to-fine"
    samples: Optional[int] = None
    budget: Optional[int] = None
    half_width_rel: Optional[float] = None
    half_width_db: Optional[float] = None
    estimator: Estimator = "control-variate"
    locality: Locality = "auto"
    roi_plan: RoiPlan = "auto"
    windows: Windows = "auto"
    incremental: Incremental = "auto"
    precision: Precision = "fp32"
    batch_size: Union[int, str, None] = "auto"
    device: Optional[str] = None
    backend: Optional[str] = None
    compile: Union[bool, str] = False
    progress: Optional[bool] = None
    cache: Union[None, str, os.PathLike] = None
    fresh: bool = False
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    trust_model_code: bool = False

    def check(self) -> "RunOptions":
        """Every value checked once, before anything is loaded; returns self."""
        checks.integer("block", self.block, 1)
        checks.choice("mode", self.mode, MODES)
        checks.choice("locality", self.locality, LOCALITY)
        checks.choice("roi_plan", self.roi_plan, ROI_PLANS)
        checks.choice("windows", self.windows, WINDOWS)
        checks.choice("incremental", self.incremental, INCREMENTAL)
        checks.choice("precision", self.precision, PRECISIONS)
        checks.choice("estimator", self.estimator, ESTIMATORS)
        if self.mode == "exhaustive":
            checks.integer("samples", self.fine if self.samples is None else self.samples, 1)
        elif self.mode == "adaptive":  # an interval needs two draws
            checks.integer("coarse", self.coarse, 2)
            checks.integer("fine", self.fine, 0)
        else:
            checks.integer("coarse", self.coarse, 1)
            checks.integer("fine", self.fine, 0)
        if self.samples is not None and self.mode != "exhaustive":
            raise ValueError(f"samples applies to mode: exhaustive (draws per block), got mode {self.mode!r}")
        if self.budget is not None:
            checks.integer("budget", self.budget, 0)
            if self.mode != "adaptive":
                raise ValueError(f"budget applies to mode: adaptive (extra forwards in all), got mode {self.mode!r}")
        for name in ("half_width_rel", "half_width_db"):
            value = getattr(self, name)
            if value is None:
                continue
            checks.number(name, value, 0, None)
            if self.mode != "adaptive":
                raise ValueError(f"{name} applies to mode: adaptive (when a block stops drawing), got mode "
                                 f"{self.mode!r}")
        if not (isinstance(self.tol, (int, float)) and not isinstance(self.tol, bool) and math.isfinite(self.tol)
                and self.tol >= 0):
            raise ValueError(f"tol must be a non-negative number of dB, got {self.tol!r}")
        if self.batch_size not in (None, "auto"):
            checks.integer("batch_size", self.batch_size, 1)
        checks.integer("seed", self.seed, 0, checks.SEED_MAX)
        coarse, fine = self.stages
        if coarse + fine > DRAW_STRIDE:
            raise ValueError(f"coarse + fine (or samples) must be at most {DRAW_STRIDE} draws per block "
                             f"(intervention ids keep 20 bits for the draw index), got {coarse + fine}")
        if self.max_pixels is not None:
            checks.integer("max_pixels", self.max_pixels, 1)
        if self.backend is not None:
            b = self.backend
            checks.choice("backend", b.lower() if isinstance(b, str) else b, BACKEND_CHOICES)
        if self.device is not None and not isinstance(self.device, str) and type(self.device).__name__ != "device":
            raise ValueError(f"device must be a name such as cpu or cuda:0, got {self.device!r}")
        checks.boolean("trust_model_code", self.trust_model_code)
        return self

    @property
    def stages(self) -> tuple[int, int]:
        """(coarse, fine) draws per block of the two stages; exhaustive mode: (0, samples)."""
        if self.mode == "exhaustive":
            return 0, int(self.fine if self.samples is None else self.samples)
        return int(self.coarse), int(self.fine)

    @property
    def every_block_draws(self) -> int:
        """The draws every reachable block gets whatever the gate says: the coarse stage's, or all of exhaustive
        mode's (what an engine's saving is counted over before the fine stage's size is known)."""
        coarse, fine = self.stages
        return coarse or fine

    @property
    def half_width_rel_or_default(self) -> float:
        return HALF_WIDTH_REL if self.half_width_rel is None else float(self.half_width_rel)

    @property
    def half_width_db_or_default(self) -> float:
        return HALF_WIDTH_DB if self.half_width_db is None else float(self.half_width_db)

    @property
    def auto_batch(self) -> bool:
        return self.batch_size in (None, "auto")


# options the API takes that a config file does not (the CLI sets them: --no-progress, --out, --fresh)
API_ONLY = ("progress", "cache", "fresh")


def config_defaults() -> dict[str, Any]:
    """The config keys of the run and task options with their defaults (``max_pixels: null`` = the default)."""
    run = {f.name: f.default for f in fields(RunOptions) if f.name not in API_ONLY}
    run["max_pixels"] = None
    return {**run, **{f.name: f.default for f in fields(TaskOptions)}}


def split_options(opts: dict[str, Any]) -> tuple[RunOptions, TaskOptions, dict[str, Any]]:
    """(run options, task options, the rest) of a flat mapping such as a config's."""
    run_names = {f.name for f in fields(RunOptions)}
    task_names = {f.name for f in fields(TaskOptions)}
    run = {k: v for k, v in opts.items() if k in run_names and not (k == "max_pixels" and v is None)}
    task = {k: v for k, v in opts.items() if k in task_names}
    rest = {k: v for k, v in opts.items() if k not in run_names | task_names}
    return RunOptions(**run), TaskOptions(**task), rest
