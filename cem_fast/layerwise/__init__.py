"""Layer-by-layer recomputation of a model for changes confined to small input rectangles.

A change of the input on a footprint ``F`` grows through a same-padded stride-1 convolution of radius ``k`` by
``k`` pixels per side, through a pointwise op (activation, eval batch norm, a residual sum) not at all, and through
a pixel shuffle or an upsampling by ``f`` it is scaled by ``f`` (plus the interpolation's support). So node ``v`` of
the model's graph can differ from its unintervened value only on its *box*, ``F`` at the node's scale grown by
``r(v)``; and only the part of ``v`` within ``rem(v)`` (what lies between ``v`` and the output, a reverse pass) of
the output rectangle the caller needs matters. :class:`LayerwiseGraph`

1. traces the model with ``torch.fx`` and checks that every node is a supported op (:mod:`.graph`); anything else
   raises :class:`Unsupported` with the reason;
2. materialises, once per region, the unintervened activations that some op reads on another rectangle than their
   own (a convolution's input around it, the input image of a residual or an upsampling), zero-padded,
   channels-last (:meth:`LayerwiseGraph.materialise`);
3. for a batch of changed footprints (one footprint shape, any positions), computes every node only on its
   rectangle: its box cut to what the output needs, one size for the batch (the largest), per-change positions. A
   convolution reads its input's rectangle grown by its radius (the changed rectangle pasted into the gathered
   unintervened values), zeroes what lies outside the region (its zero padding) and runs without padding; a pixel
   shuffle or an upsampling runs on the cover of its rectangle (an interpolation's reads outside the region
   clamped to its edge, as on the whole image) and cuts each change's part out; a pointwise op reads its
   arguments on its own rectangle (:meth:`LayerwiseGraph.run`).

The result equals the model run on the region up to float round-off (convolution algorithms differ with the input
size). Nothing here knows of CEM: :mod:`cem_fast.pipeline.engines.incremental` builds the CEM engine on it.
"""
from .compute import LayerwiseGraph
from .graph import Unsupported

__all__ = ["LayerwiseGraph", "Unsupported"]
