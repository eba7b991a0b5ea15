"""The analysis of a model's graph for layer-by-layer recomputation: what each node is, how far a change of the
input can reach through it (its *radius*) and how far from the needed output its values still matter (*rem*).

Supported: ``Conv2d`` (stride 1, zero "same" padding, any odd kernel, dilation, groups), eval ``BatchNorm2d``,
elementwise activations (modules and functions), ``Dropout`` in eval, ``+ - * /`` between tensors or with
numbers and per-channel constants, channel joins and picks, ``pixel_shuffle`` and ``interpolate`` / ``Upsample``
by an integer factor (nearest, bilinear, bicubic; align_corners off). Anything else raises :class:`Unsupported`
with the reason in one line.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

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


class GraphAnalysis:
    """The traced model and, per node, its kind, scale, radius, rem and whether its unintervened values are kept."""

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

    def _tensor_args(self, node: _Node) -> list[_Node]:
        flat = _flat_nodes((*node.fx.args, *node.fx.kwargs.values()))
        return [self.nodes[a] for a in flat if self.nodes[a].kind != "const"]

    @staticmethod
    def _reads(arg: _Node, radius) -> None:
        arg.read = [max(p, r) for p, r in zip(arg.read, radius)]

    def _analyse(self, n) -> _Node:
        """The node of fx node ``n`` (its arguments are analysed already), or :class:`Unsupported`."""
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
            return self._conv_node(n, m, tensors)
        if isinstance(m, nn.PixelShuffle) or (n.op == "call_function" and n.target in (torch.pixel_shuffle,
                                                                                       F.pixel_shuffle)):
            return self._shuffle_node(n, m, tensors[0])
        if isinstance(m, nn.Upsample) or (n.op == "call_function" and n.target is F.interpolate):
            return self._upsample_node(n, m, tensors[0])
        return self._pointwise_node(n, m, tensors)

    def _conv_node(self, n, m: nn.Conv2d, tensors: list) -> _Node:
        if len(tensors) != 1 or len(n.args) != 1:
            raise Unsupported(f"{n.target}: a convolution called with extra arguments")
        k = _conv_radius(m, n.target)
        src = tensors[0]
        self._reads(src, (src.radius[0] + 2 * k[0], src.radius[1] + 2 * k[1]))
        src.keep = True
        return _Node(n, "conv", scale=src.scale, radius=(src.radius[0] + k[0], src.radius[1] + k[1]), conv=m,
                     conv_radius=k)

    def _shuffle_node(self, n, m, src: _Node) -> _Node:
        r = m.upscale_factor if m is not None else (n.args[1] if len(n.args) > 1 else n.kwargs["upscale_factor"])
        self._reads(src, (src.radius[0] + 2, src.radius[1] + 2))  # its rectangle's cover of whole groups
        src.keep = True
        return _Node(n, "shuffle", scale=src.scale * r, radius=(src.radius[0] * r, src.radius[1] * r), factor=r)

    def _upsample_node(self, n, m, src: _Node) -> _Node:
        if m is not None:
            f, t, mode = _upsample(n.target, m.scale_factor, m.mode, m.align_corners, m.size)
        else:
            kw = dict(zip(("size", "scale_factor", "mode", "align_corners"), n.args[1:]))
            kw.update({k: v for k, v in n.kwargs.items() if k in ("size", "scale_factor", "mode",
                                                                   "align_corners", "antialias")})
            kw.setdefault("mode", "nearest")
            kw.setdefault("align_corners", None)
            f, t, mode = _upsample(n.name, **kw)
        self._reads(src, (src.radius[0] + t + 3, src.radius[1] + t + 3))
        src.keep = True
        return _Node(n, "upsample", scale=src.scale * f,
                     radius=((src.radius[0] + t) * f, (src.radius[1] + t) * f), factor=f, support=t, mode=mode)

    def _pointwise_node(self, n, m, tensors: list) -> _Node:
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

