"""The layer-by-layer engine: each intervention recomputes, layer by layer, only what it changes
(:mod:`cem_fast.layerwise`), on the run's region (the locality crop, or the whole input).

It builds on the windows' tables: per block, the output rectangle that holds what it can change in the ROIs
(``need``), from which the graph's reverse pass cuts every node's rectangle. The output rectangles are scored by the
exact composition of the windows (base error minus the base part plus the new part). Every run checks the
unintervened output and a few interventions against the model on the crop and reports the largest difference.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ...layerwise import LayerwiseGraph, Unsupported
from ...locality import VERIFY_TOL, Window
from ...transfers import upload
from ..draws import intervened
from ..memory import free_memory
from ..model import precision_mode
from ..plan import RunPlan
from .base import EngineBase, Verdict, equal_runs, verdict_of
from .windows import BlockWindows, WindowsEngine, block_windows, largest_difference_from_crop, measured_spread

MIN_GAIN = 1.2  # fewer convolution pixels than the windows (or the crop) needed to be worth it
# Its fixed cost: each graph node costs about this much per run of the graph whatever its rectangles' size (Python:
# the node's rectangles, gathers and call), counted as the convolution work (multiply-accumulates) that takes as
# long; measured on the 2-core CPU: benchmarks/results/cpu-2core-2026-12-07-node-cost.md
NODE_COST_MACS = 2_000_000
PLAN_RUNS = 8  # graph runs its planning costs: the trace, the unintervened activations and the checked blocks


def build_graph(plan: RunPlan) -> LayerwiseGraph:
    """The model's layer-by-layer graph for this run, or :class:`Unsupported` with the reason."""
    if plan.options.compile:
        raise Unsupported("the model is compiled (compile=...)")
    graph = LayerwiseGraph(getattr(plan.model, "_orig_mod", plan.model))
    if graph.output_scale() != plan.task.scale:
        raise Unsupported(f"the traced graph upscales x{graph.output_scale()}, the task x{plan.task.scale}")
    return graph


def _has_convolution(model: torch.nn.Module) -> bool:
    """Whether the model holds a convolution: without one the engine saves nothing (an interpolation-only model),
    and its graph is not traced (a trace is milliseconds of a warm call)."""
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


class IncrementalEngine(EngineBase):
    """The graph, its region (input px), the tables of what each block can change (from the windows: C_bj) and
    ``need`` (n, 4): per block of the tables, the output rectangle ``[y0, x0, y1, x1]`` holding its C_bj.
    ``precision``: that of the unintervened activations (a forward at another precision cannot use them)."""

    name = "incremental"

    def __init__(self, graph: LayerwiseGraph, windows: BlockWindows, region: Window, origins: np.ndarray,
                 sizes: np.ndarray, precision: str, instead):
        super().__init__(instead)
        self.graph, self.windows, self.region = graph, windows, region
        self.origins, self.sizes, self.precision = origins, sizes, precision  # (num_blocks, 2) each, host
        c = windows.changed  # (n, n_rois, 4), empty rectangles all zero
        empty = (c[..., 0] >= c[..., 2]) | (c[..., 1] >= c[..., 3])
        big = np.iinfo(np.int64).max
        lo = [np.where(empty, big, c[..., i]).min(1) for i in (0, 1)]
        hi = [np.where(empty, -1, c[..., i]).max(1) for i in (2, 3)]
        need = np.stack([lo[0], lo[1], hi[0], hi[1]], 1)
        self.need = np.where(empty.all(1)[:, None], 0, need)  # a block that changes no ROI needs nothing

    def shape_key(self, blocks: np.ndarray) -> np.ndarray:
        """(n,) one integer per footprint shape: a batch holds one."""
        return self.sizes[blocks, 0] * 1_000_003 + self.sizes[blocks, 1]

    def order(self, blocks: np.ndarray) -> np.ndarray:
        """By footprint shape, then by the size of what they need (a batch takes its largest rectangle, so similar
        ones together)."""
        if not len(blocks):
            return blocks
        n = self.need[self.windows.rows(blocks)]
        key = self.shape_key(blocks) * 10**9 + (n[:, 2] - n[:, 0]) * 40_000 + (n[:, 3] - n[:, 1])
        return blocks[np.argsort(key, kind="stable")]

    def for_precision(self, precision: str):
        return self if precision == self.precision else self.instead.for_precision(precision)

    def cache_components(self) -> dict[str, str]:
        return {**self.instead.cache_components(), "incremental": "layer by layer"}

    def for_rois(self, plan: RunPlan) -> "IncrementalEngine":
        """The same graph and unintervened activations, the tables of ``plan``'s ROIs."""
        return IncrementalEngine(self.graph, block_windows(plan, self.windows.spread), self.region, self.origins,
                                 self.sizes, self.precision, self.instead.for_rois(plan))

    def budget(self) -> dict:
        return {**self.instead.budget(), "incremental": True}

    def local_need(self, blocks: np.ndarray) -> np.ndarray:
        s = self.graph.output_scale()
        return self.need[self.windows.rows(blocks)] - np.array([self.region.y * s, self.region.x * s] * 2)

    def outputs(self, plan: RunPlan, forward, blocks: torch.Tensor, draws: torch.Tensor,
                np_blocks: Optional[np.ndarray] = None):
        """Yields (first, last, outputs, absolute output origins (K, 2)) per footprint shape of the batch
        (``np_blocks``: the blocks on the host, when the caller has them: one device-to-host copy less)."""
        np_blocks = blocks.cpu().numpy() if np_blocks is None else np_blocks
        shift = np.array([self.region.y, self.region.x])
        s = self.graph.output_scale()
        dev_origins = plan.prep.extra["origins"][blocks]
        for a, b in equal_runs(self.shape_key(np_blocks)):
            fh, fw = (int(v) for v in self.sizes[np_blocks[a]])
            footprints = intervened(plan, blocks[a:b], draws[a:b], window=(dev_origins[a:b], (fh, fw)))
            with precision_mode(forward.precision, plan.device):
                out, lo = self.graph.run(footprints, self.origins[np_blocks[a:b]] - shift,
                                         self.local_need(np_blocks[a:b]), forward.memory_format)
            yield a, b, out, lo + shift * s

    def scores(self, runner, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """(K, n_rois) PSNRs of interventions (blocks[k], draws[k]), each computed on its rectangles."""
        np_blocks = blocks.cpu().numpy()  # the batch's one wait for the device (the geometry is the host's)
        rows = self.windows.rows(np_blocks)
        scorer = runner.changed_scorer(self.windows)
        parts = [scorer(out, rows[a:b], origins=upload(lo, out.device))
                 for a, b, out, lo in self.outputs(runner.plan, runner.forward, blocks, draws, np_blocks)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _counted(plan: RunPlan, graph: LayerwiseGraph, inc: IncrementalEngine, chosen) -> dict:
    """Convolution pixels per intervention, the engine's own rectangles against what ``chosen`` would run (every
    convolution on each block's window, or on the crop)."""
    windows, region = inc.windows, inc.region
    blocks = windows.blocks
    shift = np.array([region.y, region.x])
    keys = inc.shape_key(blocks)
    mine = sum(graph.conv_pixels(inc.origins[blocks[keys == k]] - shift, tuple(inc.sizes[blocks[keys == k][0]]),
                                 inc.local_need(blocks[keys == k])) for k in np.unique(keys))
    on_windows = isinstance(chosen, WindowsEngine)
    other = chosen.tables.pixels() if on_windows else len(blocks) * region.h * region.w
    facts = {"conv_px_per_intervention": int(mine) // max(1, len(blocks)),
             "instead_of": "windows" if on_windows else "crop",
             "instead_conv_px_per_intervention": graph.window_conv_pixels(int(other)) // max(1, len(blocks)),
             "reach_px": list(graph.output_radius())}
    facts["fewer_conv_px"] = round(facts["instead_conv_px_per_intervention"] /
                                   max(1, facts["conv_px_per_intervention"]), 3)
    return facts


def _fixed_cost_refusal(plan: RunPlan, graph: LayerwiseGraph, inc: IncrementalEngine, facts: dict) -> str:
    """Why the convolution work it saves over the draws every reachable block gets (the coarse stage, or
    exhaustive mode's; the fine stage's count is not known yet) cannot pay for its fixed cost: ``NODE_COST_MACS``
    per graph node and run, over its planning's runs and one run per footprint shape and stage; "" when it can. A
    small net (a few thin layers) saves convolution pixels but not the time of its graph's nodes."""
    convs = [x for x in graph.order if x.kind == "conv"]
    weight = sum(x.scale ** 2 for x in convs)  # a window's convolution pixels, per layer (window_conv_pixels)
    macs_per_px = sum(x.conv.in_channels // x.conv.groups * x.conv.out_channels * x.conv.kernel_size[0] *
                      x.conv.kernel_size[1] * x.scale ** 2 for x in convs) / max(1, weight)
    fewer_px = max(0, facts["instead_conv_px_per_intervention"] - facts["conv_px_per_intervention"])
    saved = plan.options.every_block_draws * len(inc.windows.blocks) * fewer_px * macs_per_px
    nodes = sum(1 for x in graph.order if x.kind not in ("const", "output"))
    runs = PLAN_RUNS + 2 * len(np.unique(inc.shape_key(inc.windows.blocks)))
    fixed = nodes * runs * NODE_COST_MACS
    if saved >= fixed:
        return ""
    return (f"saves less than its fixed cost ({saved:.3g} multiply-accumulates over the draws every block gets "
            f"against {fixed:.3g} for {nodes} graph nodes x {runs} runs)")


def _untraced_refusal(plan: RunPlan, chosen, windows_said: Optional[Verdict]) -> str:
    """The fixed-cost rule before the graph is traced (a trace is milliseconds of a small net's call), from the
    windows' count of one forward: the most it can save, all the model work of the engine it would replace over the
    draws every block gets, against the least its fixed cost can be, a graph node per operator the model runs
    (each convolution, activation or addition of a conv net is one of each) over its planning's runs and one run
    per stage; a model without a convolution saves nothing. "" when it might pay (then the traced rule decides)."""
    if not plan.options.compile and not _has_convolution(plan.model):
        instead = "windows" if isinstance(chosen, WindowsEngine) else "crop"
        return f"saves too little over the {instead}: the model has no convolution (not traced)"
    facts = windows_said.facts if windows_said is not None else {}
    if "forward_ops" not in facts:  # not counted (the windows were refused before, or "on")
        return ""
    px = facts["input_px_per_draw"] if isinstance(chosen, WindowsEngine) else facts["crop_px_per_draw"]
    most = plan.options.every_block_draws * px * facts["macs_per_input_px"]
    least = facts["forward_ops"] * (PLAN_RUNS + 2) * NODE_COST_MACS
    if most >= least:
        return ""
    return (f"saves less than its fixed cost (at most {most:.3g} multiply-accumulates over the draws every block "
            f"gets against at least {least:.3g} for {facts['forward_ops']} operators x {PLAN_RUNS + 2} runs; not "
            "traced)")


def _materialised(plan: RunPlan, inc: IncrementalEngine) -> torch.Tensor:
    """The unintervened activations of the region kept by the graph; returns its output there."""
    crop_in = inc.region.crop(plan.prep.base).unsqueeze(0)
    with precision_mode(plan.forward.precision, plan.device):
        return inc.graph.materialise(crop_in.contiguous(memory_format=plan.forward.memory_format),
                                     plan.grid.in_block)


def _checked(plan: RunPlan, inc: IncrementalEngine, base_out: torch.Tensor) -> float:
    """The largest difference from the model on the crop: the unintervened output and a few blocks (as the
    windows' check)."""
    crop_in = inc.region.crop(plan.prep.base).unsqueeze(0)
    err = float((base_out.float() - plan.forward(crop_in).float()).abs().max())

    def own(b: int):
        bt = torch.tensor([b], device=plan.device)
        (_, _, out, lo), = inc.outputs(plan, plan.forward, bt, torch.zeros_like(bt))
        return out[0], tuple(int(v) for v in lo[0])
    return max(err, largest_difference_from_crop(plan, inc.windows, inc.region, own))


def plan(plan: RunPlan, chosen, verdicts) -> tuple[Optional[IncrementalEngine], Verdict]:
    """Decide whether interventions are recomputed layer by layer: the graph (or the reason it does not apply),
    what it saves, the unintervened activations, and the check against the crop on a few blocks."""
    def no(reason: str, facts: Optional[dict] = None) -> tuple[None, Verdict]:
        return None, Verdict(IncrementalEngine.name, False, reason, facts or {})
    info = plan.locality.info
    if plan.options.incremental == "off":
        return no("asked (incremental: off)")
    if "verify_max_abs_err" not in info:
        return no("locality was not verified: " + str(info.get("reason", "off")))
    spread, windows_said = measured_spread(verdicts), verdict_of(verdicts, WindowsEngine.name)
    if spread is None:
        return no("no measured spread: " + str(windows_said.reason if windows_said else None))
    too_small = _untraced_refusal(plan, chosen, windows_said) if plan.options.incremental != "on" else ""
    if too_small:
        return no(too_small)
    try:
        graph = build_graph(plan)
    except Unsupported as e:
        return no(str(e))
    R = graph.output_radius()
    if R[0] < max(spread.up, spread.down) or R[1] < max(spread.left, spread.right):
        return no(f"the graph's reach {list(R)} px is smaller than the measured spread "
                  f"{[spread.up, spread.down, spread.left, spread.right]}")
    if windows_said.check_failed:  # the changed rectangles themselves are in doubt
        return no("the windows' check failed: " + windows_said.reason)
    windows = chosen.tables if isinstance(chosen, WindowsEngine) else block_windows(plan, spread)
    region = plan.locality.window or Window(0, 0, plan.grid.in_h, plan.grid.in_w)
    inc = IncrementalEngine(graph, windows, region, plan.prep.extra["origins"].cpu().numpy(),
                            plan.prep.extra["sizes"].cpu().numpy(), plan.forward.precision, chosen)
    rel = inc.origins[windows.blocks] - np.array([region.y, region.x])
    if ((rel + inc.sizes[windows.blocks] <= 0) | (rel >= np.array([region.h, region.w]))).any():
        return no("a block that reaches the ROIs lies outside the crop")
    facts = _counted(plan, graph, inc, chosen)
    if plan.options.incremental != "on":  # "on": wherever it applies and verifies, whatever it saves
        if facts["fewer_conv_px"] < MIN_GAIN:
            return no(f"saves too little over the {facts['instead_of']} ({facts['fewer_conv_px']:.2f}x the "
                      "convolution pixels)", facts)
        too_small = _fixed_cost_refusal(plan, graph, inc, facts)
        if too_small:
            return no(too_small, facts)
    graph.margin = plan.grid.in_block
    need = graph.kept_bytes(region.h, region.w, plan.prep.base.shape[0], plan.prep.base.element_size())
    avail = free_memory(plan.device)
    if avail is not None and need > avail // 4:
        return no(f"the unintervened activations of the {region.h}x{region.w} region would take "
                  f"{need / 2**30:.1f} GiB, more than a quarter of the {avail / 2**30:.1f} GiB available", facts)
    try:
        base_out = _materialised(plan, inc)
    except Unsupported as e:
        return no(str(e), facts)
    except RuntimeError as e:  # out of memory, or an op that does not run on this device: the windows do
        graph.release()
        return no(f"the unintervened activations failed: {type(e).__name__}: {e}".splitlines()[0], facts)
    err = _checked(plan, inc, base_out)
    tol = VERIFY_TOL[plan.options.precision]
    if not err <= tol:
        graph.release()
        return no(f"incremental outputs differ from the crop's by {err:.3g} (tolerance {tol:g})", facts)
    return inc, Verdict(IncrementalEngine.name, True, facts=facts, verify_max_abs_err=err)
