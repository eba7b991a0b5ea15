"""Incremental recomputation (issue 15): each intervention recomputes, layer by layer, only what it changes.

An intervention changes the input only on its block's footprint ``F``. Through a same-padded stride-1 convolution
of radius ``k`` a change grows by ``k`` pixels per side, through a pointwise op (activation, eval batch norm, a
residual sum) not at all, through a pixel shuffle or an upsampling by ``f`` it is scaled by ``f`` (plus the
interpolation's support); so node ``v`` of the model's graph can differ from its unintervened value only on its
*box*, ``F`` at the node's scale grown by ``r(v)``. And only the part of ``v`` within ``rem(v)`` (what lies
between ``v`` and the output, a reverse pass) of the output rectangle the ROIs need matters. The engine therefore

1. traces the model with ``torch.fx`` and checks that every node is a supported op (below); anything else, and
   the run keeps the window path (summary.json: ``incremental.reason``);
2. materialises, once per run, the unintervened activations that some op reads on another rectangle than their
   own (a convolution's input around it, the input image of a residual or an upsampling), on the run's region
   (the locality crop, or the whole input), zero-padded, channels-last;
3. for a batch of interventions (one footprint shape, any positions), computes every node only on its rectangle:
   its box cut to what the output needs, one size for the batch (the largest), per-intervention positions. A
   convolution reads its input's rectangle grown by its radius (the changed rectangle pasted into the gathered
   unintervened values), zeroes what lies outside the region (its zero padding) and runs without padding; a pixel
   shuffle or an upsampling runs on the cover of its rectangle (an interpolation's reads outside the region
   clamped to its edge, as on the whole image) and cuts each intervention's part out; a pointwise op reads its
   arguments on its own rectangle. The output rectangle is scored by the exact composition of the windows
   (base error minus the base part plus the new part).

The result equals the model run on the region up to float round-off (convolution algorithms differ with the input
size); every run checks the unintervened output and a few interventions against the model on the crop and reports
the largest difference.

Supported: ``Conv2d`` (stride 1, zero "same" padding, any odd kernel, dilation, groups), eval ``BatchNorm2d``,
elementwise activations (modules and functions), ``Dropout`` in eval, ``+ - * /`` between tensors or with
numbers and per-channel constants, ``pixel_shuffle`` and ``interpolate`` / ``Upsample`` by an integer factor
(nearest, bilinear, bicubic; align_corners off): DnCNN/FDnCNN, MSRResNet and EDSR-type networks.
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
# per pixel too: a constant map beside the input (FDnCNN's noise level), channels joined or picked
CHANNEL_FUNCTIONS = {torch.full_like, torch.zeros_like, torch.ones_like, torch.cat, torch.concat}


def _flat_nodes(args) -> list:
    """Every fx node in ``args`` (lists and tuples opened, as torch.cat's)."""
    import torch.fx as fx
    out = []
    for a in args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += _flat_nodes(a)
    return out


def _channel_only(n) -> bool:
    """A getitem or a cat that only picks or joins channels (dims 0 and 1), never pixels."""
    if n.target in (torch.cat, torch.concat):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return dim in (1, -3)
    if n.target is operator.getitem:
        index = n.args[1]
        index = index if isinstance(index, tuple) else (index,)
        return all(isinstance(i, slice) for i in index) and index[0] == slice(None) and \
            all(i == slice(None) for i in index[2:]) and len(index) <= 4
    return True


@dataclass
class _Node:
    """One graph node: ``kind`` input | conv | pointwise | shuffle | upsample | const | output; ``scale``: its
    pixels per input pixel; ``radius`` (ry, rx): how far beyond the footprint (in its own pixels) an intervention
    can change it; ``rem``: how far from the output's needed rectangle its values still matter; ``read``: the
    largest box (radius) a consumer reads; ``keep``: a consumer reads it on another rectangle than its own, so its
    unintervened values are kept (zero-padded by ``read`` and the footprint)."""

    fx: Any
    kind: str
    scale: int = 1
    radius: tuple[int, int] = (0, 0)
    read: list = field(default_factory=lambda: [0, 0])
    rem: list = field(default_factory=lambda: [0, 0])
    keep: bool = False
    conv: Optional[nn.Conv2d] = None
    conv_radius: tuple[int, int] = (0, 0)
    factor: int = 1  # pixel shuffle / upsampling factor
    support: int = 0  # upsampling: input pixels each side that an output pixel reads (bilinear 1, bicubic 2)
    mode: str = ""
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


UPSAMPLE_SUPPORT = {"nearest": 0, "bilinear": 1, "bicubic": 2}


def _upsample(name: str, scale_factor, mode, align_corners, size=None, antialias=False) -> tuple[int, int, str]:
    """(factor, support, mode) of an interpolation the engine computes exactly, else Unsupported."""
    if size is not None or isinstance(scale_factor, (tuple, list)) or scale_factor is None or \
            float(scale_factor) != int(scale_factor) or int(scale_factor) < 1:
        raise Unsupported(f"{name}: interpolation to a size or by a non-integer factor ({scale_factor})")
    if mode not in UPSAMPLE_SUPPORT or align_corners or antialias:
        raise Unsupported(f"{name}: interpolation mode {mode!r} (align_corners={align_corners})")
    return int(scale_factor), UPSAMPLE_SUPPORT[mode], mode


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
        outs = [x for x in self.order if x.kind == "output"]
        arg = outs[0].fx.args[0]
        if not isinstance(arg, fx.Node) or self.nodes[arg].kind == "const":
            raise Unsupported("the model does not return one tensor")
        self.out = self.nodes[arg]
        self._remaining()
        self._last_use = {}
        for i, node in enumerate(self.order):
            for a in self._tensor_args(node):
                self._last_use[a.fx] = i
        self.base: dict[Any, torch.Tensor] = {}
        self.region_hw: tuple[int, int] = (0, 0)
        self._masks: dict = {}
        self.margin = 0

    # ---- analysis ----------------------------------------------------------------------------------------------
    def _tensor_args(self, node: _Node) -> list[_Node]:
        flat = _flat_nodes((*node.fx.args, *node.fx.kwargs.values()))
        return [self.nodes[a] for a in flat if self.nodes[a].kind != "const"]

    @staticmethod
    def _reads(arg: _Node, radius) -> None:
        arg.read = [max(p, r) for p, r in zip(arg.read, radius)]

    def _analyse(self, n) -> _Node:
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
        args = [self.nodes[a] for a in _flat_nodes((*n.args, *n.kwargs.values()))]
        tensors = [a for a in args if a.kind != "const"]
        if not tensors:
            raise Unsupported(f"{n.name}: an op on constants only")
        m = self.gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Conv2d):
            if len(tensors) != 1 or len(n.args) != 1:
                raise Unsupported(f"{n.target}: a convolution called with extra arguments")
            k = _conv_radius(m, n.target)
            src = tensors[0]
            self._reads(src, (src.radius[0] + 2 * k[0], src.radius[1] + 2 * k[1]))
            src.keep = True
            return _Node(n, "conv", scale=src.scale, radius=(src.radius[0] + k[0], src.radius[1] + k[1]), conv=m,
                         conv_radius=k)
        shuffle = isinstance(m, nn.PixelShuffle) or (n.op == "call_function" and n.target in (torch.pixel_shuffle,
                                                                                              F.pixel_shuffle))
        if shuffle:
            r = m.upscale_factor if m is not None else (n.args[1] if len(n.args) > 1 else n.kwargs["upscale_factor"])
            src = tensors[0]
            self._reads(src, (src.radius[0] + 2, src.radius[1] + 2))  # its rectangle's cover of whole groups
            src.keep = True
            return _Node(n, "shuffle", scale=src.scale * r, radius=(src.radius[0] * r, src.radius[1] * r), factor=r)
        if isinstance(m, nn.Upsample) or (n.op == "call_function" and n.target is F.interpolate):
            if m is not None:
                f, t, mode = _upsample(n.target, m.scale_factor, m.mode, m.align_corners, m.size)
            else:
                kw = dict(zip(("size", "scale_factor", "mode", "align_corners"), n.args[1:]))
                kw.update({k: v for k, v in n.kwargs.items() if k in ("size", "scale_factor", "mode",
                                                                       "align_corners", "antialias")})
                kw.setdefault("mode", "nearest")
                kw.setdefault("align_corners", None)
                f, t, mode = _upsample(n.name, **kw)
            src = tensors[0]
            self._reads(src, (src.radius[0] + t + 3, src.radius[1] + t + 3))
            src.keep = True
            return _Node(n, "upsample", scale=src.scale * f,
                         radius=((src.radius[0] + t) * f, (src.radius[1] + t) * f), factor=f, support=t, mode=mode)
        if n.op == "call_module":
            if not isinstance(m, POINTWISE_MODULES):
                raise Unsupported(f"{n.target}: unsupported layer {type(m).__name__}")
            if m.training and isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
                raise Unsupported(f"{n.target}: {type(m).__name__} in training mode")
            module = _non_inplace(m)
        elif n.op == "call_function":
            channel = n.target in CHANNEL_FUNCTIONS or n.target is operator.getitem
            if not (n.target in POINTWISE_FUNCTIONS or (channel and _channel_only(n))):
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
        if len({a.scale for a in tensors}) > 1:
            raise Unsupported(f"{n.name}: combines tensors of different resolutions")
        radius = (max(a.radius[0] for a in tensors), max(a.radius[1] for a in tensors))
        for a in tensors:
            self._reads(a, radius)
        return _Node(n, "pointwise", scale=tensors[0].scale, radius=radius, module=module)

    def _remaining(self) -> None:
        """``rem`` by a reverse pass: a convolution adds its radius, a pixel shuffle or an upsampling divides by its
        factor (rounded up; upsampling adds its support and a pixel). ``keep`` where a pointwise consumer's
        rectangle can differ from the node's own."""
        for node in reversed(self.order):
            if node.kind in ("const", "output", "input"):
                continue
            for a in self._tensor_args(node):
                if node.kind == "conv":
                    need = [node.rem[i] + node.conv_radius[i] for i in (0, 1)]
                elif node.kind == "shuffle":
                    need = [-(-node.rem[i] // node.factor) + 1 for i in (0, 1)]
                elif node.kind == "upsample":
                    need = [-(-node.rem[i] // node.factor) + node.support + 1 for i in (0, 1)]
                else:
                    need = list(node.rem)
                a.rem = [max(a.rem[i], need[i]) for i in (0, 1)]
        for node in self.order:
            if node.kind == "pointwise":
                for a in self._tensor_args(node):  # the input's rectangle is its footprint, never cut
                    if a.kind == "input" or tuple(a.radius) != tuple(node.radius) or list(a.rem) != list(node.rem):
                        a.keep = True

    def output_radius(self) -> tuple[int, int]:
        return self.out.radius

    def output_scale(self) -> int:
        return self.out.scale

    # ---- evaluation -------------------------------------------------------------------------------------------
    def _apply(self, node: _Node, values: dict) -> torch.Tensor:
        """A pointwise node on its arguments' values (already on its rectangles)."""
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

    def _pad(self, node: _Node) -> tuple[int, int]:
        m = self.margin * node.scale
        return node.read[0] + m, node.read[1] + m

    def materialise(self, region_input: torch.Tensor, footprint: int) -> torch.Tensor:
        """The model on the unintervened region (1, C, H, W), keeping zero-padded copies (channels-last: a gather
        copies C contiguous values per pixel) of the activations read on other rectangles; returns its output.
        ``footprint``: the largest footprint side, so far may a footprint lie outside the region (the pixel-tight
        crop cuts through the blocks at the reach's edge)."""
        self.margin = int(footprint)
        self.region_hw = tuple(int(v) for v in region_input.shape[-2:])
        self._masks = {}
        values: dict = {}
        self.base = {}
        for i, node in enumerate(self.order):
            if node.kind == "input":
                v = region_input
            elif node.kind == "const":
                continue
            elif node.kind == "output":
                return values[node.fx.args[0]]
            elif node.kind == "conv":
                v = node.conv(values[node.fx.args[0]])
            elif node.kind == "shuffle":
                v = F.pixel_shuffle(values[node.fx.args[0]], node.factor)
            elif node.kind == "upsample":
                v = F.interpolate(values[node.fx.args[0]], scale_factor=node.factor, mode=node.mode,
                                  align_corners=False if node.mode != "nearest" else None)
            else:
                v = self._apply(node, values)
            values[node.fx] = v
            if node.keep:
                py, px = self._pad(node)
                self.base[node.fx] = F.pad(v[0], (px, px, py, py)).permute(1, 2, 0).contiguous()
            self._free(values, i)
        raise Unsupported("the model's graph has no output")

    def _free(self, values: dict, i: int) -> None:
        for key in [k for k in values if self._last_use.get(k, -1) <= i and k is not self.out.fx]:
            del values[key]

    def _region_mask(self, scale: int, device, dtype) -> tuple[torch.Tensor, tuple[int, int]]:
        """1 inside the region (at ``scale``), 0 around it, padded as far as any node of that scale reads."""
        key = (scale, device, dtype)
        if key not in self._masks:
            H, W = self.region_hw[0] * scale, self.region_hw[1] * scale
            pads = [self._pad(x) for x in self.order if x.scale == scale and x.kind not in ("const", "output")]
            py, px = max(p[0] for p in pads), max(p[1] for p in pads)
            mask = F.pad(torch.ones((1, H, W), device=device, dtype=dtype), (px, px, py, py)).permute(1, 2, 0)
            self._masks[key] = (mask, (py, px))
        return self._masks[key]

    @staticmethod
    def _gather(padded: torch.Tensor, pad, lo: np.ndarray, size) -> torch.Tensor:
        """(B, sy, sx, C) of ``padded`` (H + 2py, W + 2px, C) at positions ``lo`` (B, 2)."""
        from .windows import upload
        ys = lo[:, :1] + pad[0] + np.arange(size[0])
        idx = upload(np.concatenate([ys, lo[:, 1:] + pad[1] + np.arange(size[1])], 1), padded.device)
        return padded[idx[:, :size[0], None], idx[:, None, size[0]:]]

    @staticmethod
    def _take(hwc: torch.Tensor, ys: np.ndarray, xs: np.ndarray) -> torch.Tensor:
        """(B, len(ys[b]), len(xs[b]), C): rows ``ys[b]`` and columns ``xs[b]`` of each ``hwc[b]``."""
        from .windows import upload
        dev = hwc.device
        b = torch.arange(hwc.shape[0], device=dev).view(-1, 1, 1)
        idx = upload(np.concatenate([ys, xs], 1), dev)
        return hwc[b, idx[:, :ys.shape[1], None], idx[:, None, ys.shape[1]:]]

    def _cut(self, node: _Node, origins: np.ndarray, fp, need: np.ndarray, a: int):
        """Along axis ``a``: each intervention's box (the footprint grown by the node's radius) and the part of it
        the output still needs (the needed output rectangle at the node's scale, grown by ``rem``)."""
        s, so = node.scale, self.out.scale
        r, m = node.radius[a], node.rem[a]
        box_lo, box_hi = origins[:, a] * s - r, (origins[:, a] + fp[a]) * s + r
        need_lo = np.floor_divide(need[:, a] * s, so) - m
        need_hi = -np.floor_divide(-need[:, a + 2] * s, so) + m
        return box_lo, box_hi, np.maximum(box_lo, need_lo), np.minimum(box_hi, need_hi)

    def _geometry(self, node: _Node, origins: np.ndarray, fp, need: np.ndarray) -> tuple[np.ndarray, tuple]:
        """``node``'s rectangle per intervention, in its own pixels: the needed part of its box, one size for the
        batch (the largest), kept inside the box: (starts (B, 2), (sy, sx))."""
        if node.kind == "input":
            return origins, tuple(fp)
        lo, size = np.empty_like(origins), []
        for a in (0, 1):
            box_lo, box_hi, first, last = self._cut(node, origins, fp, need, a)
            n = int(max(1, (last - first).max()))
            lo[:, a] = np.clip(first, box_lo, box_hi - n)
            size.append(n)
        return lo, tuple(size)

    def _read(self, node: _Node, values: dict, geo: dict, lo: np.ndarray, size, outside: str) -> torch.Tensor:
        """``node``'s values on the rectangles ``lo`` + ``size`` (B, C, sy, sx): its own rectangle pasted into its
        unintervened values (what lies outside it is unchanged, or not needed). Outside the region: ``zero`` (a
        convolution's padding), ``edge`` (an interpolation's clamped reads) or ``any`` (not needed)."""
        v = values[node.fx]
        own_lo, own_size = geo[node.fx]
        H, W = self.region_hw[0] * node.scale, self.region_hw[1] * node.scale
        inside = (lo >= 0).all() and (lo[:, 0] + size[0] <= H).all() and (lo[:, 1] + size[1] <= W).all()
        if own_size == tuple(size) and np.array_equal(own_lo, lo):
            out = v.permute(0, 2, 3, 1)
        else:
            out = self._gather(self.base[node.fx], self._pad(node), lo, size)  # (B, sy, sx, C)
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
                from .windows import upload
                n_keep = int(keep.sum())
                idx = upload(np.concatenate([np.flatnonzero(keep), target[keep]]), out.device)
                src = v.permute(0, 2, 3, 1).reshape(-1, C)[idx[:n_keep]]
                out.view(-1, C).index_copy_(0, idx[n_keep:], src)
        if not inside and outside == "zero":
            mask, pad = self._region_mask(node.scale, out.device, out.dtype)
            out = out * self._gather(mask, pad, lo, size)
        elif not inside and outside == "edge":  # each position outside reads the region's nearest
            ys = np.clip(lo[:, :1] + np.arange(size[0]), 0, H - 1) - lo[:, :1]
            xs = np.clip(lo[:, 1:] + np.arange(size[1]), 0, W - 1) - lo[:, 1:]
            out = self._take(out, np.clip(ys, 0, size[0] - 1), np.clip(xs, 0, size[1] - 1))
        return out.permute(0, 3, 1, 2)

    def _resample(self, node: _Node, values: dict, geo: dict, lo: np.ndarray, size) -> torch.Tensor:
        """A pixel shuffle or an upsampling on its rectangles: its input on the cover of each (whole groups; with
        the interpolation's support and a pixel more), the op, then each intervention's own rectangle cut out."""
        src, f = self.nodes[node.fx.args[0]], node.factor
        extra = 0 if node.kind == "shuffle" else node.support + 1
        lo_in = np.floor_divide(lo, f) - extra
        size_in = tuple(-(-size[a] // f) + 1 + 2 * extra for a in (0, 1))
        x = self._read(src, values, geo, lo_in, size_in, "any" if node.kind == "shuffle" else "edge")
        if node.kind == "shuffle":
            y = F.pixel_shuffle(x, f)
        else:
            y = F.interpolate(x, scale_factor=f, mode=node.mode,
                              align_corners=False if node.mode != "nearest" else None)
        off = lo - lo_in * f
        ys, xs = off[:, :1] + np.arange(size[0]), off[:, 1:] + np.arange(size[1])
        return self._take(y.permute(0, 2, 3, 1), ys, xs).permute(0, 3, 1, 2)

    def run(self, block_input: torch.Tensor, origins: np.ndarray, need: np.ndarray,
            memory_format=torch.contiguous_format) -> tuple[torch.Tensor, np.ndarray]:
        """Outputs of interventions whose input changed only on their footprint: ``block_input`` (B, C, fh, fw)
        the new footprint pixels at region positions ``origins`` (B, 2, input px); ``need`` (B, 4)
        ``[y0, x0, y1, x1]`` the output rectangle each must get right (region output px). Returns (B, C, sy, sx)
        outputs on rectangles that hold it, and their starts (B, 2, output px)."""
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
                               "zero")
                c = node.conv
                values[node.fx] = F.conv2d(x.contiguous(memory_format=memory_format), c.weight, c.bias, 1, 0,
                                           c.dilation, c.groups)
            elif node.kind in ("shuffle", "upsample"):
                values[node.fx] = self._resample(node, values, geo, lo, size)
            else:
                args = {a.fx: self._read(a, values, geo, lo, size, "any") for a in self._tensor_args(node)}
                values[node.fx] = self._apply(node, {**values, **args})
            self._free(values, i)
        raise Unsupported("the model's graph has no output")

    def conv_pixels(self, origins: np.ndarray, fp, need: np.ndarray) -> int:
        """Output pixels of every convolution over interventions at ``origins`` (each on its own rectangle, as if
        alone in its batch), against which the window path's (every convolution on the whole window) is counted."""
        total = 0
        for x in self.order:
            if x.kind == "conv":
                sides = [np.maximum(1, last - first) for _, _, first, last in
                         (self._cut(x, origins, fp, need, a) for a in (0, 1))]
                total += int((sides[0] * sides[1]).sum())
        return total

    def window_conv_pixels(self, window_px: int) -> int:
        """Output pixels of every convolution for a forward on a window of ``window_px`` input pixels."""
        return sum(window_px * x.scale * x.scale for x in self.order if x.kind == "conv")

    def kept_bytes(self, H: int, W: int, channels: int, item: int) -> int:
        """Bytes of the unintervened activations :meth:`materialise` keeps for an ``H x W`` region."""
        ch: dict = {}
        total = 0
        for x in self.order:
            if x.kind == "input":
                ch[x.fx] = channels
            elif x.kind == "conv":
                ch[x.fx] = x.conv.out_channels
            elif x.kind == "shuffle":
                ch[x.fx] = ch[self._tensor_args(x)[0].fx] // (x.factor * x.factor)
            elif x.kind == "pointwise" and x.fx.target in (torch.cat, torch.concat):
                ch[x.fx] = sum(ch[a.fx] for a in self._tensor_args(x))
            elif x.kind in ("pointwise", "upsample"):
                ch[x.fx] = max(ch[a.fx] for a in self._tensor_args(x))
            if x.keep:
                py, px = self._pad(x)
                total += (H * x.scale + 2 * py) * (W * x.scale + 2 * px) * ch[x.fx] * item
        return total

    def release(self) -> None:
        """Drop the unintervened activations (a run that does not use the engine)."""
        self.base, self._masks = {}, {}


def build_engine(plan: "RunPlan") -> IncrementalEngine:
    """The engine for this run, or :class:`Unsupported` with the reason."""
    if plan.options.compile:
        raise Unsupported("the model is compiled (compile=...)")
    model = getattr(plan.model, "_orig_mod", plan.model)
    engine = IncrementalEngine(model)
    if engine.output_scale() != plan.task.scale:
        raise Unsupported(f"the traced graph upscales x{engine.output_scale()}, the task x{plan.task.scale}")
    return engine


@dataclass
class IncrementalPlan:
    """The engine, its region (input px), the tables of what each block can change (from the windows: C_bj) and
    ``need`` (n, 4): per block of the tables, the output rectangle ``[y0, x0, y1, x1]`` holding its C_bj."""

    engine: IncrementalEngine
    windows: Any  # BlockWindows
    region: Any  # locality.Window
    origins: np.ndarray  # (num_blocks, 2) input px of every footprint (host)
    sizes: np.ndarray  # (num_blocks, 2)
    precision: str = "fp32"  # of the unintervened activations: a forward at another precision cannot use them
    need: np.ndarray = None

    def __post_init__(self):
        c = self.windows.changed  # (n, n_rois, 4), empty rectangles all zero
        empty = (c[..., 0] >= c[..., 2]) | (c[..., 1] >= c[..., 3])
        big = np.iinfo(np.int64).max
        lo = [np.where(empty, big, c[..., i]).min(1) for i in (0, 1)]
        hi = [np.where(empty, -1, c[..., i]).max(1) for i in (2, 3)]
        need = np.stack([lo[0], lo[1], hi[0], hi[1]], 1)
        self.need = np.where(empty.all(1)[:, None], 0, need)  # a block that changes no ROI needs nothing

    def shape_key(self, blocks: np.ndarray) -> np.ndarray:
        """(n,) one integer per footprint shape: a batch holds one."""
        return self.sizes[blocks, 0] * 1_000_003 + self.sizes[blocks, 1]

    def sort_key(self, blocks: np.ndarray) -> np.ndarray:
        """The order blocks run in: by footprint shape, then by the size of what they need (a batch takes its
        largest rectangle, so similar ones together)."""
        n = self.need[self.windows.rows(blocks)]
        return self.shape_key(blocks) * 10**9 + (n[:, 2] - n[:, 0]) * 40_000 + (n[:, 3] - n[:, 1])

    def local_need(self, blocks: np.ndarray) -> np.ndarray:
        s = self.engine.output_scale()
        return self.need[self.windows.rows(blocks)] - np.array([self.region.y * s, self.region.x * s] * 2)

    def outputs(self, plan: "RunPlan", forward, blocks: torch.Tensor, draws: torch.Tensor,
                np_blocks: Optional[np.ndarray] = None):
        """Yields (first, last, outputs, absolute output origins (K, 2)) per footprint shape of the batch
        (``np_blocks``: the blocks on the host, when the caller has them: one device-to-host copy less)."""
        from .precision import precision_mode
        from .runner import draw_patches
        ids, patch_idx = draw_patches(plan, blocks, draws)
        np_blocks = blocks.cpu().numpy() if np_blocks is None else np_blocks
        keys = self.shape_key(np_blocks)
        cuts = [0, *(np.flatnonzero(np.diff(keys)) + 1), len(keys)]
        shift = np.array([self.region.y, self.region.x])
        s = self.engine.output_scale()
        dev_origins = plan.prep.extra["origins"][blocks]
        for a, b in zip(cuts, cuts[1:]):
            fh, fw = (int(v) for v in self.sizes[np_blocks[a]])
            fp = plan.task.intervene(plan.prep, plan.bank_in, patch_idx[a:b], blocks[a:b], ids[a:b], plan.seed,
                                     plan.backend, window=(dev_origins[a:b], (fh, fw)))
            with precision_mode(forward.precision, plan.device):
                out, lo = self.engine.run(fp, self.origins[np_blocks[a:b]] - shift,
                                          self.local_need(np_blocks[a:b]), forward.memory_format)
            yield a, b, out, lo + shift * s

    def scores(self, plan: "RunPlan", forward, scorer, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """(K, n_rois) PSNRs of interventions (blocks[k], draws[k]), each computed on its rectangles."""
        from .windows import upload
        np_blocks = blocks.cpu().numpy()  # the batch's one wait for the device (the geometry is the host's)
        rows = self.windows.rows(np_blocks)
        parts = [scorer(out, rows[a:b], origins=upload(lo, out.device))
                 for a, b, out, lo in self.outputs(plan, forward, blocks, draws, np_blocks)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free where the unintervened activations would go: the device's on CUDA, else the host's (one place,
    so that a test can stand for either)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    from .samples import available_memory
    return available_memory()


MIN_GAIN = 1.2  # fewer convolution pixels than the windows (or the crop) needed to be worth it


def plan_incremental(plan: "RunPlan") -> dict:
    """Decide whether interventions are recomputed incrementally: the engine (or the reason it does not apply),
    the unintervened activations, and a check against the crop on a few blocks. Sets ``plan.incremental``; returns
    what summary.json says."""
    from ..locality import VERIFY_TOL, Window
    from .precision import precision_mode
    from .windows import Spread, block_windows, largest_difference_from_crop
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
    windows_info = info.get("windows") or {}
    if windows_info.get("check_failed"):  # the changed rectangles themselves are in doubt
        return {"used": False, "reason": "the windows' check failed: " + windows_info["reason"]}
    windows = plan.windows if plan.windows is not None else block_windows(plan, spread)
    region = plan.locality.window or Window(0, 0, plan.grid.in_h, plan.grid.in_w)
    inc = IncrementalPlan(engine, windows, region, plan.prep.extra["origins"].cpu().numpy(),
                          plan.prep.extra["sizes"].cpu().numpy(), plan.forward.precision)
    rel = inc.origins[windows.blocks] - np.array([region.y, region.x])
    fp = inc.sizes[windows.blocks]
    if ((rel + fp <= 0) | (rel >= np.array([region.h, region.w]))).any():
        return {"used": False, "reason": "a block that reaches the ROIs lies outside the crop"}
    # counted first: against what the run would do otherwise (every convolution on each block's window, or on
    # the crop), each block's own rectangles
    blocks = windows.blocks
    shift = np.array([region.y, region.x])
    keys = inc.shape_key(blocks)
    mine = sum(engine.conv_pixels(inc.origins[blocks[keys == k]] - shift, tuple(inc.sizes[blocks[keys == k][0]]),
                                  inc.local_need(blocks[keys == k])) for k in np.unique(keys))
    other = windows.pixels() if plan.windows is not None else len(blocks) * region.h * region.w
    facts = {"conv_px_per_intervention": int(mine) // max(1, len(blocks)),
             "instead_of": "windows" if plan.windows is not None else "crop",
             "instead_conv_px_per_intervention": engine.window_conv_pixels(int(other)) // max(1, len(blocks)),
             "reach_px": list(R)}
    facts["fewer_conv_px"] = round(facts["instead_conv_px_per_intervention"] /
                                   max(1, facts["conv_px_per_intervention"]), 3)
    if facts["fewer_conv_px"] < MIN_GAIN:
        return {"used": False, "reason": f"saves too little over the {facts['instead_of']} "
                                         f"({facts['fewer_conv_px']:.2f}x the convolution pixels)", **facts}
    crop_in = region.crop(plan.prep.base).unsqueeze(0)
    engine.margin = plan.grid.in_block
    need = engine.kept_bytes(region.h, region.w, crop_in.shape[1], crop_in.element_size())
    avail = free_memory(plan.device)
    if avail is not None and need > avail // 4:
        return {"used": False, "reason": f"the unintervened activations of the {region.h}x{region.w} region would "
                                         f"take {need / 2**30:.1f} GiB, more than a quarter of the "
                                         f"{avail / 2**30:.1f} GiB available", **facts}
    try:
        with precision_mode(plan.forward.precision, plan.device):
            base_out = engine.materialise(crop_in.contiguous(memory_format=plan.forward.memory_format),
                                          plan.grid.in_block)
    except Unsupported as e:
        return {"used": False, "reason": str(e), **facts}
    except RuntimeError as e:  # out of memory, or an op that does not run on this device: the windows do
        engine.release()
        return {"used": False, "reason": f"the unintervened activations failed: {type(e).__name__}: "
                                         f"{e}".splitlines()[0], **facts}
    # the check: the unintervened output, then a few blocks against the model on the crop (as the windows')
    err = float((base_out.float() - plan.forward(crop_in).float()).abs().max())

    def own(b: int):
        bt = torch.tensor([b], device=plan.device)
        (_, _, out, lo), = inc.outputs(plan, plan.forward, bt, torch.zeros_like(bt))
        return out[0], tuple(int(v) for v in lo[0])
    err = max(err, largest_difference_from_crop(plan, windows, region, own))
    tol = VERIFY_TOL[plan.options.precision]
    if not err <= tol:
        engine.release()
        return {"used": False, "reason": f"incremental outputs differ from the crop's by {err:.3g} "
                                         f"(tolerance {tol:g})", **facts}
    plan.incremental = inc
    return {"used": True, "verify_max_abs_err": err, **facts}
