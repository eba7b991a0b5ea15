"""The CEM pipeline, in the order of the method (METHOD.md), each module importing only those before it:

1. :mod:`.request` - what the caller asked for (:class:`~.request.RunRequest`); the options themselves are
   :mod:`cem_fast.options`, checked once.
2. :mod:`.plan` - a frozen :class:`~.plan.RunPlan`: :func:`~.plan.prepare` loads and places the model
   (:mod:`.model`: memory format, precision), applies the task to the image, parses the ROIs and puts the patch
   bank on the device; :func:`~.plan.plan_sampling` runs the unintervened forward, the locality probe (which
   blocks can reach the ROIs, on which input crop) and sizes the batches. Draws and the inputs they make are
   :mod:`.draws`; memory figures :mod:`.memory`.
3. :mod:`.engines` - how the interventions are computed (the crop, intervention-centred windows, layer by
   layer), chosen by :func:`.engines.select.choose_engine` with a typed verdict per candidate; :mod:`.budget` says
   what the plan will cost and whether many ROIs share one pass.
4. :mod:`.runner` - the interventions in batches on the device through the engine (scored by :mod:`.scoring`),
   with out-of-memory back-off, the crash-safe cache and asynchronous score copies.
5. :mod:`.stages` - coarse-to-fine, exhaustive or adaptive draws; :mod:`.samples` - the effects
   ``Y(I) - mean_k Y_k`` and their errors (:mod:`.covariates` for the control variates); :mod:`.origin` - Y(I),
   checked at the end; :mod:`.precision` re-checks reduced precision against fp32.
6. :mod:`.assemble` - pictures, timings and the :class:`~cem_fast.result.CEMResults`.

:func:`cem_fast.causal_effect_maps` (in :mod:`cem_fast.estimator`) is the public entry; :func:`.run.run_cem` runs
the steps. This package's ``__init__`` imports nothing.
"""
