"""Incremental recomputation (issue 15): each intervention recomputes, layer by layer, only what it changes.

An intervention changes the input only on its block's footprint ``F``. Through a same-padded stride-1 convolution
of radius ``k`` a change grows by ``k`` pixels per side, through a pointwise op (activation, eval batch norm, a
residual add) not at all; so node ``v`` of the model's graph can differ from its unintervened value only on its
*box*, ``F`` grown by ``r(v)`` (the largest sum of radii on a path from the input). The engine therefore

1. traces the model with ``torch.fx`` and checks that every node is a supported op (below); anything else, and
   the run keeps the window path (summary.json: ``incremental.reason``);
2. materialises, once per run, the unintervened activations that some op reads beyond their box (a
   convolution's input around the box, the input image of a residual), on the run's region (the locality crop,
   or the whole input), zero-padded;
3. for a batch of interventions (one footprint shape, any positions), computes every node only on its box:
   a convolution reads its input's box grown by twice its radius (the changed box, pasted into the unintervened
   values gathered at each intervention's position), zeroes what lies outside the region (the convolution's zero
   padding) and runs without padding; a pointwise op reads its arguments on its own box. The output's box is
   then scored by the exact composition of the windows (base error minus the base part plus the new part).

The result equals the model run on the region up to float round-off (convolution algorithms differ with the input
size); every run checks a few interventions against the window path and reports the largest difference.

Supported: ``Conv2d`` (stride 1, zero "same" padding, any odd kernel, dilation, groups), eval ``BatchNorm2d``,
elementwise activations (modules and functions), ``Dropout`` in eval, and ``+ - * /`` between tensors or with
numbers and per-channel constants. Scale 1 (denoising, deraining).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .plan import RunPlan


class Unsupported(Exception):
    """The model (or the run) is outside what the engine computes exactly: the reason, in one line."""


POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                     nn.Hardtanh, nn.Identity, nn.Dropout, nn.BatchNorm2d)
POINTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh, torch.sigmoid,
                       F.hardtanh, torch.clamp, torch.clip, operator.neg, operator.add, operator.sub, operator.mul,
                       operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
POINTWISE_METHODS = {"relu", "tanh", "sigmoid", "clamp", "clip", "neg", "add", "sub", "mul", "div", "contiguous"}


@dataclass
class _Node:
    """One graph node: ``kind`` input | conv | pointwise | const | output; ``radius`` (ry, rx) of its box;
    ``read`` (ry, rx): the largest box its consumers read; beyond its own box, its unintervened values are kept
    (zero-padded by ``read``, so that a box at the region's edge can be gathered)."""

    fx: Any
    kind: str
    radius: tuple[int, int] = (0, 0)
    read: list = field(default_factory=lambda: [0, 0])
    rem: list = field(default_factory=lambda: [0, 0])
    keep: bool = False  # some consumer reads it on another rectangle: its unintervened values are kept
    conv: Optional[nn.Conv2d] = None
    conv_radius: tuple[int, int] = (0, 0)
    module: Optional[nn.Module] = None
    const: Optional[torch.Tensor] = None


def _conv_radius(m: nn.Conv2d, name: str) -> tuple[int, int]:
    if tuple(m.stride) != (1, 1):
        raise Unsupported(f"{name}: convolution with stride {tuple(m.stride)}")
    if m.padding_mode != "zeros":
        raise Unsupported(f"{name}: {m.padding_mode} padding")
    kh, kw = m.kernel_size
    dh, dw = m.dilation
    want = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    if kh % 2 == 0 or kw % 2 == 0 or tuple(m.padding) != want:
        raise Unsupported(f"{name}: padding {m.padding} is not 'same' for kernel {m.kernel_size}")
    return want


def _non_inplace(m: nn.Module) -> nn.Module:
    if getattr(m, "inplace", False):
        m = copy.copy(m)
        m.inplace = False
    return m


class IncrementalEngine:
    """The traced model, its boxes and the unintervened activations of one region (module docstring)."""

    def __init__(self, model: nn.Module):
        import torch.fx as fx
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as e:
            raise Unsupported(f"torch.fx cannot trace the model: {type(e).__name__}: {e}".splitlines()[0]) from None
        self.nodes: dict[Any, _Node] = {}
        self.order: list[_Node] = []
        for n in self.gm.graph.nodes:
            node = self._analyse(n)
            self.nodes[n] = node
            self.order.append(node)
        self._remaining()
        outs = [x for x in self.order if x.kind == "output"]
        arg = outs[0].fx.args[0]
        if not isinstance(arg, fx.Node) or self.nodes[arg].kind in ("const",):
            raise Unsupported("the model does not return one tensor")
        self.out = self.nodes[arg]
        self._last_use = {}
        for i, node in enumerate(self.order):
            for a in self._tensor_args(node):
                self._last_use[a.fx] = i
        self.base: dict[Any, torch.Tensor] = {}
        self.region_hw: tuple[int, int] = (0, 0)
        self._mask: Optional[torch.Tensor] = None
        self.margin = 0

    # ---- analysis ----------------------------------------------------------------------------------------------
    def _remaining(self) -> None:
        """``rem``: the largest sum of convolution radii from each node to the output (a reverse pass): node v's
        values matter only within ``rem(v)`` of the output's needed rectangle. ``keep`` where a pointwise
        consumer's rectangle can differ from the node's own (it then gathers the node's unintervened values)."""
        for node in reversed(self.order):
            if node.kind in ("const", "output"):
                continue
            k = node.conv_radius if node.kind == "conv" else (0, 0)
            for a in self._tensor_args(node):
                a.rem = [max(a.rem[0], node.rem[0] + k[0]), max(a.rem[1], node.rem[1] + k[1])]
        for node in self.order:
            if node.kind != "pointwise":
                continue
            for a in self._tensor_args(node):
                if tuple(a.radius) != tuple(node.radius) or list(a.rem) != list(node.rem):
                    a.keep = True
        self.max_read = (max(x.read[0] for x in self.order), max(x.read[1] for x in self.order))

    def _tensor_args(self, node: _Node) -> list[_Node]:
        import torch.fx as fx
        flat = [a for a in (*node.fx.args, *node.fx.kwargs.values()) if isinstance(a, fx.Node)]
        return [self.nodes[a] for a in flat if self.nodes[a].kind != "const"]

    def _reads(self, consumer: _Node, arg: _Node, radius: tuple[int, int]) -> None:
        arg.read = [max(p, r) for p, r in zip(arg.read, radius)]

    def _analyse(self, n) -> _Node:
        import torch.fx as fx
        if n.op == "placeholder":
            if any(x.kind == "input" for x in self.nodes.values()):
                raise Unsupported(f"the model takes more than one input ({n.target})")
            return _Node(n, "input")
        if n.op == "get_attr":
            t = self.gm
            for part in n.target.split("."):
                t = getattr(t, part)
            if not isinstance(t, torch.Tensor) or (t.dim() >= 2 and any(s > 1 for s in t.shape[-2:])):
                raise Unsupported(f"{n.target}: a constant with spatial extent")
            return _Node(n, "const", const=t)
        if n.op == "output":
            return _Node(n, "output")
        args = [self.nodes[a] for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node)]
        tensors = [a for a in args if a.kind != "const"]
        if not tensors:
            raise Unsupported(f"{n.name}: an op on constants only")
        if n.op == "call_module":
            m = self.gm.get_submodule(n.target)
            if isinstance(m, nn.Conv2d):
                if len(tensors) != 1 or len(n.args) != 1:
                    raise Unsupported(f"{n.target}: a convolution called with extra arguments")
                k = _conv_radius(m, n.target)
                src = tensors[0]
                node = _Node(n, "conv", radius=(src.radius[0] + k[0], src.radius[1] + k[1]), conv=m, conv_radius=k)
                self._reads(node, src, (src.radius[0] + 2 * k[0], src.radius[1] + 2 * k[1]))
                src.keep = True
                return node
            if isinstance(m, POINTWISE_MODULES):
                if getattr(m, "training", False) and isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
                    raise Unsupported(f"{n.target}: {type(m).__name__} in training mode")
                module = _non_inplace(m)
            else:
                raise Unsupported(f"{n.target}: unsupported layer {type(m).__name__}")
        elif n.op == "call_function":
            if n.target not in POINTWISE_FUNCTIONS:
                raise Unsupported(f"{n.name}: unsupported function {getattr(n.target, '__name__', n.target)}")
            if n.kwargs.get("inplace"):
                raise Unsupported(f"{n.name}: an in-place function")
            module = None
        elif n.op == "call_method":
            if n.target not in POINTWISE_METHODS:
                raise Unsupported(f"{n.name}: unsupported method .{n.target}()")
            module = None
        else:
            raise Unsupported(f"{n.name}: unsupported graph node {n.op}")
        radius = (max(a.radius[0] for a in tensors), max(a.radius[1] for a in tensors))
        node = _Node(n, "pointwise", radius=radius, module=module)
        for a in tensors:
            self._reads(node, a, radius)
        return node

    def output_radius(self) -> tuple[int, int]:
        return self.out.radius

    # ---- evaluation -------------------------------------------------------------------------------------------
    def _apply(self, node: _Node, values: dict) -> torch.Tensor:
        """A pointwise node on its arguments' values (already on its box)."""
        import torch.fx as fx

        def sub(a):
            if isinstance(a, fx.Node):
                x = self.nodes[a]
                return x.const if x.kind == "const" else values[a]
            if isinstance(a, (list, tuple)):
                return type(a)(sub(v) for v in a)
            return a
        args = [sub(a) for a in node.fx.args]
        kwargs = {k: sub(v) for k, v in node.fx.kwargs.items()}
        n = node.fx
        if n.op == "call_module":
            return node.module(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], n.target)(*args[1:], **kwargs)

    def materialise(self, region_input: torch.Tensor, footprint: int) -> torch.Tensor:
        """The model on the unintervened region (1, C, H, W), keeping zero-padded copies of the activations read
        beyond their box; returns its output. ``footprint``: the largest footprint side, so far may a footprint
        lie outside the region (the pixel-tight crop cuts through the blocks at the reach's edge)."""
        self.margin = int(footprint)
        H, W = region_input.shape[-2:]
        self.region_hw = (int(H), int(W))
        values: dict = {}
        self.base = {}
        for i, node in enumerate(self.order):
            if node.kind == "input":
                v = region_input
            elif node.kind == "const":
                continue
            elif node.kind == "conv":
                v = node.conv(values[node.fx.args[0]])
            elif node.kind == "output":
                return values[node.fx.args[0]]
            else:
                v = self._apply(node, values)
            values[node.fx] = v
            if node.keep:
                py, px = node.read[0] + self.margin, node.read[1] + self.margin  # channels-last: a gather
                # copies C contiguous values per pixel
                self.base[node.fx] = F.pad(v[0], (px, px, py, py)).permute(1, 2, 0).contiguous()
            self._free(values, i)
        raise Unsupported("the model's graph has no output")

    def _free(self, values: dict, i: int) -> None:
        for key in [k for k in values if self._last_use.get(k, -1) <= i and k is not self.out.fx]:
            del values[key]

    def _region_mask(self, device, dtype) -> torch.Tensor:
        if self._mask is None or self._mask.device != device or self._mask.dtype != dtype:
            H, W = self.region_hw
            py, px = self._mask_pad = (self.max_read[0] + self.margin, self.max_read[1] + self.margin)
            self._mask = F.pad(torch.ones((1, H, W), device=device, dtype=dtype), (px, px, py, py)).permute(1, 2, 0)
        return self._mask

    @staticmethod
    def _gather(padded: torch.Tensor, pad, lo: np.ndarray, size) -> torch.Tensor:
        """(B, sy, sx, C) of ``padded`` (H + 2py, W + 2px, C) at region positions ``lo`` (B, 2)."""
        dev = padded.device
        ys = torch.from_numpy(lo[:, :1] + pad[0] + np.arange(size[0])).to(dev)
        xs = torch.from_numpy(lo[:, 1:] + pad[1] + np.arange(size[1])).to(dev)
        return padded[ys[:, :, None], xs[:, None, :]]

    def _geometry(self, node: _Node, origins: np.ndarray, fp, need: np.ndarray) -> tuple[np.ndarray, tuple]:
        """``node``'s rectangle per intervention: its box (the footprint grown by its radius) cut to the part the
        output still needs (the needed output grown by what lies between the node and the output), one size for
        the batch (the largest), kept inside the box: (starts (B, 2), (sy, sx))."""
        if node.kind == "input":
            return origins, tuple(fp)
        lo, size = np.empty_like(origins), []
        for a in (0, 1):
            r, m = node.radius[a], node.rem[a]
            box_lo, box_hi = origins[:, a] - r, origins[:, a] + fp[a] + r
            first = np.maximum(box_lo, need[:, a] - m)
            last = np.minimum(box_hi, need[:, a + 2] + m)
            n = int(max(1, (last - first).max()))
            lo[:, a] = np.clip(first, box_lo, box_hi - n)
            size.append(n)
        return lo, tuple(size)

    def _read(self, node: _Node, values: dict, geo: dict, lo: np.ndarray, size, conv_input: bool) -> torch.Tensor:
        """``node``'s values on the rectangles ``lo`` + ``size`` (B, C, sy, sx): its own rectangle pasted into its
        unintervened values (what lies outside it is unchanged, or not needed); zero outside the region when a
        convolution reads them (its zero padding)."""
        v = values[node.fx]
        own_lo, own_size = geo[node.fx]
        H, W = self.region_hw
        inside = (lo >= 0).all() and (lo[:, 0] + size[0] <= H).all() and (lo[:, 1] + size[1] <= W).all()
        if own_size == tuple(size) and np.array_equal(own_lo, lo):
            if conv_input and not inside:  # what lies outside the region must read as the zero padding
                mask = self._gather(self._region_mask(v.device, v.dtype), self._mask_pad, lo, size)
                return v * mask.permute(0, 3, 1, 2)
            return v
        pad = (node.read[0] + self.margin, node.read[1] + self.margin)
        out = self._gather(self.base[node.fx], pad, lo, size)  # (B, sy, sx, C)
        off = own_lo - lo
        B, sy, sx, C = out.shape
        uy, ux = own_size
        if (off == off[0]).all() and off[0, 0] >= 0 and off[0, 1] >= 0 and off[0, 0] + uy <= sy and \
                off[0, 1] + ux <= sx:
            out[:, off[0, 0]:off[0, 0] + uy, off[0, 1]:off[0, 1] + ux] = v.permute(0, 2, 3, 1)
        else:  # offsets of their own: one indexed copy of C values per pixel, the part outside dropped
            ys, xs = off[:, :1] + np.arange(uy), off[:, 1:] + np.arange(ux)
            keep = ((ys >= 0) & (ys < sy))[:, :, None] & ((xs >= 0) & (xs < sx))[:, None, :]
            target = (np.arange(B)[:, None, None] * sy + ys[:, :, None]) * sx + xs[:, None, :]
            dev = out.device
            src = v.permute(0, 2, 3, 1).reshape(-1, C)[torch.from_numpy(np.flatnonzero(keep)).to(dev)]
            out.view(-1, C).index_copy_(0, torch.from_numpy(target[keep]).to(dev), src)
        if conv_input and not inside:
            out = out * self._gather(self._region_mask(out.device, out.dtype), self._mask_pad, lo, size)
        return out.permute(0, 3, 1, 2)

    def run(self, block_input: torch.Tensor, origins: np.ndarray, need: np.ndarray,
            memory_format=torch.contiguous_format) -> tuple[torch.Tensor, np.ndarray]:
        """Outputs of interventions whose input changed only on their footprint: ``block_input`` (B, C, fh, fw)
        the new footprint pixels at region positions ``origins`` (B, 2); ``need`` (B, 4) ``[y0, x0, y1, x1]``
        the output rectangle each must get right (region px). Returns (B, C, sy, sx) outputs on rectangles that
        hold it, and their starts (B, 2)."""
        fp = tuple(block_input.shape[-2:])
        origins, need = np.asarray(origins, np.int64), np.asarray(need, np.int64)
        values: dict = {}
        geo: dict = {}
        for i, node in enumerate(self.order):
            if node.kind == "const":
                continue
            if node.kind == "output":
                src = node.fx.args[0]
                return values[src], geo[src][0]
            lo, size = geo[node.fx] = self._geometry(node, origins, fp, need)
            if node.kind == "input":
                values[node.fx] = block_input
            elif node.kind == "conv":
                src = self.nodes[node.fx.args[0]]
                ky, kx = node.conv_radius
                x = self._read(src, values, geo, lo - np.array([ky, kx]), (size[0] + 2 * ky, size[1] + 2 * kx),
                               conv_input=True)
                c = node.conv
                values[node.fx] = F.conv2d(x.contiguous(memory_format=memory_format), c.weight, c.bias, 1, 0,
                                           c.dilation, c.groups)
            else:
                args = {a.fx: self._read(a, values, geo, lo, size, conv_input=False) for a in self._tensor_args(node)}
                values[node.fx] = self._apply(node, {**values, **args})
            self._free(values, i)
        raise Unsupported("the model's graph has no output")

    def conv_pixels(self, origins: np.ndarray, fp, need: np.ndarray) -> int:
        """Output pixels of every convolution over interventions at ``origins`` (one each), against which the
        window path's (every convolution on the whole window) is counted."""
        total = 0
        for x in self.order:
            if x.kind == "conv":
                for k in range(len(origins)):  # one at a time: the pixels each really needs
                    _, (sy, sx) = self._geometry(x, origins[k:k + 1], fp, need[k:k + 1])
                    total += sy * sx
        return total

    def release(self) -> None:
        """Drop the unintervened activations (a run that does not use the engine)."""
        self.base, self._mask = {}, None

    def n_convs(self) -> int:
        return sum(x.kind == "conv" for x in self.order)


def build_engine(plan: "RunPlan") -> IncrementalEngine:
    """The engine for this run, or :class:`Unsupported` with the reason."""
    if plan.task.scale != 1:
        raise Unsupported(f"scale x{plan.task.scale} (upsampling is not supported yet)")
    if plan.options.compile:
        raise Unsupported("the model is compiled (compile=...)")
    model = getattr(plan.model, "_orig_mod", plan.model)
    return IncrementalEngine(model)


def block_origins(plan: "RunPlan", blocks: np.ndarray, region_y: int, region_x: int) -> np.ndarray:
    """(n, 2) input-pixel origins of ``blocks`` relative to the region."""
    g = plan.grid
    return np.stack([blocks // g.cols * g.in_block - region_y, blocks % g.cols * g.in_block - region_x], 1)


@dataclass
class IncrementalPlan:
    """The engine, its region (input px), the tables of what each block can change (from the windows: C_bj) and
    ``need`` (n, 4): per block of the tables, the output rectangle ``[y0, x0, y1, x1]`` holding its C_bj."""

    engine: IncrementalEngine
    windows: Any  # BlockWindows
    region: Any  # locality.Window
    origins: np.ndarray  # (num_blocks, 2) input px of every footprint (host)
    sizes: np.ndarray  # (num_blocks, 2)
    need: np.ndarray = None

    def __post_init__(self):
        c = self.windows.changed  # (n, n_rois, 4), empty rectangles all zero
        empty = (c[..., 0] >= c[..., 2]) | (c[..., 1] >= c[..., 3])
        big = np.iinfo(np.int64).max
        lo = [np.where(empty, big, c[..., i]).min(1) for i in (0, 1)]
        hi = [np.where(empty, -1, c[..., i]).max(1) for i in (2, 3)]
        self.need = np.stack([lo[0], lo[1], hi[0], hi[1]], 1)

    def shape_key(self, blocks: np.ndarray) -> np.ndarray:
        """(n,) one integer per footprint shape: a batch holds one."""
        return self.sizes[blocks, 0] * 1_000_003 + self.sizes[blocks, 1]

    def sort_key(self, blocks: np.ndarray) -> np.ndarray:
        """The order blocks run in: by footprint shape, then by the size of what they need (a batch takes its
        largest rectangle, so similar ones together)."""
        n = self.need[self.windows.rows(blocks)]
        return self.shape_key(blocks) * 10**9 + (n[:, 2] - n[:, 0]) * 40_000 + (n[:, 3] - n[:, 1])

    def local_need(self, blocks: np.ndarray) -> np.ndarray:
        return self.need[self.windows.rows(blocks)] - np.array([self.region.y, self.region.x] * 2)

    def outputs(self, plan: "RunPlan", forward, blocks: torch.Tensor, draws: torch.Tensor):
        """Yields (first, last, outputs, absolute output origins (K, 2)) per footprint shape of the batch."""
        from .precision import precision_mode
        from .runner import draw_patches
        ids, patch_idx = draw_patches(plan, blocks, draws)
        np_blocks = blocks.cpu().numpy()
        keys = self.shape_key(np_blocks)
        cuts = [0, *(np.flatnonzero(np.diff(keys)) + 1), len(keys)]
        shift = np.array([self.region.y, self.region.x])
        dev_origins = plan.prep.extra["origins"][blocks]
        for a, b in zip(cuts, cuts[1:]):
            fh, fw = (int(v) for v in self.sizes[np_blocks[a]])
            fp = plan.task.intervene(plan.prep, plan.bank_in, patch_idx[a:b], blocks[a:b], ids[a:b], plan.seed,
                                     plan.backend, window=(dev_origins[a:b], (fh, fw)))
            with precision_mode(forward.precision, plan.device):
                out, lo = self.engine.run(fp, self.origins[np_blocks[a:b]] - shift,
                                          self.local_need(np_blocks[a:b]), forward.memory_format)
            yield a, b, out, lo + shift

    def scores(self, plan: "RunPlan", forward, scorer, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """(K, n_rois) PSNRs of interventions (blocks[k], draws[k]), each computed on its rectangles."""
        rows = self.windows.rows(blocks.cpu().numpy())
        parts = [scorer(out, rows[a:b], origins=torch.from_numpy(lo).to(out.device))
                 for a, b, out, lo in self.outputs(plan, forward, blocks, draws)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


VERIFY_BLOCKS = 4
MIN_GAIN = 1.2  # fewer convolution pixels than the windows (or the crop) needed to be worth it


def plan_incremental(plan: "RunPlan") -> dict:
    """Decide whether interventions are recomputed incrementally: the engine (or the reason it does not apply),
    the unintervened activations, and a check against the crop on a few blocks. Sets ``plan.incremental``; returns
    what summary.json says."""
    from ..locality import VERIFY_TOL, Window, _verification_blocks
    from .plan import verification_inputs
    from .precision import precision_mode
    from .windows import Spread, block_windows
    info = plan.locality.info
    if plan.options.incremental == "off":
        return {"used": False, "reason": "asked (incremental: off)"}
    if "verify_max_abs_err" not in info:
        return {"used": False, "reason": "locality was not verified: " + str(info.get("reason", "off"))}
    spread_px = (info.get("windows") or {}).get("spread_px")
    if spread_px is None:
        return {"used": False, "reason": "no measured spread: " + str((info.get("windows") or {}).get("reason"))}
    try:
        engine = build_engine(plan)
    except Unsupported as e:
        return {"used": False, "reason": str(e)}
    spread = Spread(*spread_px)
    R = engine.output_radius()
    if R[0] < max(spread.up, spread.down) or R[1] < max(spread.left, spread.right):
        return {"used": False, "reason": f"the graph's reach {list(R)} px is smaller than the measured spread "
                                         f"{list(spread_px)}"}
    windows = plan.windows if plan.windows is not None else block_windows(plan, spread)
    region = plan.locality.window or Window(0, 0, plan.grid.in_h, plan.grid.in_w)
    inc = IncrementalPlan(engine, windows, region, plan.prep.extra["origins"].cpu().numpy(),
                          plan.prep.extra["sizes"].cpu().numpy())
    # counted first: against what the run would do otherwise (every convolution on each block's window, or on
    # the crop), each block's own rectangles
    blocks = windows.blocks
    shift = np.array([region.y, region.x])
    mine = sum(engine.conv_pixels(inc.origins[blocks[k:k + 1]] - shift, tuple(inc.sizes[blocks[k]]),
                                  inc.local_need(blocks[k:k + 1])) for k in range(len(blocks)))
    other = windows.pixels() if plan.windows is not None else len(blocks) * region.h * region.w
    facts = {"conv_px_per_intervention": int(mine) // max(1, len(blocks)),
             "instead_of": "windows" if plan.windows is not None else "crop",
             "instead_conv_px_per_intervention": int(other) * engine.n_convs() // max(1, len(blocks)),
             "reach_px": list(R)}
    facts["fewer_conv_px"] = round(facts["instead_conv_px_per_intervention"] /
                                   max(1, facts["conv_px_per_intervention"]), 3)
    if facts["fewer_conv_px"] < MIN_GAIN:
        return {"used": False, "reason": f"saves too little over the {facts['instead_of']} "
                                         f"({facts['fewer_conv_px']:.2f}x the convolution pixels)", **facts}
    crop_in = region.crop(plan.prep.base).unsqueeze(0)
    try:
        with precision_mode(plan.forward.precision, plan.device):
            base_out = engine.materialise(crop_in.contiguous(memory_format=plan.forward.memory_format),
                                          plan.grid.in_block)
    except Unsupported as e:
        return {"used": False, "reason": str(e), **facts}
    # the check: a few blocks (the reach's corners, one inside), draw 0, against the model on the crop
    err = float((base_out.float() - plan.forward(crop_in).float()).abs().max())
    picks = _verification_blocks(plan.locality.reach.any(0), VERIFY_BLOCKS, plan.grid.cols)
    for b in picks:
        bt = torch.tensor([int(b)], device=plan.device)
        (_, _, box, lo), = inc.outputs(plan, plan.forward, bt, torch.zeros_like(bt))
        crop = plan.forward(verification_inputs(plan, np.array([int(b)], dtype=np.int64), region))[0]
        by, bx = (int(v) for v in lo[0])
        for y0, x0, y1, x1 in windows.changed[windows.rows(np.array([b]))[0]]:
            if y0 >= y1 or x0 >= x1:
                continue
            a = box[0, :, y0 - by:y1 - by, x0 - bx:x1 - bx].float()
            c = crop[:, y0 - region.y:y1 - region.y, x0 - region.x:x1 - region.x].float()
            err = max(err, float((a - c).abs().max()))
    tol = VERIFY_TOL[plan.options.precision]
    if not err <= tol:
        engine.release()
        return {"used": False, "reason": f"incremental outputs differ from the crop's by {err:.3g} "
                                         f"(tolerance {tol:g})", **facts}
    plan.incremental = inc
    return {"used": True, "verify_max_abs_err": err, **facts}
