"""Backend dispatch: which backend runs where and why the others cannot, the environment override, and whole CEM
runs that give the same samples whichever backend is dispatched."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast import ops
from helpers import CPU_BACKENDS, assert_same, interpreted


def test_dispatch_explains_unavailable_backends():
    assert ops.resolve_backend("auto", torch.device("cpu")) in ("cpp", "torch")
    assert ops.resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("fast", torch.device("cpu"))


def test_dispatch_env_override(monkeypatch):
    monkeypatch.setenv("CEM_FAST_BACKEND", "torch")
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"


def test_multi_roi_op_dispatches_per_op():
    """Every backend has every op (the multi-ROI one included): it runs on whichever backend auto picks."""
    out = torch.rand(2, 3, 16, 16)
    gt = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    got = cem_fast.roi_sq_err_multi(out, gt, cem_fast.roi_grid(16, 16, 8))
    assert got.shape == (2, 4)
    for name in ops.BACKENDS:
        assert all(callable(getattr(ops._REGISTRY[name], op)) for op in ops.OPS), name


def test_auto_prefers_cpp_on_cpu_when_built():
    name = ops.resolve_backend("auto", torch.device("cpu"))
    assert name == ("cpp" if not ops.backend_reasons("cpp", torch.device("cpu")) else "torch")
    with pytest.raises(RuntimeError, match="the cpp backend runs on CPU tensors"):
        ops.resolve_backend("cpp", torch.device("cuda"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("task", ["DN", "DR", "SR"])
def test_whole_cem_is_identical_across_backends(backend, task, rng):
    small = interpreted(backend)
    img = rng.randint(0, 256, (16, 16, 3) if small else (24, 32, 3)).astype(np.uint8)
    bank = cem_fast.PatchBank(torch.from_numpy(rng.randint(0, 256, (16, 3, 8, 8)).astype(np.uint8)))
    model = cem_fast.models.Bicubic(4) if task == "SR" else cem_fast.models.DnCNN(3, 4, 2)
    # the cpp backend runs on the CPU: say so (auto would pick CUDA where there is one)
    kw = dict(task=task, roi=(4, 4, 8) if small else (8, 8, 8), patches=bank, coarse=2, fine=2 if small else 3,
              seed=9, batch_size=6, tol=0.0 if small else 0.01, device="cpu" if backend == "cpp" else None)
    a = cem_fast.causal_effect_map(model, img, backend="torch", **kw)
    b = cem_fast.causal_effect_map(model, img, backend=backend, **kw)
    assert a.backend == "torch" and b.backend == backend
    np.testing.assert_array_equal(a.samples_coarse, b.samples_coarse)
    np.testing.assert_array_equal(a.samples_fine, b.samples_fine)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_counter_input_noise_is_identical_across_backends(backend, rng, monkeypatch):
    gt = torch.from_numpy(rng.randint(0, 256, (3, 10, 7)).astype(np.uint8))
    task = cem_fast.Denoise(30, noise_seed=2, input_noise="counter")
    monkeypatch.setenv("CEM_FAST_BACKEND", "torch")
    want = task.prepare(gt, block=4).base
    monkeypatch.setenv("CEM_FAST_BACKEND", backend)
    assert_same(task.prepare(gt, block=4).base, want)
