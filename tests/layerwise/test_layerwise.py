"""cem_fast.layerwise: each change recomputed layer by layer on its rectangles equals the model run on the whole
(changed) input, for the supported ops at scale 1 and through upscaling, at the image's edges; what it cannot
compute exactly is refused with the reason, in one line."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cem_fast.layerwise import LayerwiseGraph, Unsupported
from model_factories import RandomNet, Reflect, TinySR


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
    engine = LayerwiseGraph(model)
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
    engine = LayerwiseGraph(model)
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
        LayerwiseGraph(model)


class PicksTheBatch(torch.nn.Module):
    def forward(self, x):
        return x[:1] * 0.5 + x * 0.5


def test_an_op_across_the_batch_is_refused():
    with pytest.raises(Unsupported, match="unsupported function getitem"):
        LayerwiseGraph(PicksTheBatch())


@settings(max_examples=20, deadline=None)
@given(scale=st.sampled_from([2, 4]), mode=st.sampled_from(["nearest", "bilinear", "bicubic"]),
       h=st.integers(6, 20), w=st.integers(6, 20), fb=st.sampled_from([2, 4]), seed=st.integers(0, 1000))
def test_upscaling_rectangles_equal_the_model_on_the_whole_intervened_input(scale, mode, h, w, fb, seed):
    """Pixel shuffles and interpolations (whose reads clamp at the image's edge) on rectangles, footprints also at
    the edge: the needed output rectangle equals the whole-image model's."""
    model = TinySR(scale, mode, seed=seed).eval()
    g = np.random.RandomState(seed)
    base = torch.from_numpy(g.rand(1, 3, h, w).astype(np.float32))
    engine = LayerwiseGraph(model)
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
            LayerwiseGraph(model)
        assert "\n" not in str(e.value)
        return
    engine = LayerwiseGraph(model)
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
