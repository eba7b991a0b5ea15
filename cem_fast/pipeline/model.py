"""The model step of the pipeline: where it runs, in which memory format and precision, and how it is called.

:class:`ModelForward` is the one way the pipeline calls the model (the unintervened forward, the locality probe,
every batch of interventions, the fp32 re-check), so the rules below hold everywhere:

* inputs in the model's memory format (channels-last for convolutional models: about 2x faster convolutions on
  CPU and with cuDNN, results equal to fp32 round-off);
* a private copy of every input the model could change in place, except the per-batch buffer that is rewritten
  before its next use (a model doing ``x.mul_(0.9)`` must not change what later forwards see);
* the precision mode around the call (:func:`precision_mode`);
* CUDA-graph replays (``compile="reduce-overhead"``) write into the same output memory: their outputs are cloned.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from ..checks import first_line
from ..distributed import local_device
from ..models import eval_mode
from ..tasks import Prepared, Task
from .memory import is_oom


@contextlib.contextmanager
def no_cudnn_autotune():
    """``torch.backends.cudnn.benchmark`` off inside, the caller's setting restored afterwards (also after an
    error). A user who turned it on for a fixed-shape model would otherwise have cuDNN time every algorithm for
    each new input shape the run makes: the probe's windows, the intervention windows and the layer-by-layer
    engine's rectangles change shape from batch to batch, and each autotune costs more than the forward it picks
    an algorithm for."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """fp32: true fp32 (TF32 off for cuDNN convolutions and matmuls, which torch allows by default for cuDNN);
    tf32: TF32 allowed; bf16 / fp16: autocast. cuDNN's autotuning is off (:func:`no_cudnn_autotune`: the run's
    shapes vary). Restores the global flags afterwards."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.benchmark = False
    try:
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device.type, dtype=dtype):
                yield
        else:
            yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = flags


def pick_device(model: nn.Module, device: Optional[Union[str, torch.device]]) -> torch.device:
    """The requested device; else the model's CUDA device; else CUDA when available; else the CPU. Under a
    process group, ``cuda`` without an index is the rank's own GPU (``cuda:LOCAL_RANK``)."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but this torch has no CUDA device")
        return local_device(dev)
    for p in model.parameters():
        if p.device.type == "cuda":
            return p.device
        break
    return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


class ModelExited(RuntimeError):
    """The model called ``sys.exit`` during a forward pass (research code that parses arguments or exits)."""

    def __init__(self, call: str, who: str = "the model"):
        super().__init__(f"{who} called {call} during its forward pass")
        self.call = call


@contextlib.contextmanager
def model_exits_as_error() -> Iterator[None]:
    """A model's ``sys.exit`` as an error of the run, said as such: a SystemExit would end the caller's program
    (the Python API) or read "3" (the CLI, which survives it)."""
    try:
        yield
    except SystemExit as e:
        call = "sys.exit()" if e.code is None else f"sys.exit({e.code!r})"
        raise ModelExited(call) from None


@dataclasses.dataclass(frozen=True)
class ModelForward:
    """``forward(x, owned=False)``: the model on a batch ``x`` (N, C, h, w); see the module docstring."""

    model: Callable
    device: torch.device
    memory_format: torch.memory_format = torch.contiguous_format
    precision: str = "fp32"
    graphs: bool = False  # the model replays CUDA graphs (torch.compile with reduce-overhead / max-autotune)

    def __call__(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """``owned``: ``x`` is a batch buffer rewritten before its next use, so an in-place model may write into it;
        any other input (views of the base input, probe inputs) is copied first."""
        if owned:
            x = x.contiguous(memory_format=self.memory_format)
        else:
            x = torch.empty_like(x, memory_format=self.memory_format).copy_(x)
        with precision_mode(self.precision, self.device), model_exits_as_error():
            if not self.graphs:
                return self.model(x)
            torch.compiler.cudagraph_mark_step_begin()
            return self.model(x).clone()

    def at_precision(self, precision: str) -> "ModelForward":
        return dataclasses.replace(self, precision=precision)


EVAL_NAMES_SHOWN = 20  # summary.json names this many of the submodules that were in training mode


@contextlib.contextmanager
def eval_for_run(model: Union[nn.Module, str]) -> Iterator[Optional[dict]]:
    """The model in eval mode for the duration of a run, each submodule's own mode restored afterwards (also on an
    error): a BatchNorm in training mode normalises by the batch's statistics and a Dropout drops at random, so the
    map would depend on the batch size and differ run to run. Yields what summary.json says (None when every
    submodule was in eval mode already, or the model is loaded by the run itself)."""
    if not isinstance(model, nn.Module):
        yield None
        return
    modes = [(m, m.training) for m in model.modules()]
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    eval_mode(model)
    try:
        yield {"submodules_in_training": len(training), "names": training[:EVAL_NAMES_SHOWN],
               "restored_after_the_run": True} if training else None
    finally:
        for m, mode in modes:  # the attribute, not train(): that would set the children to the parent's mode
            m.training = mode


def place_model(model: nn.Module, device: torch.device, precision: str,
                compile: Union[bool, str] = False) -> tuple[nn.Module, ModelForward]:
    """The model in eval mode on ``device`` (channels-last when it has convolutions; interpolation-only models are
    slower so), optionally through ``torch.compile``; returns the placed module and its :class:`ModelForward`."""
    model = eval_mode(model.to(device))
    memory_format = torch.contiguous_format
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        memory_format = torch.channels_last
        try:
            model = model.to(memory_format=memory_format)
        except (NotImplementedError, RuntimeError, TypeError):
            pass  # e.g. torch.export modules; the inputs are still channels_last
    run, graphs = model, False
    if compile:
        mode = compile if isinstance(compile, str) else ("reduce-overhead" if device.type == "cuda" else None)
        run = torch.compile(model, mode=mode, dynamic=False)
        graphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    return model, ModelForward(run, device, memory_format, precision, graphs)


def unintervened_output(forward: ModelForward, prep: Prepared, task: Task, name: str) -> torch.Tensor:
    """(1, C, H, W) output on the whole unintervened input, checked: it runs, has the task's shape, is finite."""
    expected = (1,) + tuple(prep.gt.shape)
    try:
        out = forward(prep.base.unsqueeze(0))
    except ModelExited as e:
        raise ModelExited(e.call, f"model {name}") from None
    except Exception as e:
        raise RuntimeError(f"model {name} raised on the {tuple(prep.base.shape)} input: "
                           f"{type(e).__name__}: {first_line(e)}") from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {name} output must be {expected} for a {tuple(prep.base.shape)} input "
                         f"(task {task.name} x{task.scale}), got {got}")
    if not out.dtype.is_floating_point:  # scored as values in [0, 1]: a uint8 image would be read as 0..255
        raise ValueError(f"model {name} output must be a floating-point tensor of values in [0, 1], got {out.dtype}")
    if not torch.isfinite(out).all():
        raise ValueError(f"model {name} output has NaN/Inf values on the unintervened input")
    return out


# batch sizes that fitted, per model, input shape, precision and device (``batch_size="auto"``)
_BATCH_MEMORY: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
CPU_BATCH_PIXELS = 1 << 16  # CPU: about this many input pixels per batch (larger ones fall out of cache: slower)
MAX_AUTO_BATCH = 4096
MAX_CPU_BATCH = 256


def auto_batch_size(model: nn.Module, forward: Callable, sample: torch.Tensor, key: tuple,
                    input_px: Optional[int] = None) -> int:
    """The batch to start with: remembered, else on CUDA what fits in half the free memory judging by the peak of a
    batch of 4 ``sample`` (the largest input), else (CPU) about ``CPU_BATCH_PIXELS`` input pixels, counted on
    ``input_px`` per input where the inputs are smaller than ``sample`` (windows of their own). Out-of-memory
    errors still back off."""
    remembered = _BATCH_MEMORY.get(model, {}).get(key)
    if remembered:
        return remembered
    C, h, w = sample.shape
    if sample.device.type != "cuda":
        return int(max(1, min(MAX_CPU_BATCH, CPU_BATCH_PIXELS // max(1, input_px or h * w))))
    torch.cuda.synchronize(sample.device)
    torch.cuda.reset_peak_memory_stats(sample.device)
    before = torch.cuda.memory_allocated(sample.device)
    try:
        forward(sample.unsqueeze(0).repeat(4, 1, 1, 1))
    except Exception as e:
        if not is_oom(e):
            raise
        return 1
    per_item = max(1, (torch.cuda.max_memory_allocated(sample.device) - before) // 4)
    free, _ = torch.cuda.mem_get_info(sample.device)
    return int(max(1, min(MAX_AUTO_BATCH, free // 2 // per_item)))


def remember_batch_size(model: nn.Module, key: tuple, batch_size: int) -> None:
    try:
        _BATCH_MEMORY.setdefault(model, {})[key] = batch_size
    except TypeError:  # not weak-referenceable
        pass
