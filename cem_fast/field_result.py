"""A causal field's result: each tile's CEM on demand, per-tile metrics as maps over the image, and saving.

The field holds the per-(tile, block) estimates (a few numbers per pair: small, whatever the image) and reads a
tile's samples from the chunk files that hold them when its map is asked for (:mod:`cem_fast.field_store`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .fileio import atomic_write
from .geometry import ROI
from .metrics import INTERVAL_METRICS, SCALAR_METRICS, map_metrics
from .result import CEMResult, Deferred

FIELD_DATA = "field.npz"
# what field.metric() gives: every per-map metric of cem_fast.metrics with one value per tile
FIELD_METRICS = SCALAR_METRICS + INTERVAL_METRICS


@dataclass
class FieldData:
    """What a field computed: the tiles (row-major, ``shape`` = (tile rows, tile cols)), Y(I) per tile, the
    per-(tile, block) estimates ``pairs`` (arrays ``tiles``, ``blocks``, ``chunk``, ``effect``, ``se``, ``draws``,
    ``df``, ``gated``), what the run was (``info``), and the pictures' images (uint8)."""

    tiles: list[ROI]
    shape: tuple[int, int]
    tile: int
    psnr_origin: np.ndarray
    pairs: dict[str, np.ndarray]
    info: dict[str, Any]
    gt: torch.Tensor
    degraded: torch.Tensor
    output: torch.Tensor
    covariate_table: Optional[np.ndarray] = None
    by_tile: dict = field(default_factory=dict, repr=False)

    def pair_rows(self, j: int) -> np.ndarray:
        """Rows of ``pairs`` that belong to tile j (indexed once, on first use)."""
        if not self.by_tile:
            t = self.pairs["tiles"]
            order = np.argsort(t, kind="stable")
            starts = np.searchsorted(t[order], np.arange(len(self.tiles) + 1))
            self.by_tile["order"], self.by_tile["starts"] = order, starts
        s = self.by_tile["starts"]
        return self.by_tile["order"][s[j]:s[j + 1]]


class CausalField:
    """The CEM of every tile of an image (:func:`cem_fast.causal_field`)."""

    def __init__(self, data: FieldData, store=None, side: int = 0, held: Optional[list] = None):
        self.data, self.store, self.side, self._held = data, store, side, held
        self._metrics: Optional[dict[str, np.ndarray]] = None

    # what the field is
    @property
    def tiles(self) -> list[ROI]:
        return self.data.tiles

    @property
    def shape(self) -> tuple[int, int]:
        """(tile rows, tile cols)."""
        return self.data.shape

    @property
    def info(self) -> dict[str, Any]:
        return self.data.info

    def __repr__(self) -> str:
        i = self.info
        return (f"CausalField({self.shape[0]}x{self.shape[1]} tiles of {self.data.tile} px, model {i['model_name']}, "
                f"image {i['image_name']}, {i['num_forwards']:,} forwards)")

    # one tile's map
    def tile_index(self, y: int, x: int) -> int:
        """The index of the tile holding output pixel (y, x)."""
        H, W = self.data.gt.shape[-2:]
        for name, v, n in (("y", y, H), ("x", x, W)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n:
                raise ValueError(f"{name} must be an output pixel in [0, {n - 1}], got {v!r}")
        t = self.data.tile
        return int(y // t) * self.shape[1] + int(x // t)

    def map(self, y: int, x: int) -> CEMResult:
        """The CEMResult of the tile holding output pixel (y, x): what ``causal_effect_map(..., roi=tile)`` with the
        same seed gives (the tile's ROI is ``result.roi``)."""
        return self.tile_result(self.tile_index(y, x))

    def tile_result(self, j: int) -> CEMResult:
        """The CEMResult of tile j (row-major)."""
        d, i = self.data, self.info
        if not 0 <= j < len(d.tiles):
            raise ValueError(f"tile must be in [0, {len(d.tiles) - 1}], got {j}")
        rows, cols = i["grid"]
        sel = d.pair_rows(j)
        blocks = d.pairs["blocks"][sel]

        def dense(name: str, fill, dtype) -> np.ndarray:
            a = np.full(rows * cols, fill, dtype=dtype)
            a[blocks] = d.pairs[name][sel]
            return a.reshape(rows, cols)

        effect, se = dense("effect", 0.0, np.float64), dense("se", 0.0, np.float64)
        reach = np.zeros(rows * cols, dtype=bool)
        reach[blocks] = True
        origin = float(d.psnr_origin[j])
        c, f = i["coarse"], i["fine"]
        made: dict = {}

        def samples() -> tuple[np.ndarray, np.ndarray]:  # read once, for both arrays
            if not made:
                made["both"] = self._samples(j, rows, cols, origin)
            return made["both"]
        return CEMResult(
            cem=np.where(np.abs(effect) >= i["tol"], effect, 0.0), effect=effect,
            samples_coarse=Deferred((rows, cols, c), lambda: samples()[0]),
            samples_fine=Deferred((rows, cols, f), lambda: samples()[1]),
            # exhaustive mode gates every block, as a single run does
            gated=dense("gated", c == 0, bool), psnr_origin=origin, roi=d.tiles[j], block=i["block"],
            scale=i["scale"], tol=i["tol"], task=i["task"], seed=i["seed"], mode=i["mode"],
            model_name=i["model_name"], image_name=i["image_name"], num_forwards=i["num_forwards"],
            wall_time=i["timings_s"]["total"], backend=i["backend"], device=i["device"],
            patch_bank=i["patch_bank"], gt=d.gt, degraded=d.degraded, output=d.output,
            reachable=reach.reshape(rows, cols),
            extra={"field": {"tile_index": j, "tile": d.tile, "tiles": list(self.shape)},
                   "locality": i["locality"]},
            effect_se=se, effect_draws=dense("draws", 0, np.int64), effect_df=dense("df", 0.0, np.float64),
            estimator=i["estimator"], covariate_table=d.covariate_table)

    def _samples(self, j: int, rows: int, cols: int, origin: float) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols, coarse) and (rows, cols, fine) samples of tile j: Y(I) for blocks that cannot reach it,
        NaN in the fine stage where it did not gate the block (as a single run's)."""
        i = self.info
        chunks = sorted(set(self.data.pairs["chunk"][self.data.pair_rows(j)].tolist()))
        if self._held is not None:
            parts = [(h.blocks[h.tiles == j], h.coarse[h.tiles == j], h.fine[h.tiles == j])
                     for h in (self._held[k] for k in chunks)]
            blocks, co, fi = (np.concatenate(a) for a in zip(*parts)) if parts else \
                (np.zeros(0, np.int64), np.zeros((0, i["coarse"])), np.zeros((0, i["fine"])))
        else:
            blocks, co, fi = self.store.samples_of(self.side, chunks, j)
        coarse = np.full((rows * cols, i["coarse"]), origin)
        fine = np.full((rows * cols, i["fine"]), np.nan)
        coarse[blocks], fine[blocks] = co, fi
        if i["mode"] == "exhaustive":  # every block gated: those that cannot reach the tile hold Y(I)
            unreached = np.ones(rows * cols, dtype=bool)
            unreached[blocks] = False
            fine[unreached] = origin
        return coarse.reshape(rows, cols, -1), fine.reshape(rows, cols, -1)

    # metrics over the field
    def metrics(self, n_boot: int = 0, far_px: Optional[float] = None,
                progress: Optional[Callable[[int], None]] = None) -> dict[str, np.ndarray]:
        """Every per-map metric (:data:`FIELD_METRICS`) as a (tile rows, tile cols) array (NaN where a tile's map
        has none, a radius of a map with no mass). ``n_boot``: bootstrap draws per tile (0: the maps' own values;
        see :func:`cem_fast.metrics.map_metrics`)."""
        if self._metrics is not None and n_boot == 0 and far_px is None:
            return self._metrics
        out = {k: np.full(len(self.tiles), np.nan) for k in FIELD_METRICS}
        for j in range(len(self.tiles)):
            m = map_metrics(self.tile_result(j), far_px=far_px, n_boot=n_boot)
            for k in SCALAR_METRICS:
                out[k][j] = m[k]
            for k in INTERVAL_METRICS:
                v = m[k]["value"]
                out[k][j] = np.nan if v is None else v
            if progress is not None:
                progress(j)
        shaped = {k: v.reshape(self.shape) for k, v in out.items()}
        if n_boot == 0 and far_px is None:
            self._metrics = shaped
        return shaped

    def metric(self, name: str) -> np.ndarray:
        """(tile rows, tile cols): one metric of every tile's map (``radius90_px``, ``positive_share``,
        ``negative_share``, ``effect_range_db``, ``far_mass_share``, ...: :data:`FIELD_METRICS`)."""
        if name not in FIELD_METRICS:
            raise ValueError(f"metric must be one of {', '.join(FIELD_METRICS)}, got {name!r}")
        return self.metrics()[name]

    # files
    @classmethod
    def load(cls, out: "str | os.PathLike") -> "CausalField":
        """The field a finished :func:`cem_fast.causal_field` (or ``cem-fast field``) wrote to ``out``; its tiles'
        samples are read from the chunks, checked, when a map is asked for."""
        from .field_store import FieldStore, read_meta  # the store imports the pipeline: only when loading
        out = Path(out)
        meta = read_meta(out / "field.json")
        if meta.get("status") != "complete" or not (out / FIELD_DATA).is_file():
            raise ValueError(f"{out} holds no finished field (status {meta.get('status')!r}): run it again with the "
                             "same inputs to resume it")
        with np.load(out / FIELD_DATA, allow_pickle=False) as z:
            pairs = {k[len("pair_"):]: z[k] for k in z.files if k.startswith("pair_")}
            tiles = [ROI(*map(int, t)) for t in z["tiles"]]
            data = FieldData(tiles=tiles, shape=tuple(meta["shape"]), tile=int(meta["tile"]),
                             psnr_origin=z["psnr_origin"], pairs=pairs, info=meta["info"],
                             gt=torch.from_numpy(z["gt"]), degraded=torch.from_numpy(z["degraded"]),
                             output=torch.from_numpy(z["output"]),
                             covariate_table=z["covariate_table"] if "covariate_table" in z.files else None)
        store = FieldStore(out, meta["key"], meta.get("components", {}), write=False)
        return cls(data, store=store, side=int(meta["info"]["chunks"]["side_blocks"]))

    def write_data(self, out: "str | os.PathLike | None" = None) -> Path:
        """``field.npz`` in ``out`` (default: the field's folder): what :meth:`load` needs besides the chunks."""
        d = self.data
        path = Path(out if out is not None else self.store.dir) / FIELD_DATA
        arrays = {f"pair_{k}": v for k, v in d.pairs.items()}
        arrays.update(psnr_origin=d.psnr_origin, gt=d.gt.numpy(), degraded=d.degraded.numpy(),
                      output=d.output.numpy(), tiles=np.array([r.as_tuple() for r in d.tiles], dtype=np.int64))
        if d.covariate_table is not None:
            arrays["covariate_table"] = d.covariate_table
        atomic_write(path, lambda f: np.savez(f, **arrays))
        if self.store is not None and Path(out or self.store.dir) == self.store.dir:
            self.store.save_meta({**self.store.meta(), "status": "complete", "info": d.info,
                                  "shape": list(self.shape), "tile": d.tile})
        return path

    def save(self, out_dir: "str | os.PathLike", n_boot: int = 0) -> Path:
        """metrics.npz (every metric's (tile rows, tile cols) array), one picture per headline metric drawn over
        the image (radius90.png, ...), each tile's CEM under tiles/, and report.html, whose overview opens a
        tile's CEM. Returns the report's path."""
        from .field_pictures import write_field_pictures  # matplotlib: only when pictures are asked for
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        metrics = self.metrics(n_boot=n_boot)
        atomic_write(out / "metrics.npz", lambda f: np.savez(f, **metrics))
        return write_field_pictures(self, metrics, out)
