"""Incremental recomputation (issue 15): each intervention recomputed layer by layer on its box equals the model run
on the whole (intervened) input, the pipeline's samples equal the window path's, and everything it cannot compute
exactly falls back with the reason in summary.json."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cem_fast
from cem_fast.patches import PatchBank
from cem_fast.pipeline.incremental import IncrementalEngine, Unsupported
from model_factories import ConvStack
from test_windows import assert_same_samples  # the cross-shape bound on CUDA (documented there)


class RandomNet(torch.nn.Module):
    """Same-padded convolutions (kernel, dilation, groups drawn), eval batch norm with drawn statistics, mixed
    activations, a residual every other layer and a global residual: what the engine claims to support."""

    def __init__(self, layers, width, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs, self.norms, self.acts = torch.nn.ModuleList(), torch.nn.ModuleList(), torch.nn.ModuleList()
        cin, self.residual = 3, []
        for i, (k, d, groups) in enumerate(layers):
            cout = 3 if i == len(layers) - 1 else width
            groups = groups if cin % groups == 0 and cout % groups == 0 else 1
            self.convs.append(torch.nn.Conv2d(cin, cout, k, padding=d * (k - 1) // 2, dilation=d, groups=groups))
            bn = torch.nn.BatchNorm2d(cout)
            bn.running_mean.copy_(torch.randn(cout, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(cout, generator=g) + 0.5)
            self.norms.append(bn)
            self.acts.append([torch.nn.ReLU(inplace=True), torch.nn.LeakyReLU(0.2), torch.nn.PReLU(cout),
                              torch.nn.Tanh()][i % 4])
            self.residual.append(i % 2 == 1 and cin == cout)
            cin = cout
        with torch.no_grad():
            for p in self.convs.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.eval()

    def forward(self, x):
        y = x
        for c, n, a, res in zip(self.convs, self.norms, self.acts, self.residual):
            z = a(n(c(y)))
            y = z + y if res else z
        return x - 0.1 * torch.tanh(y)


def full_outputs(model, base, blocks, origins, fp):
    outs = []
    for k in range(blocks.shape[0]):
        x = base.clone()
        y, x0 = origins[k].tolist()
        x[0, :, y:y + fp[0], x0:x0 + fp[1]] = blocks[k]
        outs.append(model(x)[0])
    return torch.stack(outs)


def check_rectangle(out, lo, truth, full, need, footprint, scale, radius):
    """One intervention (footprint ``(y, x, side)`` in input px): the part of its ``need`` it can change lies in
    its returned rectangle (``out`` from output px ``lo``) and equals the whole-image ``truth`` there; outside what
    it can change, the truth is the unintervened output ``full``."""
    y, x, fb = footprint
    ry, rx = radius
    y0, x0, y1, x1 = y * scale - ry, x * scale - rx, (y + fb) * scale + ry, (x + fb) * scale + rx
    cy0, cx0, cy1, cx1 = max(need[0], y0), max(need[1], x0), min(need[2], y1), min(need[3], x1)
    if cy0 < cy1 and cx0 < cx1:
        ly, lx = (int(v) for v in lo)
        assert ly <= cy0 and lx <= cx0 and cy1 <= ly + out.shape[-2] and cx1 <= lx + out.shape[-1]
        torch.testing.assert_close(out[:, cy0 - ly:cy1 - ly, cx0 - lx:cx1 - lx], truth[:, cy0:cy1, cx0:cx1],
                                   atol=2e-5, rtol=0)
    outside = torch.ones(truth.shape[-2:], dtype=torch.bool)
    outside[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = False
    torch.testing.assert_close(truth[:, outside], full[:, outside], atol=2e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(layers=st.lists(st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]), st.sampled_from([1, 3])),
                       min_size=1, max_size=5),
       width=st.sampled_from([3, 6]), h=st.integers(12, 40), w=st.integers(12, 40), fb=st.sampled_from([4, 8]),
       seed=st.integers(0, 1000))
def test_the_rectangles_equal_the_model_on_the_whole_intervened_input(layers, width, h, w, fb, seed):
    """Footprints anywhere (also cut by the image's edge), each with an output rectangle it must get right: on
    that rectangle the engine's outputs equal the model run on the whole intervened image."""
    model = RandomNet(layers, width, seed)
    g = np.random.RandomState(seed)
    base = torch.from_numpy(g.rand(1, 3, h, w).astype(np.float32))
    engine = IncrementalEngine(model)
    with torch.no_grad():
        torch.testing.assert_close(engine.materialise(base, fb), model(base), atol=1e-5, rtol=0)
        n = 4
        origins = np.stack([g.randint(-fb + 1, h, n), g.randint(-fb + 1, w, n)], 1)
        y0, x0 = g.randint(0, h - 1, n), g.randint(0, w - 1, n)
        need = np.stack([y0, x0, y0 + 1 + g.randint(0, h - y0), x0 + 1 + g.randint(0, w - x0)], 1)
        need[:, 2], need[:, 3] = np.minimum(need[:, 2], h), np.minimum(need[:, 3], w)
        patches = torch.from_numpy(g.rand(n, 3, fb, fb).astype(np.float32))
        out, lo = engine.run(patches, origins, need)
        big = torch.nn.functional.pad(base, (fb, fb, fb, fb))
        for k in range(n):
            y, x = (int(v) for v in origins[k])
            inp = big.clone()
            inp[0, :, y + fb:y + 2 * fb, x + fb:x + 2 * fb] = patches[k]
            truth = model(inp[:, :, fb:fb + h, fb:fb + w])[0]
            check_rectangle(out[k], lo[k], truth, model(base)[0], need[k], (y, x, fb), 1, engine.output_radius())


def test_a_rectangle_cut_to_the_region_reads_zero_padding_where_its_reader_starts():
    """A footprint at the image's corner whose needed output is the corner: the last convolution's input
    rectangle equals its producer's, both reaching past the image, where the convolution must read its zero
    padding, not the values computed there (found by the pipeline's check, missed by random rectangles)."""
    from cem_fast.models.dncnn import DnCNN
    torch.manual_seed(0)
    model = DnCNN(3, 8, 12).eval()
    g = np.random.RandomState(0)
    base = torch.from_numpy(g.rand(1, 3, 64, 72).astype(np.float32))
    patch = torch.from_numpy(g.rand(1, 3, 8, 8).astype(np.float32))
    engine = IncrementalEngine(model)
    with torch.no_grad():
        engine.materialise(base, 8)
        out, lo = engine.run(patch, np.array([[0, 0]]), np.array([[0, 0, 16, 16]]))
        inp = base.clone()
        inp[0, :, :8, :8] = patch[0]
        assert lo.tolist() == [[0, 0]]
        torch.testing.assert_close(out[0, :, :16, :16], model(inp)[0, :, :16, :16], atol=2e-5, rtol=0)


class StridedDown(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(3, 3, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.nn.functional.interpolate(self.down(x), scale_factor=2)


class Reflect(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return x + 0.1 * self.conv(x)


class Branches(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x * 0.9
        return x


@pytest.mark.parametrize("model,reason", [
    (StridedDown(), "stride (2, 2)"),
    (Reflect(), "reflect padding"),
    (Branches(), "torch.fx cannot trace"),
])
def test_unsupported_models_are_named_with_the_reason(model, reason):
    with pytest.raises(Unsupported, match=reason.replace("(", r"\(").replace(")", r"\)")):
        IncrementalEngine(model)


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))


@pytest.fixture
def image(rng):
    return rng.randint(0, 256, (64, 72, 3)).astype(np.uint8)


ARGS = dict(task="DN", sigma=30, coarse=2, fine=3, tol=0.0, seed=5, progress=False)


@pytest.mark.parametrize("model", [ConvStack(4, 2), RandomNet([(3, 1, 1), (5, 2, 3), (3, 1, 1), (3, 2, 1)], 6, 1),
                                   "default"], ids=["dilated", "random", "default-DnCNN"])
@pytest.mark.parametrize("rois", [[(24, 32, 16)], [(0, 0, 16), (40, 48, 24, 16)]], ids=["one", "two"])
def test_the_pipeline_gives_the_window_paths_samples(model, rois, image, bank):
    inc = cem_fast.causal_effect_maps(model, image, rois=rois, patches=bank, **ARGS)
    off = cem_fast.causal_effect_maps(model, image, rois=rois, patches=bank, incremental="off", **ARGS)
    info = inc[0].extra["locality"]["incremental"]
    assert info["used"], info
    assert info["verify_max_abs_err"] <= 1e-4 and info["fewer_conv_px"] >= 1.2
    assert off[0].extra["locality"]["incremental"] == {"used": False, "reason": "asked (incremental: off)"}
    for a, b in zip(inc, off):
        assert_same_samples(a.samples_coarse, b.samples_coarse, atol=1e-3, what="coarse samples")
        assert_same_samples(a.cem, b.cem, atol=1e-3, what="maps")
        assert np.array_equal(a.gated, b.gated) and a.num_forwards == b.num_forwards


@pytest.mark.parametrize("task,opts", [("DR", dict(rain_seed=3)), ("identity", {})])
def test_other_tasks_give_the_crops_samples(task, opts, image, bank):
    args = dict(ARGS, task=task, **opts)
    inc = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(8, 40, 24, 16), patches=bank, **args)
    crop = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(8, 40, 24, 16), patches=bank, windows="crop",
                                      incremental="off", **args)
    assert inc.extra["locality"]["incremental"]["used"]
    assert_same_samples(inc.samples_coarse, crop.samples_coarse, atol=1e-3, what="coarse samples")
    assert_same_samples(inc.samples_fine, crop.samples_fine, atol=1e-3, what="fine samples")


def test_too_small_a_gain_keeps_the_windows(image, bank, monkeypatch):
    """The engine runs only where it computes clearly fewer convolution pixels (here: demanding 1000x)."""
    import cem_fast.pipeline.incremental as incremental
    monkeypatch.setattr(incremental, "MIN_GAIN", 1000)
    res = cem_fast.causal_effect_map(ConvStack(1), image, roi=(24, 32, 16), patches=bank, **ARGS)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "saves too little" in info["reason"]


def test_a_difference_from_the_crop_falls_back_and_says_so(image, bank, monkeypatch):
    real = IncrementalEngine.run

    def off_by_a_little(self, *args, **kwargs):
        out, lo = real(self, *args, **kwargs)
        return out + 1e-3, lo
    monkeypatch.setattr(IncrementalEngine, "run", off_by_a_little)
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **ARGS)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "differ from the crop's by 0.001" in info["reason"]


def test_a_failed_windows_check_refuses_the_engine_too(image, bank, monkeypatch):
    """The engine reads the same changed rectangles as the windows: where their check failed, it does not run."""
    import cem_fast.pipeline.windows as windows
    monkeypatch.setattr(windows, "verify_windows", lambda *a, **k: 1.0)
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **ARGS)
    loc = res.extra["locality"]
    assert loc["windows"]["check_failed"] and not loc["windows"]["used"]
    assert not loc["incremental"]["used"] and loc["incremental"]["reason"].startswith("the windows' check failed")


def test_activations_that_would_not_fit_keep_the_windows(image, bank, monkeypatch):
    import cem_fast.pipeline.incremental as incremental
    # the activations do not fit (on CUDA the device's free memory is asked, on the CPU the host's: one function)
    monkeypatch.setattr(incremental, "free_memory", lambda device: 1 << 18)
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **ARGS)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "more than a quarter of the 0.0 GiB available" in info["reason"], info
    assert res.extra["locality"]["windows"]["used"]


def test_the_fp32_recheck_of_a_reduced_precision_run_does_not_use_its_activations(image, bank, monkeypatch):
    """bf16: the unintervened activations are bf16; the fp32 re-check of a sample of blocks must not read them
    (it ran the engine on them and failed, found by review). The probe runs in fp32 here, as on a GPU, so that the
    engine is used (on the CPU oneDNN's bf16 NaN spread is wider than the receptive field, and it is refused)."""
    import cem_fast.pipeline.plan as plan_module
    real = plan_module.plan_locality
    monkeypatch.setattr(plan_module, "plan_locality", lambda forward, *a, **k: real(forward.at_precision("fp32"),
                                                                                     *a, **k))
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, precision="bf16",
                                     **dict(ARGS, fine=0))
    assert res.extra["locality"]["incremental"]["used"], res.extra["locality"]["incremental"]
    check = res.extra["precision_check"]
    assert check["max_abs_delta_ce_db"] < 0.5, check


def test_a_failure_of_the_activations_keeps_the_windows(image, bank, monkeypatch):
    def fail(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(IncrementalEngine, "materialise", fail)
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **ARGS)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "RuntimeError: CUDA out of memory (simulated)" in info["reason"], info


class PicksTheBatch(torch.nn.Module):
    def forward(self, x):
        return x[:1] * 0.5 + x * 0.5


def test_an_op_across_the_batch_is_refused():
    with pytest.raises(Unsupported, match="unsupported function getitem"):
        IncrementalEngine(PicksTheBatch())


@pytest.mark.parametrize("model,opts,reason", [
    (ConvStack(4, 2), dict(locality="off"), "locality was not verified"),
    (Reflect(), {}, "reflect padding"),
])
def test_the_summary_says_why_it_did_not_run(model, opts, reason, image, bank):
    res = cem_fast.causal_effect_map(model, image, roi=(24, 32, 16), patches=bank, **ARGS, **opts)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and reason in info["reason"], info


class TinySR(torch.nn.Module):
    """MSRResNet's shape at a small size: convolutions, a residual block, pixel shuffles up to x``scale``, and the
    input upsampled by interpolation (``mode``) added to the output."""

    def __init__(self, scale=2, mode="bilinear", width=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.scale, self.mode = scale, mode
        self.first = torch.nn.Conv2d(3, width, 3, padding=1)
        self.body = torch.nn.Conv2d(width, width, 3, padding=1)
        self.ups = torch.nn.ModuleList(torch.nn.Conv2d(width, width * 4, 3, padding=1) for _ in range(scale // 2))
        self.last = torch.nn.Conv2d(width, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        f = torch.nn.functional.leaky_relu(self.first(x), 0.1)
        f = f + torch.relu(self.body(f))
        for up in self.ups:
            f = torch.nn.functional.leaky_relu(torch.nn.functional.pixel_shuffle(up(f), 2), 0.1)
        base = torch.nn.functional.interpolate(x, scale_factor=self.scale, mode=self.mode,
                                               align_corners=None if self.mode == "nearest" else False)
        return self.last(f) + base


@settings(max_examples=20, deadline=None)
@given(scale=st.sampled_from([2, 4]), mode=st.sampled_from(["nearest", "bilinear", "bicubic"]),
       h=st.integers(6, 20), w=st.integers(6, 20), fb=st.sampled_from([2, 4]), seed=st.integers(0, 1000))
def test_upscaling_rectangles_equal_the_model_on_the_whole_intervened_input(scale, mode, h, w, fb, seed):
    """Pixel shuffles and interpolations (whose reads clamp at the image's edge) on rectangles, footprints also at
    the edge: the needed output rectangle equals the whole-image model's."""
    model = TinySR(scale, mode, seed=seed).eval()
    g = np.random.RandomState(seed)
    base = torch.from_numpy(g.rand(1, 3, h, w).astype(np.float32))
    engine = IncrementalEngine(model)
    H, W = h * scale, w * scale
    with torch.no_grad():
        full = model(base)[0]
        torch.testing.assert_close(engine.materialise(base, fb), full[None], atol=1e-5, rtol=0)
        n = 4
        origins = np.stack([g.randint(0, h - fb + 1, n), g.randint(0, w - fb + 1, n)], 1)
        origins[0] = 0  # the corner: every read clamps there
        y0, x0 = g.randint(0, H - 1, n), g.randint(0, W - 1, n)
        need = np.stack([y0, x0, np.minimum(H, y0 + 1 + g.randint(0, H - y0)),
                         np.minimum(W, x0 + 1 + g.randint(0, W - x0))], 1)
        need[0] = [0, 0, min(H, 6), min(W, 6)]
        patches = torch.from_numpy(g.rand(n, 3, fb, fb).astype(np.float32))
        out, lo = engine.run(patches, origins, need)
        ry, rx = engine.output_radius()
        for k in range(n):
            y, x = (int(v) for v in origins[k])
            inp = base.clone()
            inp[0, :, y:y + fb, x:x + fb] = patches[k]
            truth = model(inp)[0]
            check_rectangle(out[k], lo[k], truth, full, need[k], (y, x, fb), scale, (ry, rx))


@pytest.mark.parametrize("model,scale", [(TinySR(2, "bicubic"), 2), (TinySR(4, "bilinear"), 4), ("default:sr", 4)],
                         ids=["x2-bicubic", "x4-bilinear", "default-MSRResNet"])
def test_sr_gives_the_window_paths_samples(model, scale, rng, bank):
    img = rng.randint(0, 256, (96, 96, 3) if scale == 2 else (192, 192, 3)).astype(np.uint8)
    args = dict(task="SR", scale=scale, coarse=2, fine=2, tol=0.0, seed=5, progress=False, patches=bank)
    rois = [(32, 40, 16)] if scale == 2 else [(80, 88, 16), (8, 120, 16, 24)]
    inc = cem_fast.causal_effect_maps(model, img, rois=rois, **args)
    crop = cem_fast.causal_effect_maps(model, img, rois=rois, windows="crop", incremental="off", **args)
    info = inc[0].extra["locality"]["incremental"]
    assert info["used"] and info["verify_max_abs_err"] <= 1e-4, info
    for a, b in zip(inc, crop):
        assert_same_samples(a.samples_coarse, b.samples_coarse, atol=1e-3, what="coarse samples")
        assert_same_samples(a.cem, b.cem, atol=1e-3, what="maps")


def test_a_model_without_convolutions_keeps_the_windows(rng, bank):
    img = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    res = cem_fast.causal_effect_map("bicubic", img, task="SR", scale=2, roi=(24, 24, 16), coarse=1, fine=0,
                                     patches=bank, progress=False)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "saves too little" in info["reason"], info


def _archs():
    from cem_fast.models.dncnn import DnCNN, FDnCNN
    from cem_fast.models.sr_archs import EDSR, RCAN, MSRResNet
    from cem_fast.models.swinir import SwinIR
    from cem_fast.models.wrappers import WithNoiseMap
    return [
        ("DnCNN", lambda: DnCNN(3, 8, 4), 1, None),
        ("MSRResNet", lambda: MSRResNet(num_feat=8, num_block=2, upscale=4), 4, None),
        ("EDSR", lambda: EDSR(num_feat=8, num_block=2, upscale=2), 2, None),
        ("FDnCNN", lambda: WithNoiseMap(FDnCNN(width=8, depth=3), 25), 1, None),
        ("RCAN", lambda: RCAN(num_feat=16, num_group=1, num_block=1, squeeze_factor=4, upscale=2), 2,
         "unsupported layer AdaptiveAvgPool2d"),
        ("SwinIR", lambda: SwinIR(img_size=16, embed_dim=12, depths=(1,), num_heads=(2,), window_size=4,
                                  upscale=2, upsampler="pixelshuffle", num_feat=8), 2, "torch.fx cannot trace"),
    ]


@pytest.mark.parametrize("name,make,scale,refused", _archs(), ids=[a[0] for a in _archs()])
def test_public_architectures_are_computed_exactly_or_refused_with_the_reason(name, make, scale, refused):
    torch.manual_seed(0)
    model = make().eval()
    if refused is not None:
        with pytest.raises(Unsupported, match=refused) as e:
            IncrementalEngine(model)
        assert "\n" not in str(e.value)
        return
    engine = IncrementalEngine(model)
    g = np.random.RandomState(1)
    base = torch.from_numpy(g.rand(1, 3, 24, 28).astype(np.float32))
    patch = torch.from_numpy(g.rand(1, 3, 4, 4).astype(np.float32))
    with torch.no_grad():
        engine.materialise(base, 4)
        out, lo = engine.run(patch, np.array([[10, 12]]), np.array([[0, 0, 24 * scale, 28 * scale]]))
        inp = base.clone()
        inp[0, :, 10:14, 12:16] = patch[0]
        truth = model(inp)[0]
        ly, lx = (int(v) for v in lo[0])
        h, w = out.shape[-2:]
        y1, x1 = min(truth.shape[-2], ly + h), min(truth.shape[-1], lx + w)
        torch.testing.assert_close(out[0, :, max(0, -ly):y1 - ly, max(0, -lx):x1 - lx],
                                   truth[:, max(0, ly):y1, max(0, lx):x1], atol=1e-4, rtol=1e-5)
