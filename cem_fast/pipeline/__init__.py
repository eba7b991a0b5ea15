"""The CEM pipeline, in the order of the method (METHOD.md):

1. :mod:`cem_fast.options` - what the user asked for, checked once (vocabularies and defaults defined there only).
2. :mod:`.plan` - a :class:`~.plan.RunPlan`: model placement and precision (:mod:`.model`), the task applied to
   the image, the ROIs, the locality plan (which blocks can reach the ROIs, on which input crop), the batch size,
   the cache entry.
3. :mod:`.runner` - the interventions in batches on the device (fused intervene -> model -> ROI scores), with
   out-of-memory back-off, the crash-safe cache and asynchronous score copies.
4. :mod:`.samples` - the two stages (coarse, then fine on the gated blocks) and the effects
   ``Y(I) - mean_k Y_k``; :mod:`.precision` re-checks reduced precision against fp32.
5. :mod:`.assemble` - pictures, timings and the :class:`~cem_fast.result.CEMResults`.

:func:`cem_fast.causal_effect_maps` (in :mod:`cem_fast.estimator`) is the public entry; :func:`.run.run_cem` runs
the steps. This package's ``__init__`` imports nothing.
"""
