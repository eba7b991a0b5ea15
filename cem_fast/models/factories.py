"""Models named ``pkg.module:factory``: the module found beside the config (or in the current folder) before
``sys.path``, imported, and ``factory()`` called, every failure one ValueError; and where a loaded factory's
module came from, for summary.json."""
from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import os
import sys
from pathlib import Path
from typing import Sequence

from torch import nn

from ..checks import first_line
from ..paths import FACTORY_SPEC


def load_factory(spec: str, module_dirs: "Sequence[str | os.PathLike] | None") -> tuple[nn.Module, str]:
    """``pkg.module:factory``: the module imported (:func:`cem_fast.models.load_model` says where it is looked
    for), then ``factory()`` called (or the module's nn.Module of that name taken); every failure is one
    ValueError."""
    mod_name, _, factory = spec.partition(":")
    # a config names the factory: the standard library holds no models, but functions that serve files,
    # exit or run commands (http.server:test, os:abort), and modules that act when imported (this)
    if mod_name.split(".")[0] in sys.stdlib_module_names:
        raise ValueError(f"model {spec!r}: {mod_name} is a standard-library module, not a model factory")
    mod = _import_factory_module(spec, mod_name, module_dirs)
    fn = getattr(mod, factory, None)
    if fn is None:
        raise ValueError(f"model {spec!r}: module {mod_name!r} has no attribute {factory!r}")
    if isinstance(fn, nn.Module):
        return fn.eval(), factory
    # a factory is Python code (a function or a class); a builtin such as os:system is never called
    if not (inspect.isfunction(fn) or inspect.isclass(fn) or inspect.ismethod(fn)):
        raise ValueError(f"model {spec!r}: {factory} is a {type(fn).__name__}, expected a factory function or "
                         "an nn.Module class")
    try:
        model = fn()
    except (Exception, SystemExit) as e:  # SystemExit: a factory that parses arguments or exits
        raise ValueError(f"model {spec!r}: {factory}() raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: {factory}() returned {type(model).__name__}, expected an nn.Module")
    return model.eval(), factory


def _import_factory_module(spec: str, mod_name: str, module_dirs: "Sequence[str | os.PathLike] | None"):
    """Import ``mod_name``, found in ``module_dirs`` first (default: the current folder), whose folder is put on
    ``sys.path``; a module that is missing or fails to import is one ValueError saying where it was looked for."""
    dirs = [Path(d).absolute() for d in (module_dirs if module_dirs is not None else [Path.cwd()])]
    folder = _module_folder(mod_name, dirs)
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        # the module itself (or its package) is missing, not a module that it imports
        if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            where = ", ".join(str(d) for d in dict.fromkeys(dirs))
            raise ValueError(
                f"model {spec!r}: no module {e.name!r} in {where} or on PYTHONPATH: put "
                f"{mod_name.replace('.', '/')}.py beside the config file (or in the current folder), or add "
                f"the folder that holds it to PYTHONPATH") from None
        raise ValueError(f"model {spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: "
                         f"{first_line(e)})") from None
    except Exception as e:  # ImportError, or any error raised by the module's own code
        raise ValueError(f"model {spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: "
                         f"{first_line(e)})") from None


def _module_folder(mod_name: str, dirs: "Sequence[Path]") -> "Path | None":
    """The first of ``dirs`` that holds the top package or module of ``mod_name`` (nothing is imported)."""
    top = mod_name.split(".")[0]
    for d in dirs:
        if importlib.machinery.PathFinder.find_spec(top, [str(d)]) is not None:
            return d
    return None


def factory_module_origin(spec: str, module_dirs: "Sequence[str | os.PathLike]" = ()) -> "dict | None":
    """Where the module of a loaded ``pkg.module:factory`` spec came from: ``{"path": its file, "found_in":
    "config folder" | "current folder" | "sys.path"}`` (``module_dirs``: the CLI's, config folder first); None
    for other specs or a module not loaded."""
    spec = str(spec).strip()
    if not FACTORY_SPEC.fullmatch(spec) or Path(spec).exists():
        return None
    mod_name = spec.partition(":")[0]
    mod, top = sys.modules.get(mod_name), sys.modules.get(mod_name.split(".")[0])
    path, top_file = getattr(mod, "__file__", None), getattr(top, "__file__", None)
    if not path or not top_file:
        return None
    top_file = Path(top_file).resolve()  # the folder on sys.path that holds the top package or module
    root = top_file.parent.parent if top_file.name == "__init__.py" else top_file.parent
    names = ["config folder", "current folder"] if len(module_dirs) > 1 else ["current folder"]
    for name, d in zip(names, module_dirs):
        if root == Path(d).resolve():
            return {"path": str(Path(path).resolve()), "found_in": name}
    return {"path": str(Path(path).resolve()), "found_in": "sys.path"}
