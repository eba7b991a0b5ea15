"""Property tests (hypothesis) of the geometry and the reference ops over random shapes, blocks, ROIs, windows."""
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cem_fast.geometry import ROI, BlockGrid
from cem_fast.reference import intervene_ref, roi_psnr_ref
from helpers import naive_intervene

# derandomize: the same examples on every run, so CI cannot turn red by chance
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def grids(draw):
    scale = draw(st.sampled_from([1, 2, 4]))
    block = scale * draw(st.integers(1, 4))
    out_h = scale * draw(st.integers(max(1, block // scale), 40))
    out_w = scale * draw(st.integers(max(1, block // scale), 40))
    return BlockGrid(out_h, out_w, block, scale)


@SETTINGS
@given(grids())
def test_blocks_tile_the_input_exactly_once(g):
    cover = torch.zeros(g.in_h, g.in_w, dtype=torch.int32)
    for (y, x), (h, w) in zip(g.input_origins().tolist(), g.input_sizes().tolist()):
        assert 0 < h <= g.in_block and 0 < w <= g.in_block
        cover[y:y + h, x:x + w] += 1
    assert bool((cover == 1).all())
    assert g.rows == math.ceil(g.out_h / g.block) and g.cols == math.ceil(g.out_w / g.block)


@SETTINGS
@given(grids(), st.data())
def test_roi_blocks_are_exactly_the_overlapping_blocks(g, data):
    y = data.draw(st.integers(0, g.out_h - 1))
    x = data.draw(st.integers(0, g.out_w - 1))
    roi = ROI(y, x, data.draw(st.integers(1, g.out_h - y)), data.draw(st.integers(1, g.out_w - x)))
    roi.check_inside(g.out_h, g.out_w)
    mask = g.roi_blocks(roi)
    b = g.block
    for r in range(g.rows):
        for c in range(g.cols):
            overlap = r * b < y + roi.height and y < (r + 1) * b and c * b < x + roi.width and x < (c + 1) * b
            assert bool(mask[r, c]) == overlap


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


@SETTINGS
@given(st.data())
def test_roi_psnr_matches_numpy(data):
    H, W = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 16))
    y, x = data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1))
    roi = ROI(y, x, data.draw(st.integers(1, H - y)), data.draw(st.integers(1, W - x)))
    rs = np.random.RandomState(data.draw(st.integers(0, 2 ** 31 - 1)))
    out = rs.uniform(-0.2, 1.2, (2, 3, H, W)).astype(np.float32)
    gt = rs.randint(0, 256, (3, H, W)).astype(np.uint8)
    # the convention quantises in float32 (the model's dtype): x255 rounded to float32, then to the nearest level
    q = np.round(np.clip(out, 0, 1) * np.float32(255)).astype(np.float64)[:, :, y:y + roi.height, x:x + roi.width]
    mse = ((q - gt[:, y:y + roi.height, x:x + roi.width]) ** 2).reshape(2, -1).mean(1)
    with np.errstate(divide="ignore"):
        want = 10 * np.log10(255.0 ** 2 / mse)
    target = torch.from_numpy(gt[:, y:y + roi.height, x:x + roi.width].copy())
    got = roi_psnr_ref(torch.from_numpy(out), target, roi).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), dilation=st.integers(1, 3), block=st.sampled_from([4, 8]),
       h=st.integers(16, 72), w=st.integers(16, 72), data=st.data())
def test_probe_reach_is_the_receptive_field(n, dilation, block, h, w, data):
    """Any conv stack, image size (partial edge blocks included) and ROI: the probed reach is exactly the blocks
    within the receptive field, and the plan is verified."""
    from helpers import ConvStack, probe, reach_from_radius, tight_window
    rh, rw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    y, x = data.draw(st.integers(0, h - rh)), data.draw(st.integers(0, w - rw))
    plan, grid = probe(ConvStack(n, dilation), (h, w), block, [(y, x, rh, rw)])
    want = reach_from_radius(grid, ROI(y, x, rh, rw), n * dilation)
    assert np.array_equal(plan.reach[0], want), plan.info
    crop = tight_window(ROI(y, x, rh, rw), n * dilation, h, w, step=dilation)
    whole = (crop.h, crop.w) == (h, w)  # every pixel needed: nothing to gain
    assert plan.window == (None if whole else crop) and plan.active == (not want.all() or not whole)
