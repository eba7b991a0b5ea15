"""One pass over blocks x draws for every tile of a causal field (:mod:`cem_fast.field`).

The blocks that can reach some tile are cut into square chunks. A chunk is a plan of its own whose ROIs are the
tiles its blocks can reach (:func:`chunk_plan`; the engine chosen once for the field, its tables rebuilt for them),
so that each intervention runs once and is scored against the tiles it can change only, kept as sparse
(tile, block) pairs. The coarse-to-fine gate is per (block, tile), as a single run's is
per block, and a block's fine draws serve every tile that gated it. A chunk is the unit that is written, checked
and resumed (:mod:`cem_fast.field_store`); what is held at once is one chunk's scores, whatever the image's size.
Since draws are keyed by (seed, block, draw), each tile's map is the one its single run gives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..geometry import ROI, BlockGrid
from ..locality import LocalityPlan
from .plan import RunPlan
from .runner import Runner
from .samples import Samples
from .stages import sample_stages

SCORE_BYTES = 8  # a runner's scores are float64 per (intervention, tile)
MAX_CHUNK_SIDE = 16  # blocks: a kill loses at most one chunk (256 blocks x draws), tables and batches stay full


def field_tiles(out_h: int, out_w: int, tile: int) -> list[ROI]:
    """Every ``tile x tile`` tile of an output, row-major, the ragged ones at the right and bottom edges
    included (unlike :func:`cem_fast.roi_grid`, which keeps full tiles only)."""
    return [ROI(y, x, min(tile, out_h - y), min(tile, out_w - x))
            for y in range(0, out_h, tile) for x in range(0, out_w, tile)]


def tile_shape(out_h: int, out_w: int, tile: int) -> tuple[int, int]:
    """(tile rows, tile cols) of :func:`field_tiles`."""
    return math.ceil(out_h / tile), math.ceil(out_w / tile)


def chunk_side(grid: BlockGrid, tile: int, n_tiles: int, halo_px: Optional[int], draws: int,
               max_bytes: int) -> int:
    """The side, in blocks, of the square chunks: at most :data:`MAX_CHUNK_SIDE`, and small enough that one
    chunk's scores (interventions x the tiles it can reach, ``halo_px`` beyond its blocks; None: all of them)
    take at most a quarter of ``max_bytes`` (the rest is for the model and the engine); at least 1."""
    side = MAX_CHUNK_SIDE
    while side > 1:
        if halo_px is None:
            touched = n_tiles
        else:
            across = -(-(side * grid.block + 2 * halo_px) // tile) + 1
            touched = min(n_tiles, across * across)
        if side * side * max(1, draws) * touched * SCORE_BYTES <= max_bytes // 4:
            break
        side -= 1
    return side


def block_chunks(grid: BlockGrid, reachable: np.ndarray, side: int) -> list[np.ndarray]:
    """The reachable blocks (flat ids, ascending) of each ``side x side`` square of blocks, row-major; squares
    with no reachable block are left out."""
    ids = np.arange(grid.num_blocks).reshape(grid.rows, grid.cols)
    keep = reachable.reshape(grid.rows, grid.cols)
    chunks = []
    for r in range(0, grid.rows, side):
        for c in range(0, grid.cols, side):
            blocks = ids[r:r + side, c:c + side][keep[r:r + side, c:c + side]]
            if len(blocks):
                chunks.append(np.sort(blocks))
    return chunks


@dataclass
class ChunkSamples:
    """What one chunk gave, per (tile, block) pair the block can reach: the estimate (``effect``, ``se``,
    ``draws``, ``df``, as :meth:`.samples.Samples.estimate`), whether the tile gated the block, and the samples
    (ROI PSNRs): ``coarse`` (P, coarse), ``fine`` (P, fine) NaN where the tile did not gate the block.
    ``forwards``: the interventions the chunk ran."""

    tiles: np.ndarray
    blocks: np.ndarray
    effect: np.ndarray
    se: np.ndarray
    draws: np.ndarray
    df: np.ndarray
    gated: np.ndarray
    coarse: np.ndarray
    fine: np.ndarray
    forwards: int

    ARRAYS = ("tiles", "blocks", "effect", "se", "draws", "df", "gated", "coarse", "fine")

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.ARRAYS}


def chunk_plan(plan: RunPlan, reach: np.ndarray, chunk: np.ndarray) -> tuple[RunPlan, np.ndarray]:
    """(the plan of one chunk, the tiles its blocks can reach): its ROIs are those tiles, its reach theirs cut to
    the chunk's blocks. ``reach``: (n_tiles, blocks) bool."""
    g = plan.grid
    tiles = np.flatnonzero(reach[:, chunk].any(1))
    own = np.zeros(g.num_blocks, dtype=bool)
    own[chunk] = True
    sub = (reach[tiles] & own).reshape(len(tiles), g.rows, g.cols)
    locality = LocalityPlan(sub, plan.locality.window, plan.locality.info)
    return plan.but(rois=[plan.rois[t] for t in tiles], locality=locality), tiles


def sample_chunk(plan: RunPlan, tiles: np.ndarray, runner_for: Callable[[RunPlan], Runner],
                 psnr_origin: np.ndarray, coarse: int, fine: int, tol: float, covariates=None) -> ChunkSamples:
    """Run one chunk's blocks (coarse for each, fine for those some tile gated) and keep the (tile, block) pairs
    they can reach. ``plan``: the chunk's (:func:`chunk_plan`), ``tiles`` its tiles (global indices);
    ``runner_for(plan)``: a runner of a plan; ``psnr_origin``: (n_tiles,) Y(I) of every tile.

    Coarse-to-fine runs its fine stage on the gated pairs only (:meth:`Runner.narrow_to`): a block's fine draws
    compute what it changes in the tiles that gated it, not in every tile it reaches."""
    n = len(tiles)
    if not n:
        return _empty(coarse, fine)
    reach = plan.locality.reach.reshape(n, -1)
    runner = runner_for(plan)
    s = sample_stages(runner, plan.grid, reach, psnr_origin[tiles], coarse, fine, tol, covariates=covariates)
    return _pairs(s, tiles, reach, coarse, fine, runner.forwards)


def _pairs(s: Samples, tiles: np.ndarray, reach: np.ndarray, coarse: int, fine: int, forwards: int) -> ChunkSamples:
    """The (tile, block) pairs of a chunk's samples ``s``: estimates, gate and samples."""
    nb = reach.shape[1]
    coarse_row, fine_row = _rows(s.run, nb), _rows(s.fine_run, nb)
    parts = []
    for j in range(len(tiles)):
        blocks = np.flatnonzero(reach[j])
        effect, se, draws, df = (a[blocks] for a in s.estimate(j))
        gated = s.gated[j][blocks]
        c_vals = s.coarse[j][coarse_row[blocks]] if coarse else np.zeros((len(blocks), 0))
        f_vals = np.full((len(blocks), fine), np.nan)
        if fine:
            has = gated & (fine_row[blocks] >= 0)
            f_vals[has] = s.fine[j][fine_row[blocks[has]]]
        parts.append((np.full(len(blocks), tiles[j]), blocks, effect, se, draws, df, gated, c_vals, f_vals))
    cols = [np.concatenate(a) for a in zip(*parts)]
    dtypes = (np.int32, np.int32, np.float64, np.float64, np.int32, np.float64, bool, np.float64, np.float64)
    return ChunkSamples(*(c.astype(t, copy=False) for c, t in zip(cols, dtypes)), forwards=forwards)


def _rows(blocks: np.ndarray, num_blocks: int) -> np.ndarray:
    """block id -> its row in ``blocks`` (-1 where absent)."""
    rows = np.full(num_blocks, -1, dtype=np.int64)
    rows[blocks] = np.arange(len(blocks))
    return rows


def _empty(coarse: int, fine: int) -> ChunkSamples:
    z = np.zeros(0)
    return ChunkSamples(z.astype(np.int32), z.astype(np.int32), z, z, z.astype(np.int32), z, z.astype(bool),
                        np.zeros((0, coarse)), np.zeros((0, fine)), forwards=0)
