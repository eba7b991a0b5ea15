"""Model loading from specs: ``bicubic[:xS]``, ``default`` (the shipped denoiser), ``pkg.module:factory``,
a TorchScript file, or a checkpoint whose architecture is recognised (KAIR DnCNN)."""
from __future__ import annotations

import hashlib
import importlib
import re
import zipfile
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .bicubic import Bicubic
from .dncnn import DnCNN, is_dncnn_state_dict

__all__ = ["Bicubic", "DnCNN", "load_model", "default_denoiser", "model_digest"]


def default_denoiser() -> DnCNN:
    """The shipped sigma=50 colour denoiser (DnCNN shape, trained by scripts/train_default_denoiser.py on CC0
    images; see cem_fast/data/LICENSES.md)."""
    with resources.as_file(resources.files("cem_fast") / "data" / "default_denoiser.pt") as p:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    net = DnCNN.from_state_dict({k: v.float() for k, v in sd.items()})
    return net.eval()


def _unwrap_state_dict(obj) -> dict:
    for key in ("params_ema", "params", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a state dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def _load_checkpoint(path: Path) -> nn.Module:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("/code/") or "/code/" in n for n in z.namelist()):
                return torch.jit.load(str(path), map_location="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"model file {str(path)!r} is not a readable PyTorch checkpoint: {e}".splitlines()[0]) \
            from None
    sd = _unwrap_state_dict(obj)
    if is_dncnn_state_dict(sd):
        return DnCNN.from_state_dict(sd)
    sample = ", ".join(list(sd)[:3])
    raise ValueError(f"model file {str(path)!r}: unknown architecture (keys {sample}, ...); known: KAIR DnCNN. "
                     "Load it yourself and pass the nn.Module to cem_fast.causal_effect_map, or use pkg.module:factory")


def load_model(spec: "str | nn.Module", scale: int = 4) -> tuple[nn.Module, str]:
    """(model in eval mode, short name) from a spec.

    ``bicubic`` / ``bicubic:x4``: analytic upsampler (``scale`` when no factor is given); ``default``: the shipped
    denoiser; ``pkg.module:factory``: ``factory()`` must return an nn.Module; otherwise a path to a TorchScript
    file or a checkpoint (KAIR DnCNN recognised; ``params``/``params_ema``/``state_dict`` wrappers and
    ``module.`` prefixes accepted).
    """
    if isinstance(spec, nn.Module):
        return spec.eval(), type(spec).__name__
    spec = str(spec).strip()
    low = spec.lower()
    if low == "bicubic" or low.startswith("bicubic:"):
        s = scale
        if ":" in low:
            try:
                s = int(low.split(":", 1)[1].lstrip("x"))
            except ValueError:
                raise ValueError(f"model {spec!r}: expected bicubic:xS with an integer S") from None
        return Bicubic(s).eval(), f"bicubic_x{s}"
    if low == "default":
        return default_denoiser(), "default_denoiser"
    path = Path(spec)
    if path.exists():
        if not path.is_file():
            raise ValueError(f"model {spec!r} is a folder, expected a checkpoint or TorchScript file")
        return _load_checkpoint(path).eval(), path.stem
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        mod_name, _, factory = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"model {spec!r}: cannot import module {mod_name!r} ({e})") from None
        fn = getattr(mod, factory, None)
        if fn is None:
            raise ValueError(f"model {spec!r}: module {mod_name!r} has no attribute {factory!r}")
        model = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {spec!r}: {factory}() returned {type(model).__name__}, expected an nn.Module")
        return model.eval(), factory
    raise ValueError(f"model {spec!r} is not a file, 'bicubic[:xS]', 'default' or 'pkg.module:factory'")


def model_digest(model: nn.Module) -> str:
    """Hash of a model's class and weights (for caches and summaries)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
