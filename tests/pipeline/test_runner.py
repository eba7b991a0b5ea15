"""Running interventions (cem_fast/pipeline/runner.py): out-of-memory back-off, the scores' copies, and the
host synchronisation points of the sampling loop.

Host synchronisation points of the sampling loop (issue 26), counted on the CPU by instrumentation
(benchmarks/host_syncs.py: ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()``/``int()`` of a tensor,
blocking copies to the device). On CUDA each makes the host wait until the device has run everything queued, so
the loop must hold them to a small constant per batch, whatever the number of batches.

Measured before issue 26 (ConvStack(4), 96x96, one 16-px ROI, batches of 8): the layer-by-layer engine 23 per
batch (two index copies per convolution and per pasted rectangle, the batch's blocks read back twice), the
windows 3 per batch; now 2 per batch on every path but the crop's 1: the batch's blocks read back once where the
geometry is computed on the host (the windows and layer-by-layer engines' scores), and the scores' copy of the
previous batch (runner.HostCopies: an event one batch late, by design). Index arrays go to the device by
non-blocking copies from pinned memory (windows.upload)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cem_fast
from helpers import exact_cem, random_bank, random_image
from model_factories import ConvStack, RollBlur

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from host_syncs import SyncCounter  # noqa: E402

PER_BATCH = {"incremental": 2, "windows": 2, "crop": 1}
PATHS = {"incremental": dict(incremental="on", windows="on"), "windows": dict(windows="on", incremental="off"),
         "crop": dict(windows="crop", incremental="off")}


def count(image, bank, coarse, **opts):
    with SyncCounter() as c:
        res = cem_fast.causal_effect_map(ConvStack(4), image, task="DN", roi=(40, 36, 16), coarse=coarse, fine=0,
                                         patches=bank, batch_size=8, progress=False, **opts)
    return res, c


@pytest.mark.parametrize("path", list(PATHS))
def test_the_sampling_loop_syncs_a_constant_per_batch(path, image, bank, monkeypatch):
    monkeypatch.setenv("CEM_FAST_CHECK_INTERNAL_OPS", "0")  # the pipeline's own calls, unchecked as in a real run
    res, few = count(image, bank, 2, **PATHS[path])
    _, many = count(image, bank, 6, **PATHS[path])
    loc = res.extra["locality"]
    assert loc["incremental"]["used"] == (path == "incremental") and loc["windows"]["used"] == (path != "crop")
    assert many.batches >= 2 * few.batches >= 4, (few.batches, many.batches)
    slope = (many.total - few.total) / (many.batches - few.batches)
    assert slope <= PER_BATCH[path], (slope, few.report(), many.report())
    # what does not grow with the batches: the changed-region scorer's tables, built once (two small tensors)
    assert many.total - PER_BATCH[path] * many.batches <= 4, many.report()


def test_the_counter_sees_each_kind_of_sync_and_restores_torch():
    from cem_fast.pipeline import runner
    item, to = torch.Tensor.item, torch.Tensor.to
    with SyncCounter(where="everywhere") as c:
        t = torch.ones(3)
        t.sum().item(), t.tolist(), t.cpu().numpy(), bool(t[0]), t.to("cpu"), t.to("cpu", non_blocking=True)
    assert dict(c.counts) == {"item": 1, "tolist": 1, "cpu": 1, "__bool__": 1, "blocking copy to the device": 1}
    assert torch.Tensor.item is item and torch.Tensor.to is to and not hasattr(runner._Batches.run, "__wrapped__")


# ---- out-of-memory back-off ------------------------------------------------------------------------------------------

@pytest.fixture
def img(rng):
    return random_image(rng, 24, 32)


@pytest.fixture
def bank16(rng):
    return random_bank(rng, 16)


class OOMAbove(torch.nn.Module):
    """Raises torch.OutOfMemoryError for batches larger than ``limit``."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: batch {x.shape[0]} > {self.limit})")
        return self.inner(x)


def test_out_of_memory_backs_off_and_completes(img, bank16):
    want = exact_cem(RollBlur(), img, bank16, batch_size=64)
    got = exact_cem(OOMAbove(RollBlur(), 3), img, bank16, batch_size=64)
    assert got.extra["oom_backoffs"] > 0 and got.extra["final_batch_size"] <= 3
    np.testing.assert_array_equal(got.samples_coarse, want.samples_coarse)
    np.testing.assert_array_equal(got.samples_fine, want.samples_fine)
    with pytest.raises(RuntimeError, match="out of memory"):
        exact_cem(OOMAbove(RollBlur(), 0), img, bank16)


# ---- the scores' copies ----------------------------------------------------------------------------------------------

def test_cpu_runs_need_no_pinned_memory():
    """The asynchronous score copies are a CUDA path; on the CPU the scores are read as they are."""
    from cem_fast.pipeline.runner import HostCopies as _HostCopies
    copies = _HostCopies()
    a = torch.tensor([[1.5], [2.5]], dtype=torch.float64)
    assert np.array_equal(copies.finish(copies.start(a)), a.numpy())
    assert cem_fast.__version__
