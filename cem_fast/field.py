"""Causal fields: every tile of an image an ROI, each intervention computed once (docs/fields.md).

>>> field = cem_fast.causal_field(model, "big.png", task="DN", tile=32, out="field_out")
>>> field.map(100, 260)              # the CEMResult of the tile holding output pixel (100, 260)
>>> field.metric("radius90_px")      # (tile rows, tile cols): how far each tile draws on its context
>>> field.save("field_out")          # metrics.npz, radius90.png, ..., report.html

The run is planned as one multi-ROI run whose ROIs are the tiles (the model placed, the locality probed, the
engine chosen once), then its interventions run chunk by chunk (:mod:`cem_fast.pipeline.field_pass`), each chunk
written to ``out`` as it finishes (:mod:`cem_fast.field_store`): a killed field resumes from its last chunk, and
what is held at once is one chunk's scores and the per-(tile, block) estimates.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from . import checks, distributed
from .field_result import CausalField, FieldData
from .field_store import FieldStore
from .images import ImageLike
from .options import RunOptions, TaskOptions
from .patches import PatchBank
from .result import Deferred
from .pipeline.assemble import pictures
from .pipeline.covariates import patch_covariates
from .pipeline.engines.select import choose_engine
from .pipeline.engines.crop import CropEngine
from .pipeline.field_pass import (ChunkSamples, block_chunks, chunk_plan, chunk_side, field_tiles, sample_chunk,
                                  tile_shape)
from .pipeline.memory import available_memory
from .pipeline.model import eval_for_run
from .pipeline.origin import check_reproduced, refuse_undefined_origin, start_origin
from .pipeline.plan import RunPlan, plan_sampling, prepare, samples_key, size_batches
from .pipeline.request import RunRequest
from .pipeline.runner import Runner
from .pipeline.scoring import base_error_table
from .tasks import Task
from .threads import fitted_threads

RUN_OPTIONS = {f.name for f in dataclasses.fields(RunOptions)}
NOT_FOR_FIELDS = {"rois": "a field's ROIs are its tiles (tile=...)", "roi_grid": "give tile=... instead",
                  "roi_plan": "a field always shares one pass", "cache": "out= holds a field's samples",
                  "budget": "adaptive mode is not supported by fields", "fresh": None}
DEFAULT_MAX_MEMORY = 2 << 30
FIELD_VERSION = 1


def causal_field(model: Union[nn.Module, str], image: ImageLike, task: Union[str, Task] = "DN", tile: int = 32,
                 block: int = 8, coarse: int = 3, fine: int = 50, tol: float = 0.01, seed: int = 0,
                 patches: Union[None, str, os.PathLike, PatchBank] = None,
                 out: Union[None, str, os.PathLike] = None, max_memory: Optional[int] = None, fresh: bool = False,
                 image_name: Optional[str] = None, model_name: Optional[str] = None,
                 **options: Any) -> CausalField:
    """The causal field of ``model`` on ``image``: the CEM of every ``tile x tile`` tile of its output (the ragged
    tiles at the right and bottom edges too), from one pass over blocks x draws.

    Args:
        model, image, task, block, coarse, fine, tol, seed, patches: as :func:`cem_fast.causal_effect_map`; each
            tile's map equals that tile's single run with the same seed (to the engine's round-off).
        tile: tile side in output px.
        out: folder the samples are written to as they are computed, chunk by chunk (checked and resumed by a
            later call with the same inputs; a folder holding another field is refused unless ``fresh``).
            None: held in memory, nothing resumes.
        max_memory: bytes one chunk's scores may take, about (default: 2 GiB or half the available memory).
        fresh: discard what ``out`` holds and start again.
        **options: the run options of :func:`cem_fast.causal_effect_maps` (locality, windows, incremental,
            precision, device, batch_size, backend, mode "coarse-to-fine" or "exhaustive", samples, estimator,
            progress, max_pixels, trust_model_code...) and the task's (sigma, scale, ...).

    Returns:
        :class:`~cem_fast.field_result.CausalField`: ``map(y, x)``, ``metric(name)``, ``save(dir)``.
    """
    request, tile, max_memory = _request(model, image, task, tile, block, coarse, fine, tol, seed, patches,
                                         max_memory, image_name, model_name, options)
    with distributed.agreed_step("field"), eval_for_run(request.model):
        return _field(request, tile, out, max_memory, fresh)


def load_field(out: Union[str, os.PathLike]) -> CausalField:
    """The finished field in folder ``out`` (:meth:`CausalField.load`)."""
    return CausalField.load(out)


def _request(model, image, task, tile, block, coarse, fine, tol, seed, patches, max_memory, image_name, model_name,
             options: dict) -> tuple[RunRequest, int, int]:
    checks.integer("tile", tile, 1)
    if max_memory is not None:
        checks.integer("max_memory", max_memory, 1)
    for name, why in NOT_FOR_FIELDS.items():
        if name in options:
            raise ValueError(f"causal_field does not take {name}: {why or 'see the arguments'}")
    if options.get("mode", "coarse-to-fine") == "adaptive":
        raise ValueError("causal_field mode must be coarse-to-fine or exhaustive, got 'adaptive'")
    run_kw = {k: v for k, v in options.items() if k in RUN_OPTIONS}
    task_kw = {k: v for k, v in options.items() if k not in RUN_OPTIONS}
    run = RunOptions(block=block, coarse=coarse, fine=fine, tol=tol, seed=seed, roi_plan="shared", **run_kw)
    run.check()
    memory = max_memory or min(DEFAULT_MAX_MEMORY, (available_memory() or 2 * DEFAULT_MAX_MEMORY) // 2)
    # one placeholder ROI: the tiles need the output's size, which prepare() finds
    return RunRequest(model, image, task, rois=[(0, 0, 1)], patches=patches, options=run,
                      task_options=TaskOptions.of(**task_kw), model_name=model_name,
                      image_name=image_name), int(tile), int(memory)


def field_key(plan: RunPlan, tile: int) -> tuple[str, dict[str, Any], Optional[str]]:
    """The field's key (every input of its samples; a model whose code cannot be read gets a key of its own, so
    nothing resumes), what it was made of, and a note when it cannot resume."""
    key, components, unknown = samples_key(plan, {"rois": None, "tile": tile, "field": FIELD_VERSION}, "field")
    return key, components, f"samples not resumable: {unknown}" if unknown else None


def _field(request: RunRequest, tile: int, out, max_memory: int, fresh: bool) -> CausalField:
    t0 = time.perf_counter()
    plan = prepare(request)
    g = plan.grid
    tiles = field_tiles(g.out_h, g.out_w, tile)
    plan = plan.but(rois=tiles)
    marks = {"prepare": time.perf_counter()}
    with fitted_threads(plan.device) as threads, torch.inference_mode():
        plan = plan_sampling(plan)
        marks["probe"] = time.perf_counter()
        coarse, fine = plan.options.stages
        reach = plan.locality.reach.reshape(len(tiles), -1)
        side = chunk_side(g, tile, len(tiles), _halo_px(plan), coarse + fine, max_memory)
        chunks = block_chunks(g, reach.any(0), side)
        chosen = _choose_engine(plan, reach, chunks)
        marks["engine"] = time.perf_counter()
        key, components, note = field_key(chosen, tile)
        # rank 0 first: it alone clears (fresh) and writes the folder, the other ranks then read what it wrote
        store = distributed.rank0_first(lambda first: FieldStore(out, key, components, fresh and first, write=first),
                                        "field store") if out is not None else None
        whole = Runner(plan.but(engine=CropEngine()), threads=threads)  # Y(I) of every tile, and its check
        psnr_origin = distributed.from_rank0(start_origin(plan, whole), "Y(I)")
        refuse_undefined_origin(plan, psnr_origin)
        found = _stored_chunks(store, side, chunks)
        plan.say(f"field: {len(tiles)} tiles of {tile} px, {len(chunks)} chunks of up to {side}x{side} blocks "
                 f"({len(found)} on disk), the {chosen.engine.name} engine")
        bar = _bar(plan, sum(len(c) for c in chunks) * (coarse + fine))  # an upper bound: gating lowers it
        cv = patch_covariates(plan) if plan.options.estimator == "control-variate" else None
        try:
            kept, held, forwards, batch = _sample_chunks(chosen, reach, chunks, found, psnr_origin, store, side,
                                                         threads, bar, cv)
            origin_check = check_reproduced(plan, whole, psnr_origin)
        finally:
            if bar is not None:
                bar.close()
        marks["sampling"] = time.perf_counter()
        pics = {k: (v.build() if isinstance(v, Deferred) else v) for k, v in pictures(plan, whole).items()}
    info = _info(chosen, tile, side, chunks, len(chunks) - len(found), store, note, origin_check, covariates=cv)
    info.update(num_forwards=forwards + whole.forwards + (plan.full_output is not None), batch_size=batch,
                timings_s=_timings(t0, marks))
    data = FieldData(tiles=tiles, shape=tile_shape(g.out_h, g.out_w, tile), tile=tile, psnr_origin=psnr_origin,
                     pairs={k: np.concatenate([p[k] for p in kept]) if kept else np.zeros(0) for k in _PAIR_KEYS},
                     info=info, gt=pics["gt"], degraded=pics["degraded"], output=pics["output"],
                     covariate_table=getattr(cv, "table", None))
    field = CausalField(data, store=store, side=side, held=held if store is None else None)
    if store is not None and store.write:  # rank 0 writes under torchrun
        field.write_data()
    return field


def _sample_chunks(plan: RunPlan, reach: np.ndarray, chunks: list, found: dict, psnr_origin: np.ndarray,
                   store: Optional[FieldStore], side: int, threads, bar, cv) -> tuple[list, list, int, int]:
    """Every chunk's estimates (those ``found`` on disk as they are, the others computed and written as each
    finishes), the chunks' samples when there is no store to read them from later, the forwards run and the
    batch size it ended with."""
    coarse, fine = plan.options.stages
    kept, held, forwards, batch = [], [], 0, plan.batch_size
    whole = plan.full_output is not None and plan.locality.window is None
    base_sat = base_error_table(plan.prep.gt, plan.full_output[0], (0, 0)) if whole else None  # made once
    for i, blocks in enumerate(chunks):
        if i in found:
            kept.append(found[i])
            if bar is not None:
                bar.update(int(found[i]["forwards"]))
            continue
        sub, touched = chunk_plan(plan, reach, blocks)
        runners: list = []

        def runner_for(p: RunPlan) -> Runner:
            r = Runner(p.but(engine=plan.engine.for_rois(p), batch_size=runners[-1].batch_size if runners else batch),
                       threads=threads)
            r.bar, r.expect = bar, _keep_total  # one bar for the field, with the field's total
            r.whole_base_sat = base_sat
            runners.append(r)
            return r
        got = sample_chunk(sub, touched, runner_for, psnr_origin, coarse, fine, plan.options.tol, cv)
        forwards, batch = forwards + got.forwards, runners[-1].batch_size
        _refuse_nan(got, plan.rois, plan.name)
        if store is not None:
            store.save(side, i, blocks, got)
        else:
            held.append(got)
        kept.append(_estimates(got, i))
    return kept, held, forwards, batch


def _halo_px(plan: RunPlan) -> Optional[int]:
    """How far beyond its footprint one block's change can reach (output px), or None where not measured."""
    spread = plan.locality.info.get("pixel_spread_px")
    return None if spread is None else int(max(spread)) + plan.grid.block


def _choose_engine(plan: RunPlan, reach: np.ndarray, chunks: list) -> RunPlan:
    """The field's plan with the engine chosen, and its batch size sized, on its middle chunk's plan (each chunk
    then gets the same engine with its own tables: the tables of every block x every tile would grow with the
    square of the image)."""
    if not chunks:
        return plan.but(engine=CropEngine())
    middle, _ = chunk_plan(plan, reach, chunks[len(chunks) // 2])
    engine, verdicts = choose_engine(middle)
    sized = size_batches(middle.but(engine=engine, verdicts=verdicts))
    return plan.but(engine=engine, verdicts=verdicts, batch_size=sized.batch_size, batch_key=sized.batch_key)


def _keep_total(total: int) -> None:
    pass


def _bar(plan: RunPlan, total: int):
    if not plan.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="fwd", desc="field", leave=False, file=sys.stderr)


_PAIR_KEYS = ("tiles", "blocks", "chunk", "effect", "se", "draws", "df", "gated")


def _estimates(chunk: ChunkSamples, index: int) -> dict[str, np.ndarray]:
    """A chunk's per-pair estimates (small: its samples stay in the chunk's file) and the chunk they came from."""
    out = {k: getattr(chunk, k) for k in _PAIR_KEYS if k != "chunk"}
    out["chunk"] = np.full(len(chunk.tiles), index, dtype=np.int32)
    out["forwards"] = np.int64(chunk.forwards)
    return out


def _stored_chunks(store: Optional[FieldStore], side: int, chunks: list) -> dict[int, dict]:
    """The estimates of the chunks ``store`` holds and that check, as rank 0 found them (every rank resumes from
    the same ones)."""
    found: dict[int, dict] = {}
    if store is not None:
        for i, blocks in enumerate(chunks):
            got = store.load(side, i, blocks)
            if got is not None:
                found[i] = _estimates(got, i)  # the samples stay on disk
    done = np.zeros(len(chunks), dtype=np.int64)
    done[list(found)] = 1
    done = distributed.from_rank0(done, "field chunks")
    return {i: c for i, c in found.items() if done[i]}


def _refuse_nan(chunk: ChunkSamples, tiles: list, name: str) -> None:
    """NaN/Inf in a tile's samples: said, never averaged into a map (as a single run refuses them)."""
    bad = np.isnan(chunk.coarse).any(1) | (np.isnan(chunk.fine) & chunk.gated[:, None]).any(1)
    if bad.any():
        i = int(np.argmax(bad))
        t = tiles[int(chunk.tiles[i])]
        raise ValueError(f"model {name} produced NaN/Inf outputs in tile (y={t.y}, x={t.x}) for some "
                         f"interventions (first: block {int(chunk.blocks[i])}); refusing to average them")


def _info(plan: RunPlan, tile: int, side: int, chunks: list, computed: int,
          store: Optional[FieldStore], note: Optional[str], origin_check: dict, covariates) -> dict[str, Any]:
    o, bank = plan.options, plan.bank
    coarse, fine = o.stages
    return {
        "tile": tile, "block": o.block, "grid": [plan.grid.rows, plan.grid.cols], "scale": plan.task.scale, "tol": float(o.tol), "task": plan.task.describe(),
        "seed": plan.seed, "mode": o.mode, "coarse": coarse, "fine": fine, "model_name": plan.name,
        "image_name": plan.image_name, "backend": plan.backend, "device": str(plan.device),
        "estimator": "control-variate" if covariates is not None else "mean",
        "patch_bank": {"source": bank.source, "size": len(bank), "patch_size": bank.patch_size,
                       "digest": plan.bank_digest},
        "engine": plan.engine.name, "locality": plan.locality_summary(),
        "chunks": {"count": len(chunks), "side_blocks": side, "computed": computed,
                   "reused": len(chunks) - computed, "dropped": store.dropped if store is not None else 0},
        "origin_check": origin_check,
        **({"note": note} if note else {}),
    }


def _timings(t0: float, marks: dict) -> dict[str, float]:
    stamps = [("prepare", t0), ("probe", marks["prepare"]), ("engine", marks["probe"]),
              ("sampling", marks["engine"])]
    out = {name: round(marks[name] - start, 4) for name, start in stamps}
    out["total"] = round(time.perf_counter() - t0, 4)
    return out
