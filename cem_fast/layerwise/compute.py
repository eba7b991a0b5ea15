"""Evaluation of a model layer by layer on rectangles: the unintervened activations of a region, kept once, and
batches of interventions each recomputed only on what it changes (see :mod:`cem_fast.layerwise`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..transfers import upload
from .graph import GraphAnalysis, Unsupported, _Node

class LayerwiseGraph(GraphAnalysis):
    """The traced model, its boxes and the unintervened activations of one region."""

    def __init__(self, model):
        super().__init__(model)
        self.base: dict = {}  # per kept node: its unintervened values on the region, zero-padded, channels-last
        self.region_hw: tuple[int, int] = (0, 0)
        self._masks: dict = {}
        self.margin = 0

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

        ys = lo[:, :1] + pad[0] + np.arange(size[0])
        idx = upload(np.concatenate([ys, lo[:, 1:] + pad[1] + np.arange(size[1])], 1), padded.device)
        return padded[idx[:, :size[0], None], idx[:, None, size[0]:]]

    @staticmethod
    def _take(hwc: torch.Tensor, ys: np.ndarray, xs: np.ndarray) -> torch.Tensor:
        """(B, len(ys[b]), len(xs[b]), C): rows ``ys[b]`` and columns ``xs[b]`` of each ``hwc[b]``."""

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

