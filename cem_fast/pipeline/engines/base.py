"""The seam between the runner and the ways of computing interventions.

An engine turns a batch of interventions ``(blocks[k], draws[k])`` into ``(K, n_rois)`` ROI PSNRs on the device.
The runner owns the batching, the cache, out-of-memory back-off and the scores' copies; it hands the engine
itself (``runner``) for what lives as long as it does: the forward (``runner.forward``), reused input buffers
(``runner.buffer(k, h, w)``), the crop's ROI scorer (``runner.score``) and the changed-region scorer built from
the unintervened output (``runner.changed_scorer(tables)``).

A candidate engine is planned by a ``plan(plan, chosen, verdicts) -> (engine or None, Verdict)`` function in its
module: ``chosen`` is the engine it would replace (the crop, or an earlier candidate), ``verdicts`` what the
earlier candidates said. Adding an engine is one module in this folder and one line in :data:`.select.CANDIDATES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class Verdict:
    """What a candidate engine said of a run: used or not, why not, what it counted and how well it verified.
    summary.json holds it under ``locality.<engine>``."""

    engine: str
    used: bool
    reason: str = ""
    facts: dict = field(default_factory=dict)
    verify_max_abs_err: Optional[float] = None
    check_failed: bool = False  # its outputs differed from the crop's (the tables it used are in doubt)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"used": self.used}
        if self.check_failed:
            d["check_failed"] = True
        if self.reason:
            d["reason"] = self.reason
        if self.verify_max_abs_err is not None:
            d["verify_max_abs_err"] = self.verify_max_abs_err
        return {**d, **self.facts}


def equal_runs(keys: np.ndarray) -> list[tuple[int, int]]:
    """``[first, last)`` of each run of equal ``keys`` (a batch's interventions of one input shape share a
    forward: the engines order blocks so that the runs are few)."""
    cuts = [0, *(np.flatnonzero(np.diff(keys)) + 1), len(keys)]
    return list(zip(cuts, cuts[1:]))


def verdict_of(verdicts, engine: str) -> Optional[Verdict]:
    """The verdict ``engine`` gave, if it was asked."""
    return next((v for v in verdicts if v.engine == engine), None)


class Engine(Protocol):
    """One way of computing interventions (module docstring)."""

    name: str
    instead: Optional["Engine"]  # the engine this one replaced (None for the crop)

    def order(self, blocks: np.ndarray) -> np.ndarray:
        """The blocks in the order they run (batches then hold one input shape, or few)."""

    def scores(self, runner: Any, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """(K, n_rois) ROI PSNRs of interventions (blocks[k], draws[k]) on the device."""

    def for_precision(self, precision: str) -> "Engine":
        """The engine for a forward at ``precision`` (itself, or the one it replaced when its state is tied to the
        run's precision)."""

    def cache_components(self) -> dict[str, str]:
        """What the engine adds to the cache key (the samples it computes may differ by float round-off)."""

    def for_rois(self, plan: Any) -> "Engine":
        """This engine for ``plan``, a plan of the same run whose ROIs and reach are a part of those it was chosen
        for (a causal field's chunk): its per-ROI tables rebuilt, nothing measured or verified again."""

    def budget(self) -> dict[str, Any]:
        """The plan line's facts: ``windows`` ("crop" or "intervention-centred"), ``incremental`` (bool) and
        ``input_px`` (input pixels per draw over every reachable block, or None for the crop's)."""


class EngineBase:
    """Defaults for an engine that replaced ``instead``: its budget and cache facts and its precision fallback."""

    name = "engine"

    def __init__(self, instead: Optional[Engine] = None):
        self.instead = instead

    def chain(self) -> Iterator[Engine]:
        """This engine, then the ones it replaced."""
        e: Optional[Engine] = self
        while e is not None:
            yield e
            e = e.instead

    def order(self, blocks: np.ndarray) -> np.ndarray:
        return blocks

    def for_precision(self, precision: str) -> Engine:
        return self

    def for_rois(self, plan: Any) -> Engine:
        return self  # no per-ROI state (the crop scores through the runner's scorer)

    def cache_components(self) -> dict[str, str]:
        return self.instead.cache_components() if self.instead is not None else {}

    def budget(self) -> dict[str, Any]:
        return self.instead.budget() if self.instead is not None else \
            {"windows": "crop", "incremental": False, "input_px": None}
