"""cem_fast: fast Causal Effect Maps for image-restoration networks.

>>> import cem_fast
>>> res = cem_fast.causal_effect_map(model, "image.png", task="DN", sigma=50, roi=(152, 96, 32))
>>> res.cem            # (rows, cols) dB, + helps the ROI, - hurts it
>>> res.save("out/")   # result.npz, summary.json, cem.png, pie.png, ...

The public names are imported on first use (PEP 562), so ``import cem_fast`` and the CLI start without torch:
a Ctrl-C while torch loads is then caught by the CLI like any other interrupt.
"""
from __future__ import annotations

import importlib
import importlib.util

from ._version import __version__

_PUBLIC = {
    "causal_effect_map": "estimator", "causal_effect_maps": "estimator", "causal_field": "field", "load_field": "field",
    "CausalField": "field_result", "load_image": "images",
    "ROI": "geometry", "BlockGrid": "geometry", "load_model": "models", "compare_models": "compare",
    "difference": "compare", "intervene": "ops", "roi_psnr": "ops", "roi_sq_err": "ops", "roi_sq_err_multi": "ops",
    "roi_grid": "reference", "PatchBank": "patches", "load_patch_bank": "patches", "CEMResult": "result",
    "CEMResults": "result", "CustomTask": "tasks", "Denoise": "tasks", "Derain": "tasks", "Identity": "tasks",
    "SuperResolution": "tasks", "Task": "tasks", "make_task": "tasks", "study": "studies", "Study": "studies",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a submodule: cem_fast.models, cem_fast.ops...
        raise AttributeError(f"module 'cem_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__():
    return sorted(__all__)
