import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cem_fast import geometry
from cem_fast.geometry import ROI, BlockGrid
from helpers import dim_run, hypothesis_settings, one_line, random_bank


def test_non_square_grid_has_partial_edge_blocks():
    g = BlockGrid(out_h=100, out_w=70, block=8)
    assert (g.rows, g.cols) == (13, 9)
    sizes = g.input_sizes().view(13, 9, 2)
    origins = g.input_origins().view(13, 9, 2)
    assert sizes[-1, 0].tolist() == [4, 8]   # 100 = 12*8 + 4
    assert sizes[0, -1].tolist() == [8, 6]   # 70 = 8*8 + 6
    assert origins[12, 8].tolist() == [96, 64]
    # the blocks tile the image exactly once
    cover = torch.zeros(100, 70, dtype=torch.int32)
    for (y, x), (h, w) in zip(g.input_origins().tolist(), g.input_sizes().tolist()):
        cover[y:y + h, x:x + w] += 1
    assert torch.equal(cover, torch.ones_like(cover))


def test_sr_grid_maps_output_blocks_to_input_pixels():
    g = BlockGrid(out_h=64, out_w=40, block=8, scale=4)
    assert g.in_block == 2 and (g.in_h, g.in_w) == (16, 10)
    assert (g.rows, g.cols) == (8, 5)
    assert g.input_origins()[6].tolist() == [2, 2]  # block (1, 1) starts at input (2, 2)


def test_sr_grid_partial_edge_block():
    g = BlockGrid(out_h=20, out_w=12, block=8, scale=4)  # 20 = 2*8 + 4 output px -> last block 1 input px
    assert g.input_sizes().view(g.rows, g.cols, 2)[-1, -1].tolist() == [1, 1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(out_h=64, out_w=64, block=6, scale=4), "multiple of the scale"),
    (dict(out_h=62, out_w=64, block=8, scale=4), "output 62x64 must be a multiple"),
    (dict(out_h=4, out_w=64, block=8), "at least one block"),
    (dict(out_h=64, out_w=64, block=0), "block must be a positive"),
])
def test_bad_grids_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockGrid(**kwargs)


def test_roi_forms_and_checks():
    assert ROI.parse((152, 96, 32)) == ROI(152, 96, 32, 32)
    assert ROI.parse([1, 2, 3, 4]) == ROI(1, 2, 3, 4)
    assert ROI.parse({"y": 1, "x": 2, "size": 5}) == ROI(1, 2, 5, 5)
    assert ROI.parse("10, 20, 8") == ROI(10, 20, 8, 8)
    with pytest.raises(ValueError, match="must lie inside the 128x128 output"):
        ROI(152, 96, 32, 32).check_inside(128, 128)
    with pytest.raises(ValueError, match="positive"):
        ROI.parse((0, 0, 0))
    with pytest.raises(ValueError, match=r"\(y, x, size\)"):
        ROI.parse((1, 2))


def test_roi_blocks_match_a_naive_overlap_test():
    g = BlockGrid(50, 37, 8)
    roi = ROI(13, 5, 11, 20)
    mask = g.roi_blocks(roi)
    for r in range(g.rows):
        for c in range(g.cols):
            overlap = (r * 8 < roi.y + roi.height and roi.y < r * 8 + 8
                       and c * 8 < roi.x + roi.width and roi.x < c * 8 + 8)
            assert bool(mask[r, c]) == overlap, (r, c)


# ---- property tests (hypothesis): random shapes, blocks and ROIs -----------------------------------------------------

SETTINGS = hypothesis_settings()


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


# ---- images too small for a block or the ROI -------------------------------------------------------------------------

@pytest.fixture
def bank(rng):
    return random_bank(rng, 8)


def test_image_smaller_than_a_block_or_the_roi(bank, rng):
    tiny = rng.randint(0, 256, (6, 6, 3)).astype(np.uint8)
    with pytest.raises(ValueError, match="image 6x6 must be at least one block") as e:
        dim_run(tiny, bank)
    one_line(e)
    small = rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)
    with pytest.raises(ValueError, match=r"roi \(y=0, x=0, 32x32\) must lie inside the 16x16 output"):
        dim_run(small, bank, roi=(0, 0, 32))


# ---- the many-ROI finiteness check in one pass -----------------------------------------------------------------------

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
