"""The Captum adapter (cem_fast.captum.CausalEffect): the same maps as cem_fast.causal_effect_map for the same seed,
spread over each block's pixels like Captum's Occlusion; Captum's arguments; one-line errors. Skipped where Captum
is not installed (pip install "cem_fast[captum]"), except the test of the import error itself."""
import importlib
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cem_fast

DRAWS = dict(coarse=2, fine=3)  # few draws: each map takes a fraction of a second


@pytest.fixture(scope="module")
def CausalEffect():
    pytest.importorskip("captum", minversion="0.9",
                        reason='captum >= 0.9 is not installed (pip install "cem_fast[captum]")')
    from cem_fast.captum import CausalEffect
    return CausalEffect


def images(n=1, h=48, w=48, seed=0, dtype=torch.float64):
    """(n, 3, h, w) random uint8 images as floats in [0, 1]."""
    a = np.random.RandomState(seed).randint(0, 256, (n, 3, h, w)).astype(np.uint8)
    return torch.from_numpy(a).to(dtype) / 255


def block_values(attr: torch.Tensor, block: int, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols) values of a (3, H, W) attribution, after checking that each block is constant."""
    out = torch.empty(rows, cols, dtype=attr.dtype)
    for r in range(rows):
        for c in range(cols):
            tile = attr[:, r * block:(r + 1) * block, c * block:(c + 1) * block]
            assert (tile == tile.reshape(-1)[0]).all(), f"block ({r}, {c}) is not constant"
            out[r, c] = tile.reshape(-1)[0]
    return out


def shown(block_map: np.ndarray, res) -> torch.Tensor:
    """A result's map as the attributions show it by default: the ROI's own blocks 0."""
    return torch.from_numpy(np.where(res.roi_mask, 0.0, block_map))


def test_dn_same_map_as_causal_effect_map(CausalEffect, tiny_net):
    x = images()
    ce = CausalEffect(tiny_net, task="DN", sigma=25, **DRAWS)
    attr, results = ce.attribute(x, target=(16, 16, 16), seed=7, return_results=True)
    ref = cem_fast.causal_effect_map(tiny_net, x[0], "DN", roi=(16, 16, 16), sigma=25, seed=7, **DRAWS)
    assert attr.shape == x.shape and attr.dtype == x.dtype
    assert np.array_equal(results[0].cem, ref.cem) and np.array_equal(results[0].effect, ref.effect)
    assert results[0].psnr_origin == ref.psnr_origin and ce.last_results[0] is results[0]
    vals = block_values(attr[0], 8, 6, 6)
    assert torch.equal(vals, shown(ref.cem, ref))  # float64 inputs: bit-identical
    assert (shown(ref.cem, ref) != 0).any() and (ref.cem == 0).any()  # a map, with blocks under tol
    # values="effect": the unthresholded map
    eff = ce.attribute(x, target=(16, 16, 16), seed=7, values="effect")
    assert torch.equal(block_values(eff[0], 8, 6, 6), shown(ref.effect, ref))
    # include_roi=True: the ROI's own blocks too
    whole = ce.attribute(x, target=(16, 16, 16), seed=7, include_roi=True)
    assert torch.equal(block_values(whole[0], 8, 6, 6), torch.from_numpy(ref.cem))
    assert (block_values(whole[0], 8, 6, 6)[torch.from_numpy(ref.roi_mask)] != 0).all()
    # another seed, another map
    other = ce.attribute(x, target=(16, 16, 16), seed=8)
    assert not torch.equal(other, attr)


def test_sr_same_map_and_layout_off_the_grid(CausalEffect):
    """SR x4 with the bicubic model on a 50x46 image: the clean image is cropped to 48x44 (a multiple of the
    scale), the grid has 6x6 blocks (the last column 4 px wide); the cropped pixels get 0."""
    model = cem_fast.load_model("bicubic:x4")[0]
    x = images(h=50, w=46, seed=1, dtype=torch.float32)
    attr, (res,) = CausalEffect(model, "SR", scale=4, **DRAWS).attribute(x, target=(16, 12, 16, 12), seed=3,
                                                                         return_results=True)
    ref = cem_fast.causal_effect_map(model, x[0], "SR", scale=4, roi=(16, 12, 16, 12), seed=3, **DRAWS)
    assert np.array_equal(res.cem, ref.cem) and ref.cem.shape == (6, 6)
    assert (ref.cem != 0).any()
    assert attr.shape == (1, 3, 50, 46) and attr.dtype == torch.float32
    expected = shown(ref.cem, ref).float().repeat_interleave(8, 0).repeat_interleave(8, 1)[:48, :44]
    for c in range(3):
        assert torch.equal(attr[0, c, :48, :44], expected)
    assert (attr[0, :, 48:, :] == 0).all() and (attr[0, :, :, 44:] == 0).all()


def test_batch_of_two_with_two_targets(CausalEffect, tiny_net):
    x = images(2, seed=2)
    rois = [(16, 16, 16), (4, 28, 8, 12)]
    ce = CausalEffect(tiny_net, task="DN", sigma=25, **DRAWS)
    attr, results = ce.attribute(x, target=rois, seed=1, return_results=True)
    assert attr.shape == x.shape and len(results) == 2
    for i, roi in enumerate(rois):
        ref = cem_fast.causal_effect_map(tiny_net, x[i], "DN", roi=roi, sigma=25, seed=1, **DRAWS)
        assert np.array_equal(results[i].cem, ref.cem)
        assert torch.equal(block_values(attr[i], 8, 6, 6), shown(ref.cem, ref))
    # one ROI (here a tensor) for every image: each image gets its own map of that ROI
    same = ce.attribute(x, target=torch.tensor([16, 16, 16]), seed=1)
    assert torch.equal(same[0], attr[0]) and not torch.equal(same[1], attr[1])
    # per-image ROIs as an (N, 4) tensor, or as a list of arrays: the same maps
    as_tensor = ce.attribute(x, target=torch.tensor([[16, 16, 16, 16], [4, 28, 8, 12]]), seed=1)
    as_arrays = ce.attribute(x, target=[np.array(r) for r in rois], seed=1)
    assert torch.equal(as_tensor, attr) and torch.equal(as_arrays, attr)


def test_perturbations_per_eval_does_not_change_the_result(CausalEffect, tiny_net):
    x = images(seed=3)
    ce = CausalEffect(tiny_net, task="DN", sigma=25, seed=4, **DRAWS)
    runs = [ce.attribute(x, target=(8, 8, 16), perturbations_per_eval=p) for p in (1, 7, "auto")]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert ce.last_results[0].extra["final_batch_size"] != 1  # "auto" ran other batches


def test_captum_conventions(CausalEffect, tiny_net):
    from captum.attr import PerturbationAttribution
    ce = CausalEffect(tiny_net, task="identity", **DRAWS)
    assert isinstance(ce, PerturbationAttribution) and ce.forward_func is tiny_net
    assert ce.multiplies_by_inputs and not ce.has_convergence_delta()
    x = images(seed=4, dtype=torch.float32)
    out = ce.attribute((x,), target=(16, 16, 16), show_progress=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == x.shape  # tuple in, tuple out
    # uint8 inputs are accepted (float32 attributions) and give the same map
    as_u8 = ce.attribute(torch.round(x * 255).to(torch.uint8), target=(16, 16, 16))
    assert as_u8.dtype == torch.float32 and torch.equal(as_u8, out[0])


def _smooth(x, k):
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)


class Smooth3(torch.nn.Module):
    def forward(self, x):
        return _smooth(x, 3)


def test_plain_callable_and_additional_forward_args(CausalEffect):
    x = images(seed=5)
    attr, (res,) = CausalEffect(_smooth, task="DN", sigma=25, **DRAWS).attribute(
        x, target=(16, 16, 16), additional_forward_args=3, seed=2, return_results=True)
    ref = cem_fast.causal_effect_map(Smooth3(), x[0], "DN", roi=(16, 16, 16), sigma=25, seed=2, **DRAWS)
    assert np.array_equal(res.cem, ref.cem) and res.model_name == "_smooth"
    assert torch.equal(block_values(attr[0], 8, 6, 6), shown(ref.cem, ref))


def test_bound_forward_method(CausalEffect, tiny_net):
    """``model.forward`` (a common Captum forward_func) runs as the model itself: same map, same name."""
    x = images(seed=6)
    _, (res,) = CausalEffect(tiny_net.forward, task="DN", sigma=25, **DRAWS).attribute(
        x, target=(16, 16, 16), return_results=True)
    ref = cem_fast.causal_effect_map(tiny_net, x[0], "DN", roi=(16, 16, 16), sigma=25, **DRAWS)
    assert np.array_equal(res.cem, ref.cem) and res.model_name == ref.model_name == "TinyNet"


@pytest.mark.parametrize("call, words", [
    (lambda ce, x: ce.attribute(x[0], target=(0, 0, 8)), ["inputs", "(N, 3, H, W)", "(3, 48, 48)"]),
    (lambda ce, x: ce.attribute(x[:, :1], target=(0, 0, 8)), ["inputs", "(1, 1, 48, 48)"]),
    (lambda ce, x: ce.attribute(x * 2, target=(0, 0, 8)), ["inputs", "[0, 1]", "got values in [0"]),
    (lambda ce, x: ce.attribute(x * float("nan"), target=(0, 0, 8)), ["inputs", "non-finite"]),
    (lambda ce, x: ce.attribute((x, x), target=(0, 0, 8)), ["inputs", "a tuple of 2"]),
    (lambda ce, x: ce.attribute(x), ["target", "(y, x, size)", "got None"]),
    (lambda ce, x: ce.attribute(torch.cat([x, x]), target=[(0, 0, 8)] * 3),
     ["target", "list of 2", "got a list of 3"]),
    (lambda ce, x: ce.attribute(x, target=(0, 0)), ["target", "2 numbers"]),
    (lambda ce, x: ce.attribute(x, target=(40, 40, 16)), ["target", "inside the 48x48 output"]),
    (lambda ce, x: ce.attribute(x, target=(0, 0, 8), perturbations_per_eval=0), ["perturbations_per_eval", "got 0"]),
    (lambda ce, x: ce.attribute(x, target=(0, 0, 8), values="map"), ["values", "cem, effect", "'map'"]),
    (lambda ce, x: ce.attribute(x, target=(0, 0, 8), include_roi="yes"), ["include_roi", "True or False"]),
    (lambda ce, x: ce.attribute(x, target=(0, 0, 8), batch_size=4), ["batch_size", "perturbations_per_eval"]),
    (lambda ce, x: ce.attribute(x, target=(0, 0, 8), block=0), ["block", "got 0"]),
])
def test_errors_are_one_line(CausalEffect, tiny_net, call, words):
    ce = CausalEffect(tiny_net, task="DN", sigma=25, **DRAWS)
    with pytest.raises((ValueError, TypeError)) as e:
        call(ce, images())
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_constructor_errors_are_one_line(CausalEffect):
    for make, word in [(lambda: CausalEffect("bicubic:x4"), "forward_func"),
                       (lambda: CausalEffect(torch.nn.Identity(), values="both"), "values"),
                       (lambda: CausalEffect(torch.nn.Identity(), roi=(0, 0, 8)), "target")]:
        with pytest.raises((ValueError, TypeError)) as e:
            make()
        assert "\n" not in str(e.value) and word in str(e.value), str(e.value)


def test_import_error_says_how_to_install(monkeypatch):
    """Without Captum, importing cem_fast.captum says how to install it (runs whether Captum is installed or not)."""
    for name in [m for m in sys.modules if m == "captum" or m.startswith("captum.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "captum", None)  # import captum -> ImportError
    monkeypatch.delitem(sys.modules, "cem_fast.captum", raising=False)
    with pytest.raises(ImportError) as e:
        importlib.import_module("cem_fast.captum")
    msg = str(e.value)
    assert 'pip install "cem_fast[captum]"' in msg and "\n" not in msg, msg
    monkeypatch.delitem(sys.modules, "cem_fast.captum", raising=False)


def render_heat_map(attr: torch.Tensor) -> np.ndarray:
    """Captum's own visualiser (heat map, both signs) of a (3, H, W) attribution, rendered by matplotlib: the RGB
    pixels of its axes, (h, w, 3) int."""
    from captum.attr import visualization as viz
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig, ax = viz.visualize_image_attr(attr.permute(1, 2, 0).numpy(), method="heat_map", sign="all",
                                       use_pyplot=False, fig_size=(4, 4))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)
    box = ax.get_window_extent()
    top = rgb.shape[0]
    return rgb[int(top - box.y1):int(top - box.y0), int(box.x0):int(box.x1)]


def test_captums_visualiser_shows_the_blocks_around_the_roi(CausalEffect, tiny_net):
    """By default the ROI's own blocks (several dB) are 0 in the attributions, so Captum's heat map shows the
    blocks around the ROI; with include_roi=True it shows one square on the ROI and the rest (0.01-0.1 dB) white."""
    x = images()
    ce = CausalEffect(tiny_net, task="DN", sigma=25, **DRAWS)
    attr, (res,) = ce.attribute(x, target=(16, 16, 16), seed=0, return_results=True)
    around = (res.cem != 0) & ~res.roi_mask
    assert around.sum() >= 3 and np.abs(res.cem[res.roi_mask]).min() > 10 * np.abs(res.cem[around]).max()

    def coloured_blocks(picture: np.ndarray) -> np.ndarray:
        """(6, 6) bool: the centre of each 8x8 block is not white (white is 0 on Captum's red-white-green map)."""
        h, w = picture.shape[:2]
        centres = picture[((np.arange(6) * 8 + 4) * h / 48).astype(int)][:, ((np.arange(6) * 8 + 4) * w / 48)
                                                                            .astype(int)]
        return np.abs(centres - 255).max(-1) > 10

    shown_default = coloured_blocks(render_heat_map(attr[0]))
    assert shown_default[around].all() and not shown_default[res.roi_mask].any()
    assert not shown_default[(res.cem == 0) & ~res.roi_mask].any()
    whole = ce.attribute(x, target=(16, 16, 16), seed=0, include_roi=True)
    shown_whole = coloured_blocks(render_heat_map(whole[0]))
    assert shown_whole[res.roi_mask].all() and not shown_whole[~res.roi_mask].any()  # one square, nothing else
