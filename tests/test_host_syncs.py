"""Host synchronisation points of the sampling loop (issue 26), counted on the CPU by instrumentation
(benchmarks/host_syncs.py: ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()``/``int()`` of a tensor,
blocking copies to the device). On CUDA each makes the host wait until the device has run everything queued, so
the loop must hold them to a small constant per batch, whatever the number of batches.

Measured before issue 26 (ConvStack(4), 96x96, one 16-px ROI, batches of 8): the layer-by-layer engine 23 per
batch (two index copies per convolution and per pasted rectangle, the batch's blocks read back twice), the
windows 3 per batch; now 2 per batch on every path but the crop's 1: the batch's blocks read back once where the
geometry is computed on the host (runner._window_scores, IncrementalPlan.scores), and the scores' copy of the
previous batch (runner.HostCopies: an event one batch late, by design). Index arrays go to the device by
non-blocking copies from pinned memory (windows.upload)."""
import sys
from pathlib import Path

import pytest
import torch

import cem_fast
from helpers import ConvStack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from host_syncs import SyncCounter  # noqa: E402

PER_BATCH = {"incremental": 2, "windows": 2, "crop": 1}
PATHS = {"incremental": {}, "windows": dict(incremental="off"), "crop": dict(windows="crop", incremental="off")}


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
