"""Which engine computes a run's interventions: the crop, replaced by each candidate that plans, saves enough and
verifies against it, in the order of :data:`CANDIDATES`. Each candidate's verdict goes to summary.json."""
from __future__ import annotations

from ..plan import RunPlan
from . import incremental, windows
from .base import Engine, Verdict
from .crop import CropEngine

# (name, plan function): tried in order; a later one may build on an earlier one's engine and verdict
CANDIDATES = [
    (windows.WindowsEngine.name, windows.plan),
    (incremental.IncrementalEngine.name, incremental.plan),
]


def choose_engine(plan: RunPlan) -> tuple[Engine, tuple[Verdict, ...]]:
    """The engine of ``plan`` and every candidate's verdict (run under ``torch.inference_mode``)."""
    chosen: Engine = CropEngine()
    if plan.shared_too_big:  # one run per ROI follows: no engine is planned for the shared pass
        return chosen, tuple(Verdict(name, False, "one run per ROI: " + plan.shared_too_big)
                             for name, _ in CANDIDATES)
    verdicts: list[Verdict] = []
    for _, plan_engine in CANDIDATES:
        engine, verdict = plan_engine(plan, chosen, tuple(verdicts))
        verdicts.append(verdict)
        if engine is not None:
            chosen = engine
    return chosen, tuple(verdicts)
