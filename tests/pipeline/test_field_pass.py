"""cem_fast.pipeline.field_pass: the tiles (ragged ones included), the chunks (every reachable block in exactly
one), and a chunk's size bounded by the memory it may take."""
import numpy as np
import pytest

from cem_fast.geometry import BlockGrid
from cem_fast.pipeline.field_pass import MAX_CHUNK_SIDE, SCORE_BYTES, block_chunks, chunk_side, field_tiles, tile_shape


@pytest.mark.parametrize("h, w, tile", [(64, 64, 32), (72, 80, 16), (5, 7, 32), (33, 100, 32)])
def test_tiles_cover_the_output_once_ragged_edges_included(h, w, tile):
    tiles = field_tiles(h, w, tile)
    assert len(tiles) == np.prod(tile_shape(h, w, tile))
    cover = np.zeros((h, w), dtype=int)
    for r in tiles:
        assert 1 <= r.height <= tile and 1 <= r.width <= tile
        ys, xs = r.slices()
        cover[ys, xs] += 1
    assert (cover == 1).all()


def test_chunks_hold_every_reachable_block_exactly_once(rng):
    grid = BlockGrid(75, 61, 8)  # 10 x 8 blocks, ragged
    reachable = rng.rand(grid.num_blocks) < 0.7
    for side in (1, 3, 4, 100):
        chunks = block_chunks(grid, reachable, side)
        blocks = np.concatenate(chunks)
        np.testing.assert_array_equal(np.sort(blocks), np.flatnonzero(reachable))
        for c in chunks:  # each chunk inside one side x side square of blocks
            r, k = np.divmod(c, grid.cols)
            assert r.max() - r.min() < side and k.max() - k.min() < side


def test_a_chunk_scores_fit_a_quarter_of_the_memory_given():
    """Its scores: interventions x the tiles it can reach (its blocks grown by the halo), or every tile."""
    grid = BlockGrid(1024, 1024, 8)
    for tiles, halo, draws, memory in [(1024, 24, 53, 2 << 30), (4096, None, 53, 256 << 20), (16, 8, 3, 1 << 20),
                                       (1024, 24, 53, 1), (1024, 24, 53, 40 << 20)]:
        side = chunk_side(grid, 32, tiles, halo, draws, memory)
        assert 1 <= side <= MAX_CHUNK_SIDE
        touched = tiles if halo is None else min(tiles, (-(-(side * 8 + 2 * halo) // 32) + 1) ** 2)
        if side > 1:
            assert side * side * draws * touched * SCORE_BYTES <= memory // 4
        if side < MAX_CHUNK_SIDE:  # one more block a side would not fit
            bigger = tiles if halo is None else min(tiles, (-(-((side + 1) * 8 + 2 * halo) // 32) + 1) ** 2)
            assert (side + 1) ** 2 * draws * bigger * SCORE_BYTES > memory // 4
