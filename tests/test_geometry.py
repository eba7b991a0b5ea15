import pytest
import torch

from cem_fast.geometry import ROI, BlockGrid


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
