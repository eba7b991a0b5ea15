"""The one place that loads the C++ extension ``cem_fast._C`` (the cpp and cuda backends use it from here).

Loading it registers the ``torch.ops.cem_fast`` operators (csrc/bindings.cpp): ``intervene``, ``intervene_into``
(writes a caller's buffer), ``roi_sq_err`` and ``roi_sq_err_multi``, with CPU kernels and, in a CUDA build, CUDA
kernels. This module registers
their fake kernels (csrc/bindings.cpp names it with ``m.set_python_module``), so that torch.compile and
torch.export trace through them, and says in one line why the extension cannot be used: it is not built, or it was
built against another torch or CUDA version than the running one (setup.py records what it was built against, in
``_C.build_info()`` and, readable when the library no longer loads, in ``_C.build.json`` beside it).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch

from . import op_args
from .geometry import rois_table

REBUILD = "rebuild it: `make ext`, or `pip install --no-build-isolation -e .`"


def running_build() -> dict:
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda or ""}


def build_mismatch(built: dict) -> Optional[str]:
    """Why an extension built as ``built`` cannot run with this torch (None: it can)."""
    now = running_build()
    if (built.get("torch"), built.get("torch_cuda") or "") == (now["torch"], now["torch_cuda"]):
        return None
    return (f"cem_fast._C was built against torch {built.get('torch')} (CUDA {built.get('torch_cuda') or 'none'}) "
            f"but torch {now['torch']} (CUDA {now['torch_cuda'] or 'none'}) is running; {REBUILD}")


def _recorded_build() -> Optional[dict]:
    try:
        with open(os.path.join(os.path.dirname(__file__), "_C.build.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _import_extension():
    """``cem_fast._C``, or the build that ``CEM_FAST_EXTENSION`` names (a path to a library: the sanitizer build of
    ``make sanitize``, kept apart from the installed one)."""
    path = os.environ.get("CEM_FAST_EXTENSION")
    if not path:
        from . import _C
        return _C
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
    if spec is None or not os.path.isfile(path):
        raise ImportError(f"CEM_FAST_EXTENSION={path!r} is not a library file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    return module


def _load():
    """(the module, None) or (None, why it cannot be used)."""
    try:
        _C = _import_extension()
    except ImportError as e:  # not built, or built against another torch (undefined symbols)
        recorded = _recorded_build()
        why = build_mismatch(recorded) if recorded else None
        first_line = (str(e).splitlines() or [""])[0]
        return None, why or f"cem_fast._C is not built ({first_line}); run `pip install --no-build-isolation -e .`"
    why = build_mismatch(_C.build_info())
    return (None, why) if why else (_C, None)


_C, IMPORT_ERROR = _load()
#: whether the loaded extension has the CUDA kernels (a CUDA torch and toolkit at build time)
HAS_CUDA_KERNELS: bool = _C is not None and bool(_C.build_info()["cuda_kernels"])


@contextlib.contextmanager
def trusted_indices():
    """While the pipeline's fast paths call the operators: the CUDA kernels skip their host-side value checks
    (each a synchronisation); the CPU ones check anyway (it costs no synchronisation)."""
    if _C is None or not hasattr(_C, "set_trusted_indices"):
        yield
        return
    was = _C.set_trusted_indices(True)
    try:
        yield
    finally:
        _C.set_trusted_indices(was)


def _register_fakes() -> None:
    # here, in the module that csrc/bindings.cpp names (torch checks that the fakes come from it)
    torch.library.register_fake("cem_fast::intervene", op_args.intervene_fake)
    torch.library.register_fake("cem_fast::intervene_into", op_args.intervene_into_fake)
    torch.library.register_fake("cem_fast::roi_sq_err", op_args.roi_sq_err_fake)
    torch.library.register_fake("cem_fast::roi_sq_err_multi", op_args.roi_sq_err_multi_fake)


if _C is not None:
    _register_fakes()


# --- the operators with the signatures of the torch reference (the cpp and cuda backends: one dispatcher each) -----

def intervene(base, patches, patch_idx, origins, sizes, **kwargs):
    return op_args.call_intervene(torch.ops.cem_fast.intervene, torch.ops.cem_fast.intervene_into,
                                  base, patches, patch_idx, origins, sizes, **kwargs)


def roi_sq_err(outputs: torch.Tensor, target: torch.Tensor, roi) -> torch.Tensor:
    return torch.ops.cem_fast.roi_sq_err(outputs, target, roi.y, roi.x)


def roi_sq_err_multi(outputs: torch.Tensor, target: torch.Tensor, rois) -> torch.Tensor:
    """(K, n) for n ROIs; any n (CUDA: one launch per 65,535 ROIs, the grid's limit). The table is made on the
    outputs' device once per ROI list, its bounds checked on the host."""
    table = rois_table(rois, outputs.shape[2], outputs.shape[3], outputs.device)
    return torch.ops.cem_fast.roi_sq_err_multi(outputs, target, table)
