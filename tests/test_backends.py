"""Every backend that can run here against the torch reference: interventions equal exactly, ROI errors equal,
whole CEMs identical. Backends that cannot run are skipped with their own reasons."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast import ops
from cem_fast.geometry import ROI
from cem_fast.reference import intervene_ref, roi_sq_err_ref
from helpers import random_case

CPU_BACKENDS = ["cpp", "triton"]  # triton on CPU tensors runs under the interpreter (TRITON_INTERPRET=1, conftest)


def backend_or_skip(name, device="cpu"):
    why = ops.backend_reasons(name, torch.device(device))
    if why:
        pytest.skip(f"{name} cannot run on {device}: " + "; ".join(why))
    return name


def case(seed, C=3, h=21, w=19, pb=8, K=37, P=11):
    """random_case of test_reference_ops plus intervention ids beyond 32 bits and a rain layer."""
    base, patches, idx, origins, sizes = random_case(seed, C=C, h=h, w=w, pb=pb, K=K, P=P)
    g = torch.Generator().manual_seed(seed + 1000)
    ids = torch.randint(0, 2 ** 40, (K,), generator=g)
    rain = torch.rand(C, h, w, generator=g) * 180
    return dict(base=base, patches=patches, patch_idx=idx, origins=origins, sizes=sizes), ids, rain


def sized(backend, seed):
    """The interpreter runs each Triton program in Python: give it interpreter-sized cases (all of them on a GPU)."""
    if backend == "triton" and not torch.cuda.is_available():
        return case(seed, h=11, w=9, pb=4, K=6, P=5)
    return case(seed)


def assert_same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    bad = (got != want)
    assert not bad.any(), f"{int(bad.sum())} elements differ, first at {bad.nonzero()[0].tolist()}, " \
                          f"max diff {(got.float() - want.float()).abs().max():.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "noise", "rain", "window"])
def test_intervene_equals_the_reference(backend, kind):
    backend_or_skip(backend)
    args, ids, rain = sized(backend, 1)
    K, (h, w) = len(ids), args["base"].shape[1:]
    kw = {"plain": {}, "noise": dict(ids=ids, seed=12345678901, noise_sigma=37.5), "rain": dict(rain=rain),
          "window": dict(window_origins=torch.stack([torch.randint(0, h - 5, (K,)), torch.randint(0, w - 4, (K,))], 1),
                         window_size=(6, 5), ids=ids, noise_sigma=10.0)}[kind]
    assert_same(ops.intervene(**args, backend=backend, **kw), intervene_ref(**args, **kw))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_intervene_low_precision_and_channels_last_outputs(backend, dtype):
    backend_or_skip(backend)
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter truncates to bfloat16 instead of rounding to nearest: GPU only")
    args, ids, _ = sized(backend, 2)
    shape = (len(ids), 3) + tuple(args["base"].shape[1:])
    out = torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    want = intervene_ref(**args, ids=ids, noise_sigma=25.0, out=torch.empty(shape, dtype=dtype))
    got = ops.intervene(**args, ids=ids, noise_sigma=25.0, out=out, backend=backend)
    assert got is out and got.is_contiguous(memory_format=torch.channels_last)
    assert_same(got.contiguous(), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_intervene_single_and_many_interventions(backend):
    backend_or_skip(backend)
    args, ids, _ = case(3, h=8, w=8, K=1)
    assert_same(ops.intervene(**args, ids=ids, noise_sigma=5.0, backend=backend),
                intervene_ref(**args, ids=ids, noise_sigma=5.0))
    if backend == "triton" and torch.device("cpu").type == "cpu":
        pytest.skip("K=70,000 is not interpreter-sized (1.7M Triton programs): gpu_check.sh runs it on a GPU")
    args, ids, _ = case(4, h=8, w=8, pb=4, K=70000, P=3)  # beyond a 65,535 grid dimension
    assert_same(ops.intervene(**args, ids=ids, noise_sigma=5.0, backend=backend),
                intervene_ref(**args, ids=ids, noise_sigma=5.0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roi_sq_err_equals_the_reference(backend, layout, dtype):
    backend_or_skip(backend)
    g = torch.Generator().manual_seed(5)
    out = (torch.rand(9, 3, 30, 26, generator=g) * 1.4 - 0.2).to(dtype)
    out[0, 1, 29, 25] = float("nan")  # on the ROI border: must give NaN for that intervention only
    if layout == "channels_last":
        out = out.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        big = torch.zeros(9, 3, 30, 52, dtype=dtype)
        big[..., ::2] = out
        out = big[..., ::2]
    roi = ROI(10, 7, 20, 19)  # touches the bottom-right border
    target = torch.randint(0, 256, (3, 20, 19), generator=g, dtype=torch.uint8)
    got, want = ops.roi_sq_err(out, target, roi, backend=backend), roi_sq_err_ref(out, target, roi)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    assert torch.equal(got[1:], want[1:]), (got - want).abs().max()


def multi_roi_case(dtype, layout, small):
    g = torch.Generator().manual_seed(7)
    K, H, W = (3, 12, 10) if small else (7, 30, 26)
    out = (torch.rand(K, 3, H, W, generator=g) * 1.4 - 0.2).to(dtype)
    out[1, 2, H - 1, 3] = float("nan")  # in the bottom row: only the ROIs holding it become NaN
    if layout == "channels_last":
        out = out.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        big = torch.zeros(K, 3, H, 2 * W, dtype=dtype)
        big[..., ::2] = out
        out = big[..., ::2]
    target = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
    tile = 4 if small else 8
    rois = cem_fast.roi_grid(H, W, tile) + [ROI(1, 2, H - 3, 5), ROI(0, 0, H, W), ROI(H - 1, W - 1, 1, 1)]
    return out, target, rois


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roi_sq_err_multi_equals_one_roi_at_a_time(backend, layout, dtype):
    backend_or_skip(backend)
    out, target, rois = multi_roi_case(dtype, layout, small=backend == "triton" and not torch.cuda.is_available())
    got = ops.roi_sq_err_multi(out, target, rois, backend=backend)
    assert got.shape == (out.shape[0], len(rois)) and got.dtype == torch.float64
    for i, r in enumerate(rois):
        ys, xs = r.slices()
        want = roi_sq_err_ref(out, target[:, ys, xs], r)
        assert torch.equal(torch.isnan(got[:, i]), torch.isnan(want)), r
        assert torch.equal(got[:, i].nan_to_num(-1), want.nan_to_num(-1)), r
    ref = ops.roi_sq_err_multi(out, target, rois, backend="torch")  # the summed-area-table reference
    assert torch.equal(got.nan_to_num(-1), ref.nan_to_num(-1))
    assert torch.isnan(got[1]).any() and not torch.isnan(got[1]).all() and not torch.isnan(got[0]).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("task", ["DN", "DR", "SR"])
def test_whole_cem_is_identical_across_backends(backend, task, rng):
    backend_or_skip(backend)
    small = backend == "triton" and not torch.cuda.is_available()  # interpreter-sized
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
    backend_or_skip(backend)
    gt = torch.from_numpy(rng.randint(0, 256, (3, 10, 7)).astype(np.uint8))
    task = cem_fast.Denoise(30, noise_seed=2, input_noise="counter")
    monkeypatch.setenv("CEM_FAST_BACKEND", "torch")
    want = task.prepare(gt, block=4).base
    monkeypatch.setenv("CEM_FAST_BACKEND", backend)
    assert_same(task.prepare(gt, block=4).base, want)


def test_auto_prefers_cpp_on_cpu_when_built():
    name = ops.resolve_backend("auto", torch.device("cpu"))
    assert name == ("cpp" if not ops.backend_reasons("cpp", torch.device("cpu")) else "torch")
    with pytest.raises(RuntimeError, match="the cpp backend runs on CPU tensors"):
        ops.resolve_backend("cpp", torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_equal_the_reference(backend, dtype):
    backend_or_skip(backend, "cuda")
    for seed, K in ((1, 37), (4, 70000)):
        args, ids, rain = case(seed, K=K) if K < 1000 else case(seed, h=8, w=8, pb=4, K=K, P=3)
        args = {k: v.cuda() for k, v in args.items()}
        ids, rain = ids.cuda(), rain[:, :args["base"].shape[1], :args["base"].shape[2]].cuda()
        for kw in ({}, dict(ids=ids, noise_sigma=50.0, seed=3), dict(rain=rain)):
            out = torch.empty((K, 3) + tuple(args["base"].shape[1:]), dtype=dtype, device="cuda")
            want = intervene_ref(**args, **kw, out=out.clone())
            assert_same(ops.intervene(**args, **kw, out=out, backend=backend), want)
    g = torch.Generator().manual_seed(6)
    outputs = (torch.rand(4096, 3, 64, 64, generator=g) * 1.4 - 0.2).to(dtype).cuda()
    roi = ROI(20, 17, 32, 32)
    target = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8).cuda()
    assert torch.equal(ops.roi_sq_err(outputs, target, roi, backend=backend), roi_sq_err_ref(outputs, target, roi))
    full = torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8).cuda()
    rois = cem_fast.roi_grid(64, 64, 16) + [ROI(3, 5, 40, 21)]
    assert torch.equal(ops.roi_sq_err_multi(outputs, full, rois, backend=backend),
                       ops.roi_sq_err_multi(outputs, full, rois, backend="torch"))
