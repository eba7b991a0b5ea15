"""The engine seam (cem_fast/pipeline/engines/select.py and base.py): a new engine is one module plus one line in select.CANDIDATES; the
candidates' verdicts are typed and serialised as summary.json has always shown them."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.pipeline.engines import select
from cem_fast.pipeline.engines.base import EngineBase, Verdict
from cem_fast.pipeline.engines.crop import CropEngine
from model_factories import ConvStack


def _net() -> torch.nn.Module:
    return ConvStack(2, width=8, act="relu", act_last=False, residual=None, seed=3)


def _image() -> np.ndarray:
    return (np.random.RandomState(5).rand(40, 40, 3) * 255).astype(np.uint8)


class ReversedCrop(CropEngine):
    """A trivial engine: the crop's computation, blocks run in reverse order, every intervention counted."""

    name = "reversed"
    interventions = 0

    def __init__(self, instead):
        EngineBase.__init__(self, instead)

    def order(self, blocks: np.ndarray) -> np.ndarray:
        return blocks[::-1].copy()

    def scores(self, runner, blocks, draws):
        type(self).interventions += len(blocks)
        return super().scores(runner, blocks, draws)


def plan_reversed(plan, chosen, verdicts):
    """The module-level ``plan`` function a new engine's file would hold."""
    assert isinstance(chosen, CropEngine) and [v.engine for v in verdicts] == ["windows", "incremental"]
    return ReversedCrop(chosen), Verdict("reversed", True, facts={"note": "a test engine"})


def test_a_registered_engine_computes_the_run_and_reports_its_verdict(monkeypatch):
    kw = dict(task="DN", sigma=50, roi=(16, 16, 8), block=8, coarse=3, fine=4, windows="crop", incremental="off",
              progress=False)
    crop = cem_fast.causal_effect_map(_net(), _image(), **kw)
    monkeypatch.setattr(select, "CANDIDATES", [*select.CANDIDATES, ("reversed", plan_reversed)])
    ReversedCrop.interventions = 0
    res = cem_fast.causal_effect_map(_net(), _image(), **kw)
    reached = int(res.reachable.sum())
    assert ReversedCrop.interventions == reached * 3 + int(res.gated.sum()) * 4  # every draw went through it
    assert res.extra["locality"]["reversed"] == {"used": True, "note": "a test engine"}
    assert res.extra["locality"]["windows"] == {"used": False, "reason": "asked (windows: crop)"}
    np.testing.assert_allclose(res.effect, crop.effect, atol=1e-9)  # the same draws, computed the same way
    assert np.abs(res.effect).max() > 0


def test_verdicts_serialise_in_summary_order():
    v = Verdict("windows", False, "outputs differ", facts={"gain": 2.0}, check_failed=True)
    assert list(v.as_dict()) == ["used", "check_failed", "reason", "gain"]
    used = Verdict("incremental", True, facts={"reach_px": [4, 4]}, verify_max_abs_err=1e-7)
    assert used.as_dict() == {"used": True, "verify_max_abs_err": 1e-7, "reach_px": [4, 4]}


def test_an_engine_tied_to_a_precision_hands_other_precisions_to_the_one_it_replaced():
    from cem_fast.pipeline.engines.incremental import IncrementalEngine
    crop = CropEngine()
    inc = object.__new__(IncrementalEngine)  # only the chain and the precision matter here
    EngineBase.__init__(inc, crop)
    inc.precision = "bf16"
    assert inc.for_precision("bf16") is inc and inc.for_precision("fp32") is crop
    assert inc.cache_components() == {"incremental": "layer by layer"}
    assert list(inc.chain()) == [inc, crop]


@pytest.mark.parametrize("locality", ["off"])
def test_without_locality_every_candidate_says_why_it_was_not_used(locality):
    res = cem_fast.causal_effect_map(_net(), _image()[:24, :24].copy(), task="DN", sigma=50, roi=(8, 8, 8), block=8,
                                     coarse=2, fine=2, locality=locality, progress=False)
    for name, _ in select.CANDIDATES:
        said = res.extra["locality"][name]
        assert said["used"] is False and said["reason"].startswith("locality was not verified")
