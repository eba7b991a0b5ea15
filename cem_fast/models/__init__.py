"""Model loading from specs: ``bicubic[:xS]``, ``default`` (the shipped denoiser), ``pkg.module:factory``,
a TorchScript file, or a checkpoint whose architecture is recognised (KAIR DnCNN)."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import math
import os
import re
import sys
import zipfile
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..checks import first_line
from ..paths import looks_like_file, missing
from .bicubic import Bicubic
from .dncnn import DnCNN, FDnCNN, is_dncnn_state_dict
from .factories import FACTORY_SPEC, factory_module_origin, load_factory
from .sr_archs import EDSR, RCAN, MSRResNet
from .swinir import SwinIR
from .wrappers import PadToMultiple, PerChannel, PreUpsample, WithNoiseMap, apply_model_options

__all__ = ["Bicubic", "DnCNN", "FDnCNN", "MSRResNet", "EDSR", "RCAN", "SwinIR", "WithNoiseMap", "PadToMultiple",
           "PreUpsample", "PerChannel", "apply_model_options", "load_model", "default_denoiser", "default_model",
           "detect_architecture", "model_digest", "model_code_digest", "factory_module_origin"]


DEFAULTS = {"dn": "default_denoiser.pt", "sr": "default_sr.pt", "dr": "default_dr.pt"}


def default_model(task: str = "dn") -> nn.Module:
    """A shipped default, trained by scripts/ on CC0 / public-domain images (cem_fast/data/LICENSES.md):
    ``dn`` a sigma=50 colour denoiser, ``sr`` an x4 MSRResNet, ``dr`` a deraining DnCNN."""
    task = task.lower()
    if task not in DEFAULTS:
        raise ValueError(f"default model task must be one of {', '.join(DEFAULTS)}, got {task!r}")
    with resources.as_file(resources.files("cem_fast") / "data" / DEFAULTS[task]) as p:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    return detect_architecture({k: v.float() for k, v in sd.items()}).eval()


def default_denoiser() -> DnCNN:
    """The shipped sigma=50 colour denoiser (DnCNN shape)."""
    return default_model("dn")


def _count(sd: dict, pattern: str) -> int:
    return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})


def _upscale(sd: dict, num_feat: int) -> int:
    convs = _count(sd, r"^upsample\.(\d+)\.weight$")
    return 3 if sd["upsample.0.weight"].shape[0] == 9 * num_feat else 2 ** convs


def _build_msrresnet(sd):
    nf = sd["conv_first.weight"].shape[0]
    up = 4 if "upconv2.weight" in sd else int(round(math.sqrt(sd["upconv1.weight"].shape[0] / nf)))
    return MSRResNet(sd["conv_first.weight"].shape[1], sd["conv_last.weight"].shape[0], nf,
                     _count(sd, r"^body\.(\d+)\.conv1\.weight$"), up)


def _build_edsr(sd):
    nf = sd["conv_first.weight"].shape[0]
    return EDSR(sd["conv_first.weight"].shape[1], sd["conv_last.weight"].shape[0], nf,
                _count(sd, r"^body\.(\d+)\.conv1\.weight$"), _upscale(sd, nf), 0.1 if nf >= 256 else 1.0)


def _build_rcan(sd):
    nf = sd["conv_first.weight"].shape[0]
    squeeze = nf // sd["body.0.residual_group.0.rcab.3.attention.1.weight"].shape[0]
    return RCAN(sd["conv_first.weight"].shape[1], sd["conv_last.weight"].shape[0], nf,
                _count(sd, r"^body\.(\d+)\.conv\.weight$"),
                _count(sd, r"^body\.0\.residual_group\.(\d+)\.rcab\.0\.weight$"), squeeze, _upscale(sd, nf))


# name -> (test on the keys, builder, a small instance whose key pattern describes the layout)
ARCHITECTURES = {
    "SwinIR": (lambda sd: "layers.0.residual_group.blocks.0.attn.qkv.weight" in sd, SwinIR.from_state_dict,
               lambda: SwinIR(img_size=8, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4, upscale=2,
                              upsampler="pixelshuffle", num_feat=8)),
    "RCAN": (lambda sd: "body.0.residual_group.0.rcab.0.weight" in sd, _build_rcan,
             lambda: RCAN(num_feat=16, num_group=2, num_block=2, squeeze_factor=4)),
    "MSRResNet": (lambda sd: {"conv_first.weight", "upconv1.weight", "conv_hr.weight"} <= sd.keys(),
                  _build_msrresnet, lambda: MSRResNet(num_feat=8, num_block=2)),
    "EDSR": (lambda sd: {"conv_first.weight", "conv_after_body.weight", "body.0.conv1.weight",
                         "upsample.0.weight"} <= sd.keys(), _build_edsr, lambda: EDSR(num_feat=8, num_block=2)),
    "DnCNN": (is_dncnn_state_dict, DnCNN.from_state_dict, lambda: DnCNN(3, 8, 3)),
}


def _key_pattern(keys) -> set[str]:
    return {re.sub(r"\.\d+\.", ".#.", "." + k + ".").strip(".") for k in keys}


def detect_architecture(sd: dict) -> nn.Module:
    """Build the architecture a state dict belongs to (hyper-parameters from the tensor shapes) and load it.
    Unknown layouts raise a ValueError naming the closest known architecture."""
    for name, (matches, build, _) in ARCHITECTURES.items():
        if matches(sd):
            try:
                net = build(sd)
                net.load_state_dict(sd)
            except Exception as e:
                raise ValueError(f"state dict looks like {name} but does not load: {first_line(e)}") \
                    from None
            return net
    pattern = _key_pattern(sd)
    scores = {name: len(pattern & _key_pattern(example().state_dict())) / len(_key_pattern(example().state_dict()))
              for name, (_, _, example) in ARCHITECTURES.items()}
    best = max(scores, key=scores.get)
    sample = ", ".join(list(sd)[:3])
    raise ValueError(f"unknown architecture (keys {sample}, ...); closest known: {best} "
                     f"({scores[best]:.0%} of its key pattern); known: {', '.join(ARCHITECTURES)}")


def _unwrap_state_dict(obj) -> dict:
    for key in ("params_ema", "params", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a state dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


TRUST_HINT = "set trust_model_code: true in the config, --trust-model on the command line, or " \
             "trust_model_code=True in Python, only for files you trust"


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive keeps its program under ``<name>/code/`` (read from the zip index: nothing runs)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs a traceback of its own for unreadable archives; our one-line error says it instead."""
    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch._export.serde.serialize")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load_checkpoint(path: Path, trust_model_code: bool = False) -> nn.Module:
    # torch.export archives unpickle with weights_only=False when the safe loader fails (a crafted file runs
    # code while loading), and TorchScript files are programs: both load only on the user's explicit word.
    # A checkpoint is read with weights_only=True, which builds tensors and containers and runs nothing.
    if path.suffix.lower() == ".pt2" or _is_torchscript(path):
        kind = "a torch.export program" if path.suffix.lower() == ".pt2" else "a TorchScript program"
        if not trust_model_code:
            raise ValueError(f"model file {str(path)!r} is {kind}, which can run code when it is loaded or run; "
                             f"not loaded: {TRUST_HINT}")
        try:
            with _quiet_torch_logs():
                if path.suffix.lower() == ".pt2":
                    return torch.export.load(str(path)).module()
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ValueError(f"model file {str(path)!r} is not a readable {kind[2:]}: {first_line(e)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"model file {str(path)!r} is not a readable PyTorch checkpoint: {first_line(e)}") \
            from None
    try:
        return detect_architecture(_unwrap_state_dict(obj))
    except ValueError as e:
        raise ValueError(f"model file {str(path)!r}: {e}") from None


def _load_spandrel(path: str) -> nn.Module:
    try:
        import spandrel
    except Exception as e:  # spandrel imports torchvision, which may not import beside a CPU torch
        raise ValueError(f"spandrel:{path} needs the optional spandrel package ({type(e).__name__}: {e})"
                         .splitlines()[0]) from None
    try:
        return spandrel.ModelLoader().load_from_file(path).model
    except Exception as e:
        raise ValueError(f"spandrel cannot load {path!r}: {first_line(e)}") from None


def load_model(spec: "str | nn.Module", scale: int = 4, trust_model_code: bool = False,
               module_dirs: "Sequence[str | os.PathLike] | None" = None) -> tuple[nn.Module, str]:
    """(model in eval mode, short name) from a spec.

    ``bicubic`` / ``bicubic:x4``: analytic upsampler (``scale`` when no factor is given); ``default``: the shipped
    denoiser; ``pkg.module:factory``: ``factory()`` must return an nn.Module; otherwise a path to a TorchScript
    file or a checkpoint (KAIR DnCNN recognised; ``params``/``params_ema``/``state_dict`` wrappers and
    ``module.`` prefixes accepted). Files that hold programs (TorchScript, torch.export ``.pt2``) load only with
    ``trust_model_code=True``: they can run code.

    A factory's module is looked for in ``module_dirs`` first, in order (the CLI: the config file's folder, then
    the current folder; default: the current folder), then on ``sys.path`` (PYTHONPATH, installed packages); the
    folder it is found in is put on ``sys.path``, so that its own imports of modules beside it work.
    :func:`factory_module_origin` says where it was found.
    """
    if isinstance(spec, nn.Module):
        return spec.eval(), type(spec).__name__
    spec = str(spec).strip()
    named = _load_named(spec, scale)
    if named is not None:
        return named
    path = Path(spec)
    if path.exists():
        if not path.is_file():
            raise ValueError(f"model {spec!r} is a folder, expected a checkpoint or TorchScript file")
        return eval_mode(_load_checkpoint(path, trust_model_code)), path.stem
    if FACTORY_SPEC.fullmatch(spec):
        return load_factory(spec, module_dirs)
    if os.path.lexists(path):  # a symlink loop or a broken link: not "no such file"
        raise ValueError(f"model {str(path.absolute())!r} {missing(path)}")
    if looks_like_file(spec):
        raise ValueError(f"model: no such file: {path.absolute()}")
    raise ValueError(f"model {spec!r} is not a file, 'bicubic[:xS]', 'default' or 'pkg.module:factory'"
                     + _zoo_hint(spec))


def _load_named(spec: str, scale: int) -> "tuple[nn.Module, str] | None":
    """The models a spec names by a word: ``bicubic[:xS]``, ``default[:dn|sr|dr]``, ``spandrel:PATH``; None for
    any other spec."""
    low = spec.lower()
    if low == "bicubic" or low.startswith("bicubic:"):
        s = scale
        if ":" in low:
            try:
                s = int(low.split(":", 1)[1].lstrip("x"))
            except ValueError:
                raise ValueError(f"model {spec!r}: expected bicubic:xS with an integer S") from None
        return Bicubic(s).eval(), f"bicubic_x{s}"
    if low in ("default", "default:dn"):
        return default_denoiser(), "default_denoiser"
    if low in ("default:sr", "default:dr"):
        return default_model(low[-2:]), f"default_{low[-2:]}"
    if low.startswith("spandrel:"):
        p = spec.split(":", 1)[1]
        return _load_spandrel(p).eval(), Path(p).stem
    return None


def _zoo_hint(spec: str) -> str:
    """The reference code names models of its zoo (``Modellist: ['DnCNN', 'RCAN_DN']``); cem_fast reads their
    checkpoints instead and finds the architecture from the tensors."""
    family = re.split(r"[_-]", spec)[0].lower()
    known = {name.lower(): name for name in ARCHITECTURES} | {"srresnet": "MSRResNet", "fdncnn": "DnCNN"}
    if family not in known:
        return ""
    return (f"; a model-zoo name like the reference code's: give the path of its checkpoint instead (a .pth "
            f"state dict: cem_fast detects {known[family]} from its tensors)")


def eval_mode(model: nn.Module) -> nn.Module:
    """``model.eval()`` where supported (torch.export modules refuse it and are already in inference form)."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def model_digest(model: nn.Module) -> str:
    """Hash of a model's class and weights (for caches and summaries); its code: :func:`model_code_digest`."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _function_code(fn) -> str:
    """What a Python function does: its bytecode, constants and names (a forward set on an instance)."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        raise TypeError(f"{fn!r} has no Python code")
    return f"{code.co_code.hex()}|{code.co_consts!r}|{code.co_names!r}"


_INSTALLED = tuple(str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
_OWN_PACKAGE = __package__.split(".")[0]


def _user_code_reachable(module, limit: int = 500) -> list[str]:
    """Source files of the user's modules that ``module`` reaches through its globals (imported modules, and the
    modules of imported functions and classes), transitively: a forward that calls ``helper.f`` changes when
    helper.py does. Installed code (the standard library, site-packages) is left out, its version not being the
    user's edit, and so is cem_fast itself (what it computes is keyed by its cache format), so that the set does
    not depend on which of cem_fast's modules happen to be loaded."""
    seen: set = set()
    out: list[str] = []
    todo = [module]
    while todo and len(out) < limit:
        mod = todo.pop()
        if mod is None or mod.__name__ in seen:
            continue
        seen.add(mod.__name__)
        path = getattr(mod, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        path = str(Path(path).resolve())
        ours = mod.__name__ == _OWN_PACKAGE or mod.__name__.startswith(_OWN_PACKAGE + ".")
        if path.startswith(_INSTALLED) or (ours and mod is not module):
            continue
        out.append(path)
        for value in list(vars(mod).values()):
            if inspect.ismodule(value):
                todo.append(value)
            elif inspect.isfunction(value) or inspect.isclass(value):
                todo.append(sys.modules.get(getattr(value, "__module__", None) or ""))
    return sorted(out)


def model_code_digest(model: nn.Module) -> "tuple[str | None, str | None]":
    """(digest, None) of the code a model runs, or (None, why it cannot be known).

    Python classes: the whole source file of every class in the MRO of every submodule, and of the user modules
    it reaches through its imports (so helper functions count, in the same file or imported), torch's own classes
    and installed packages excepted (the torch version is in the key); TorchScript modules:
    the inlined graph (every method and scripted function it calls); fx / torch.export modules: their
    generated code; a ``forward`` assigned to an instance: its bytecode."""
    h = hashlib.sha256()
    files: set[str] = set()
    try:
        for m in model.modules():
            if isinstance(m, torch.jit.ScriptModule):
                h.update(str(m.inlined_graph if hasattr(m, "inlined_graph") else m.code).encode())
                continue
            if isinstance(m, torch.fx.GraphModule):
                h.update(m.code.encode())
            if "forward" in vars(m):
                h.update(_function_code(vars(m)["forward"]).encode())
            for cls in type(m).__mro__:
                mod = getattr(cls, "__module__", "") or ""
                if mod == "builtins" or mod == "torch" or mod.startswith("torch.") or cls is object:
                    continue
                if issubclass(cls, torch.fx.GraphModule) and cls is not torch.fx.GraphModule:
                    continue  # the generated class of a GraphModule: its code is m.code, hashed above
                try:
                    path = inspect.getsourcefile(cls)
                except TypeError:
                    path = None
                if path and Path(path).is_file():
                    if path not in files:  # a file already hashed had its module's imports followed too
                        for f in [path] + _user_code_reachable(sys.modules.get(cls.__module__)):
                            if f not in files:
                                files.add(f)
                                h.update(f.encode())
                                h.update(Path(f).read_bytes())
                    continue
                try:  # a class typed into a notebook: linecache may still hold its source
                    h.update(inspect.getsource(cls).encode())
                except (OSError, TypeError):
                    return None, f"the source of class {cls.__module__}.{cls.__qualname__} is not available"
    except Exception as e:  # anything unusual: better to say we do not know than to reuse stale samples
        return None, f"the model's code could not be read ({type(e).__name__}: {first_line(e)})"
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16], None
