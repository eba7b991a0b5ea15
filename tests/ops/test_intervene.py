"""intervene: the torch reference against a naive one-pixel-at-a-time paste and the noise's statistics, then every
backend that can run here against the reference, bit for bit (CUDA ones on a GPU)."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cem_fast import ops, reference, rng, triton_ops
from cem_fast.reference import intervene_ref
from helpers import (CPU_BACKENDS, GPU_BACKENDS, assert_same, backend_case, hypothesis_settings, naive_intervene,
                     random_case, sized_case)


# --- the reference against the naive paste ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intervene_matches_naive_paste(seed):
    base, patches, idx, origins, sizes = random_case(seed)
    got = intervene_ref(base, patches, idx, origins, sizes)
    want = naive_intervene(base, patches, idx, origins, sizes).float()
    assert torch.equal(got, want), (got - want).abs().max()


def test_intervene_noise_and_rain_match_naive():
    base, patches, idx, origins, sizes = random_case(5)
    ids = torch.arange(len(idx)) * 3 + 11
    key = rng.stream_key(7, ids)
    pb = patches.shape[-1]
    counter = torch.arange(3 * pb * pb).view(3, pb, pb)
    # gaussian12 in units of 2^-16, times 30: noise in grey levels (exact in float64)
    noise = [rng.gaussian12(key[k], counter).double() * 30.0 / 65536 for k in range(len(idx))]
    got = intervene_ref(base, patches, idx, origins, sizes, ids=ids, seed=7, noise_sigma=30.0)
    want = naive_intervene(base, patches, idx, origins, sizes, noise=noise).float()
    assert torch.equal(got, want)
    rain = torch.rand(base.shape, generator=torch.Generator().manual_seed(3)) * 200
    got = intervene_ref(base, patches, idx, origins, sizes, rain=rain)
    want = naive_intervene(base, patches, idx, origins, sizes, rain=rain).float()
    assert torch.equal(got, want)


def test_intervene_writes_crops_of_the_input():
    base, patches, idx, origins, sizes = random_case(9, h=16, w=16, K=5)
    windows = torch.tensor([[0, 0], [2, 3], [8, 8], [5, 0], [0, 9]])
    got = intervene_ref(base, patches, idx, origins, sizes, window_origins=windows, window_size=(7, 6))
    want = naive_intervene(base, patches, idx, origins, sizes, windows=windows.tolist(), wsize=(7, 6)).float()
    assert got.shape == (5, 3, 7, 6)
    assert torch.equal(got, want)


def test_intervene_into_channels_last_buffer():
    base, patches, idx, origins, sizes = random_case(4)
    out = torch.full((len(idx), 3, 13, 11), float("nan")).contiguous(memory_format=torch.channels_last)
    intervene_ref(base, patches, idx, origins, sizes, out=out)
    assert torch.equal(out, naive_intervene(base, patches, idx, origins, sizes).float())


def test_noise_statistics_and_independence():
    K, pb = 400, 8
    patches = torch.full((1, 3, pb, pb), 128, dtype=torch.uint8)
    base = torch.zeros(3, pb, pb)
    ids = torch.arange(K)
    out = intervene_ref(base, patches, torch.zeros(K, dtype=torch.long), torch.zeros(K, 2, dtype=torch.long),
                        torch.full((K, 2), pb), ids=ids, seed=0, noise_sigma=25.0) * 255
    d = out.double() - 128
    # truncation lowers the mean by ~0.5; sigma 25 is far from the clip bounds
    assert abs(d.mean().item() + 0.5) < 0.2, d.mean()
    assert abs(d.std().item() - 25.0) < 0.5, d.std()
    flat = d.view(K, -1)
    corr = torch.corrcoef(torch.stack([flat[:-1].reshape(-1), flat[1:].reshape(-1)]))[0, 1]
    assert abs(corr.item()) < 0.02  # neighbouring interventions draw independent noise


def test_rng_is_keyed_by_seed_and_id():
    c = torch.arange(1000)
    a = rng.gaussian12(rng.stream_key(0, torch.tensor([5])), c)
    assert torch.equal(a, rng.gaussian12(rng.stream_key(0, torch.tensor([5])), c))
    assert not torch.equal(a, rng.gaussian12(rng.stream_key(1, torch.tensor([5])), c))
    assert not torch.equal(a, rng.gaussian12(rng.stream_key(0, torch.tensor([6])), c))
    u = rng.uniform_from_counter(rng.stream_key(3, torch.tensor([0])), torch.arange(100000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005


def test_gaussian12_moments():
    z = rng.gaussian12(rng.stream_key(11, torch.tensor([4])), torch.arange(200000)).double() / 65536
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    kurt = ((z - z.mean()) ** 4).mean() / z.var() ** 2
    assert 2.85 < kurt.item() < 2.95  # Irwin-Hall(12): 3 - 1.2 / 12 = 2.9
    assert z.abs().max() <= 6


def test_the_traced_unit_table_is_the_exact_quotient():
    """Triton operators traced by torch.compile build the v / 255 table in the graph, through float64: it must be
    the correctly rounded float32 quotient for all 256 values, whether the device divides or multiplies by 1/255."""
    exact = np.arange(256, dtype=np.float32) / np.float32(255.0)
    divided = (torch.arange(256, dtype=torch.float64) / 255.0).to(torch.float32).numpy()
    by_reciprocal = (np.arange(256, dtype=np.float64) * np.float64(1 / 255.0)).astype(np.float32)
    assert np.array_equal(divided, exact) and np.array_equal(by_reciprocal, exact)


# --- every backend against the reference ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "noise", "rain", "window"])
def test_intervene_equals_the_reference(backend, kind):
    args, ids, rain = sized_case(backend, 1)
    K, (h, w) = len(ids), args["base"].shape[1:]
    kw = {"plain": {}, "noise": dict(ids=ids, seed=12345678901, noise_sigma=37.5), "rain": dict(rain=rain),
          "window": dict(window_origins=torch.stack([torch.randint(0, h - 5, (K,)), torch.randint(0, w - 4, (K,))], 1),
                         window_size=(6, 5), ids=ids, noise_sigma=10.0)}[kind]
    assert_same(ops.intervene(**args, backend=backend, **kw), intervene_ref(**args, **kw))


LOW_PRECISION = [pytest.param("cpp", torch.float16, marks=pytest.mark.needs_backend("cpp")),
                 pytest.param("cpp", torch.bfloat16, marks=pytest.mark.needs_backend("cpp")),
                 pytest.param("triton", torch.float16, marks=pytest.mark.needs_backend("triton")),
                 pytest.param("triton", torch.bfloat16, marks=[pytest.mark.needs_backend("triton"), pytest.mark.gpu(
                     reason="the Triton interpreter truncates to bfloat16 instead of rounding to nearest")])]


@pytest.mark.parametrize("backend,dtype", LOW_PRECISION)
def test_intervene_low_precision_and_channels_last_outputs(backend, dtype):
    """The caller's channels-last buffer is written in place (the estimator reuses one per batch)."""
    args, ids, _ = sized_case(backend, 2)
    shape = (len(ids), 3) + tuple(args["base"].shape[1:])
    out = torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    want = intervene_ref(**args, ids=ids, noise_sigma=25.0, out=torch.empty(shape, dtype=dtype))
    got = ops.intervene(**args, ids=ids, noise_sigma=25.0, out=out, backend=backend)
    assert got is out and got.is_contiguous(memory_format=torch.channels_last)
    assert_same(got.contiguous(), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_intervene_without_a_buffer_returns_the_bases_dtype(backend, dtype):
    """No ``out``: the operators' float32 result in the base's dtype, as the reference allocates it."""
    args, ids, _ = sized_case(backend, 6)
    args["base"] = args["base"].to(dtype)
    want = intervene_ref(**args, ids=ids, noise_sigma=12.0)
    assert_same(ops.intervene(**args, ids=ids, noise_sigma=12.0, backend=backend), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_intervene_single_intervention(backend):
    args, ids, _ = backend_case(3, h=8, w=8, K=1)
    assert_same(ops.intervene(**args, ids=ids, noise_sigma=5.0, backend=backend),
                intervene_ref(**args, ids=ids, noise_sigma=5.0))


@pytest.mark.needs_backend("cpp")
def test_intervene_beyond_a_grid_dimension():
    """70,000 interventions (more than 65,535; Triton and CUDA run this in the GPU test: 1.7M interpreted Triton
    programs are not interpreter-sized)."""
    args, ids, _ = backend_case(4, h=8, w=8, pb=4, K=70000, P=3)
    assert_same(ops.intervene(**args, ids=ids, noise_sigma=5.0, backend="cpp"),
                intervene_ref(**args, ids=ids, noise_sigma=5.0))


@pytest.mark.needs_backend("cpp")
@pytest.mark.parametrize("field,value,message", [
    ("patch_idx", 5, r"patch_idx\[2\] = 5 is not a patch of the 5-patch bank"),
    ("sizes", 9, r"sizes\[2\] = \(9, 9\) must lie within the 8x8 patches"),
    ("window_origins", 3, r"window_origins\[2\] = \(3, 3\) with window 19x17 must lie inside the 21x19 base"),
])
def test_the_cpp_operator_refuses_indices_outside_its_buffers(field, value, message):
    """The CPU kernel reads the indices on the host: a bad one is a one-line error with its value, not a read
    outside the patch bank or the base."""
    args, _, _ = backend_case(8, P=5, K=4)
    window = {}
    if field == "window_origins":
        window = dict(window_origins=torch.zeros(4, 2, dtype=torch.long), window_size=(19, 17))
        window["window_origins"][2] = value
    else:
        args[field] = args[field].clone()
        args[field][2] = value
    with pytest.raises(ValueError, match=message):
        ops.intervene(**args, **window, backend="cpp")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_intervene_equals_the_reference(backend, dtype):
    for seed, K in ((1, 37), (4, 70000)):
        args, ids, rain = backend_case(seed, K=K) if K < 1000 else backend_case(seed, h=8, w=8, pb=4, K=K, P=3)
        args = {k: v.cuda() for k, v in args.items()}
        ids, rain = ids.cuda(), rain[:, :args["base"].shape[1], :args["base"].shape[2]].cuda()
        for kw in ({}, dict(ids=ids, noise_sigma=50.0, seed=3), dict(rain=rain)):
            out = torch.empty((K, 3) + tuple(args["base"].shape[1:]), dtype=dtype, device="cuda")
            want = intervene_ref(**args, **kw, out=out.clone())
            assert_same(ops.intervene(**args, **kw, out=out, backend=backend), want)


# ---- the reference against the naive paste, over random shapes and windows (hypothesis) ------------------------------

SETTINGS = hypothesis_settings()


@SETTINGS
@given(st.data())
def test_intervene_matches_the_naive_paste(data):
    h, w = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    pb = data.draw(st.integers(1, min(5, h, w)))
    K, P = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (3, h, w), generator=g).float() / 255
    patches = torch.randint(0, 256, (P, 3, pb, pb), generator=g, dtype=torch.uint8)
    idx = torch.randint(0, P, (K,), generator=g)
    by = torch.randint(0, (h + pb - 1) // pb, (K,), generator=g) * pb
    bx = torch.randint(0, (w + pb - 1) // pb, (K,), generator=g) * pb
    origins = torch.stack([by, bx], 1)
    sizes = torch.stack([(h - by).clamp(max=pb), (w - bx).clamp(max=pb)], 1)
    wh, ww = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    windows = torch.stack([torch.randint(0, h - wh + 1, (K,), generator=g),
                           torch.randint(0, w - ww + 1, (K,), generator=g)], 1)
    got = intervene_ref(base, patches, idx, origins, sizes, window_origins=windows, window_size=(wh, ww))
    want = naive_intervene(base, patches, idx, origins, sizes, windows=windows.tolist(), wsize=(wh, ww)).float()
    assert torch.equal(got, want)


# ---- one v / 255 table for every backend -----------------------------------------------------------------------------

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


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
def test_a_float64_base_is_read_in_float32_by_every_backend(backend):
    """The kernels read the base (and the rain) in float32; the torch twin does too, so a float64 base gives the
    same values on every backend (found by the fuzz: 0.97012345 came back as 0.9701234698 from the C++ kernel and
    unchanged from the torch one)."""
    base = torch.tensor([[[0.97012345678901234, 1 / 255], [0.5 + 1e-12, 0.1]]], dtype=torch.float64)
    patches = torch.tensor([[[[7, 9], [11, 13]]]], dtype=torch.uint8)
    out = ops.intervene(base, patches, torch.tensor([0]), torch.tensor([[1, 1]]), torch.tensor([[1, 1]]),
                        backend=backend)
    want = base.float().double().clone()
    want[0, 1, 1] = torch.tensor(7 / 255, dtype=torch.float32).double()
    assert out.dtype == torch.float64
    assert torch.equal(out[0], want), (out[0], want)


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
def test_windows_without_pixels_write_nothing_on_every_backend(backend):
    """An empty base and (1, 1, 0, 0) windows: an empty result everywhere (the Triton launch divided by zero)."""
    out = ops.intervene(torch.zeros(1, 0, 0), torch.zeros(1, 1, 0, 0, dtype=torch.uint8), torch.tensor([0]),
                        torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), out=torch.zeros(1, 1, 0, 0), backend=backend)
    assert tuple(out.shape) == (1, 1, 0, 0)
