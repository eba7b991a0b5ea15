"""Defects of the GPU path that a CPU can show (issue 12): one v / 255 table for every backend, device checks on
every tensor argument, many-ROI launches within the grid limit, the many-ROI finiteness check in one pass."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast import geometry, ops, reference, triton_ops
from cem_fast.geometry import ROI


def test_the_unit_table_is_the_exact_quotient_and_the_reference_uses_it():
    exact = np.arange(256, dtype=np.float32) / np.float32(255.0)  # IEEE division, correctly rounded
    assert np.array_equal(reference.unit_table().numpy(), exact)
    # what torch does on CUDA for x / 255.0 (x * (1 / 255)): 126 values differ in the last bit
    assert (np.arange(256, dtype=np.float32) * np.float32(1 / 255.0) != exact).sum() == 126
    # every pasted value goes through the table: a bank holding all 256 values, pasted whole
    bank = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    base = torch.zeros(3, 16, 16)
    out = reference.intervene_ref(base, bank, torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                                  torch.full((1, 2), 16, dtype=torch.long))
    assert np.array_equal(out[0, 0].flatten().numpy(), exact)
    assert triton_ops.unit_table is reference.unit_table  # Triton looks the same values up


def _intervene_args(device_of_ids="cpu"):
    return dict(base=torch.rand(3, 8, 8), patches=torch.zeros(4, 3, 4, 4, dtype=torch.uint8),
                patch_idx=torch.zeros(2, dtype=torch.long), origins=torch.zeros(2, 2, dtype=torch.long),
                sizes=torch.full((2, 2), 4, dtype=torch.long), ids=torch.zeros(2, dtype=torch.long,
                                                                               device=device_of_ids))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_tensor_on_another_device_is_refused_before_any_launch(backend):
    args = _intervene_args("meta")  # stands for a host tensor given with device tensors
    with pytest.raises(ValueError, match=r"intervene: ids is on meta, expected cpu like base"):
        ops.intervene(noise_sigma=10.0, backend=backend, **args)
    out = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"roi_sq_err: target is on meta, expected cpu like outputs"):
        ops.roi_sq_err(out, torch.zeros(3, 4, 4, device="meta"), ROI(0, 0, 4, 4), backend=backend)
    with pytest.raises(ValueError, match=r"roi_sq_err_multi: target is on meta"):
        ops.roi_sq_err_multi(out, torch.zeros(3, 8, 8, device="meta"), [ROI(0, 0, 4, 4)], backend=backend)


@pytest.mark.needs_backend("triton")
def test_many_roi_launches_are_split_at_the_grid_limit(monkeypatch, rng):
    out = torch.from_numpy(rng.rand(2, 3, 8, 8).astype(np.float32))
    target = torch.from_numpy(rng.randint(0, 256, (3, 8, 8)).astype(np.uint8))
    rois = [ROI(y, x, 3, 2) for y in range(0, 5, 2) for x in range(0, 6, 3)]  # 6 ROIs
    want = reference.roi_sq_err_multi_ref(out, target, rois)
    monkeypatch.setattr(triton_ops, "MAX_ROIS_PER_LAUNCH", 4)  # 4 + 2: two launches, like 65,535 + more
    got = ops.roi_sq_err_multi(out, target, rois, backend="triton")
    assert torch.equal(got, want)


def test_many_roi_finiteness_in_one_pass_equals_the_per_roi_check(rng):
    for trial in range(20):
        out = torch.from_numpy(rng.rand(3, 2, 12, 10).astype(np.float32))
        for _ in range(rng.randint(0, 4)):
            out[rng.randint(3), rng.randint(2), rng.randint(12), rng.randint(10)] = \
                [np.nan, np.inf, -np.inf][rng.randint(3)]
        oy, ox = rng.randint(0, 3), rng.randint(0, 3)
        rois = []
        for _ in range(rng.randint(2, 7)):
            h, w = rng.randint(1, 6), rng.randint(1, 6)
            rois.append(ROI(oy + rng.randint(0, 12 - h + 1), ox + rng.randint(0, 10 - w + 1), h, w))
        want = torch.stack([torch.isfinite(out[:, :, r.y - oy:r.y - oy + r.height, r.x - ox:r.x - ox + r.width])
                            .flatten(1).all(1) for r in rois], 1)
        assert torch.equal(geometry.rois_finite(out, rois, oy, ox), want), trial


def test_cpu_runs_need_no_pinned_memory():
    """The asynchronous score copies are a CUDA path; on the CPU the scores are read as they are."""
    from cem_fast.pipeline.runner import HostCopies as _HostCopies
    copies = _HostCopies()
    a = torch.tensor([[1.5], [2.5]], dtype=torch.float64)
    assert np.array_equal(copies.finish(copies.start(a)), a.numpy())
    assert cem_fast.__version__
