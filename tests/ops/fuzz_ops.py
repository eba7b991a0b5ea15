"""Fuzzing the ops on every backend that runs here: run as a script (``python tests/ops/fuzz_ops.py OP EXAMPLES``), in
a subprocess of tests/ops/test_fuzz.py, so that a crash (a segfault, a sanitizer's abort) fails that test with the
example that caused it instead of ending the test run.

Hypothesis draws hostile calls: extreme integers (0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1 and neighbours) for every
index, empty and odd shapes, strides (expanded, transposed, sliced with huge steps), dtypes, non-finite numbers.
The verdict for each call: every backend raises the same error class (ValueError or TypeError: a clear refusal),
or every backend returns the same result. Before each call the example is written to ``$FUZZ_LAST`` (flushed), so
that the parent can name the call a crash interrupted.
"""
from __future__ import annotations

import os
import sys

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from cem_fast import ops
from cem_fast.geometry import ROI

EXTREMES = [0, 1, -1, 2, 7, 8, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**32, 2**62, 2**63 - 1, -2**63, -2**63 + 1]
REFUSALS = (ValueError, TypeError)


def backends() -> list[str]:
    return [b for b in ("torch", "cpp", "triton") if not ops.backend_reasons(b, torch.device("cpu"))]


def index(small: int):
    """Mostly a valid index below ``small`` (plus one past it), sometimes an extreme integer."""
    return st.one_of(st.integers(0, max(small, 0)), st.integers(-2, small + 2), st.sampled_from(EXTREMES))


@st.composite
def layout(draw, t: torch.Tensor) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels-last-like permute, expanded, or a slice of a
    larger buffer with a huge step."""
    kind = draw(st.sampled_from(["plain", "transposed", "strided", "expanded"]))
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided" and t.numel() and t.shape[-1] > 0:
        step = draw(st.sampled_from([3, 1000]))
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * step, dtype=t.dtype)
        big[..., ::step] = t
        return big[..., ::step]
    if kind == "expanded" and t.dim() >= 1 and t.shape[0] == 1:
        return t.expand(*t.shape)
    return t


def values(draw, shape: tuple, dtype: torch.dtype, lo: float, hi: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if dtype.is_floating_point:
        return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    return torch.randint(int(lo), int(hi) + 1, shape, generator=g).to(dtype)


def int_table(draw, K: int, cols: int, small: int, dtype_choices=(torch.int64,)) -> torch.Tensor:
    rows = [[draw(index(small)) for _ in range(cols)] for _ in range(K)]
    t = torch.tensor(rows, dtype=torch.int64).reshape(K, cols) if K else torch.zeros(0, cols, dtype=torch.int64)
    dtype = draw(st.sampled_from(dtype_choices))
    if dtype != torch.int64:
        with torch.no_grad():
            t = t.to(dtype)  # wraps or rounds: the checks see the converted values, as a caller's would be
    return t.squeeze(1) if cols == 1 else t


@st.composite
def intervene_call(draw) -> dict:
    C = draw(st.sampled_from([1, 3]))
    h, w = draw(st.integers(0, 10)), draw(st.integers(0, 10))
    pb, P, K = draw(st.integers(0, 6)), draw(st.integers(0, 4)), draw(st.integers(0, 4))
    base = draw(layout(values(draw, (C, h, w), draw(st.sampled_from([torch.float32, torch.float64])), 0, 1)))
    patch_dtype = draw(st.sampled_from([torch.uint8, torch.uint8, torch.float32, torch.int64]))
    plo, phi = (0, 255) if patch_dtype == torch.uint8 else draw(st.sampled_from([(0, 255), (-1, 300), (0.2, 3.7)]))
    patches = values(draw, (P, C, pb, pb), patch_dtype, plo, phi)
    if patch_dtype == torch.float32 and (plo, phi) != (0.2, 3.7):
        patches = patches.round()
    index_dtypes = (torch.int64, torch.int64, torch.int32, torch.float32)
    call = dict(base=base, patches=patches, patch_idx=int_table(draw, K, 1, P, index_dtypes),
                origins=int_table(draw, K, 2, max(h, w), index_dtypes), sizes=int_table(draw, K, 2, pb, index_dtypes))
    if draw(st.booleans()):
        call["window_size"] = (draw(index(h)), draw(index(w)))
        call["window_origins"] = int_table(draw, K, 2, max(h, w))
    sigma = draw(st.sampled_from([0.0, 0.0, 5.0, 30.0, -1.0, float("inf"), float("nan"), 1e12]))
    call["noise_sigma"] = sigma
    if sigma != 0 and draw(st.integers(0, 4)):
        call["ids"] = int_table(draw, K, 1, 1000)
        call["seed"] = draw(st.sampled_from([0, 7, 2**63 - 1, -1, 2**64]))
    if draw(st.integers(0, 3)) == 0:
        lo, hi = draw(st.sampled_from([(0, 100), (-5, 5), (0, 1e30)]))
        rain = values(draw, (C, h, w), torch.float32, lo, hi)
        if draw(st.integers(0, 3)) == 0 and rain.numel():
            rain.view(-1)[0] = float("nan")
        call["rain"] = rain
    if draw(st.integers(0, 3)) == 0:
        wh, ww = call.get("window_size", (h, w))
        shape = (K, C, wh if isinstance(wh, int) and 0 <= wh < 64 else 1, ww if isinstance(ww, int) and 0 <= ww < 64
                 else 1)
        kind = draw(st.sampled_from(["fresh", "channels_last", "expanded", "wrong"]))
        out = torch.full(shape, float("nan"))
        if kind == "channels_last":
            out = out.contiguous(memory_format=torch.channels_last)
        elif kind == "expanded" and K:
            out = torch.full((1, *shape[1:]), float("nan")).expand(*shape)
        elif kind == "wrong":
            out = torch.full((K + 1, *shape[1:]), float("nan"))
        call["out"] = out
    return call


def clone(call: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) and k == "out" else v for k, v in call.items()}


def outcome(fn):
    """('ok', result) or ('error', class name, message)."""
    try:
        return ("ok", fn())
    except REFUSALS as e:
        return ("error", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    except Exception as e:  # noqa: BLE001 - any other class is a finding of the fuzz run
        return ("error", type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "error":
        return a[1] == b[1]
    x, y = a[1], b[1]
    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.nan_to_num(nan=-7.0), y.nan_to_num(nan=-7.0)) \
        and torch.equal(x.isnan(), y.isnan())


def verdict(results: dict) -> None:
    """The same error class (a refusal) on every backend, or the same result."""
    names = list(results)
    first = results[names[0]]
    for name in names[1:]:
        assert same(first, results[name]), f"{names[0]} gave {summary(first)} but {name} gave {summary(results[name])}"
    if first[0] == "error":
        assert first[1] in {c.__name__ for c in REFUSALS}, f"every backend raised {first[1]}: {first[2]}"


def summary(res) -> str:
    return f"{res[1]}: {res[2]}" if res[0] == "error" else f"a {tuple(res[1].shape)} {res[1].dtype} result"


def note(example: str) -> None:
    path = os.environ.get("FUZZ_LAST")
    if path:
        with open(path, "w") as f:
            f.write(example)
            f.flush()
            os.fsync(f.fileno())


def describe(call: dict) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            head = v.flatten()[:12].tolist() if v.numel() else []
            return f"tensor{tuple(v.shape)} {v.dtype} stride={v.stride()} values[:12]={head}"
        return repr(v)
    return "\n".join(f"  {k} = {one(v)}" for k, v in call.items())


def run_intervene(call: dict) -> None:
    note("intervene(\n" + describe(call) + ")")
    verdict({b: outcome(lambda b=b: ops.intervene(**clone(call), backend=b)) for b in backends()})


@st.composite
def roi_call(draw) -> dict:
    K, C = draw(st.integers(0, 3)), draw(st.sampled_from([1, 3]))
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float64]))
    outputs = values(draw, (K, C, H, W), dtype, -0.2, 1.2)
    if draw(st.integers(0, 3)) == 0 and outputs.numel():
        outputs.view(-1)[draw(st.integers(0, outputs.numel() - 1))] = float("nan")
    if draw(st.booleans()):
        outputs = outputs.contiguous(memory_format=torch.channels_last)
    outputs = draw(layout(outputs))
    boxes = [(draw(index(H)), draw(index(W)), draw(index(H)), draw(index(W))) for _ in range(draw(st.integers(0, 3)))]
    target_dtype = draw(st.sampled_from([torch.uint8, torch.float32, torch.float32, torch.int64]))
    lo, hi = (0, 255) if target_dtype == torch.uint8 else draw(st.sampled_from([(0, 255), (-3, 300), (0.5, 1.5)]))
    full = values(draw, (C, H, W), target_dtype, lo, hi)
    if target_dtype == torch.float32 and (lo, hi) == (0, 255):
        full = full.round()
    return dict(outputs=outputs, boxes=boxes, full=full)


def run_roi(call: dict) -> None:
    note("roi(\n" + describe(call) + ")")
    outputs, full = call["outputs"], call["full"]
    for box in call["boxes"][:1]:
        try:
            roi = ROI(*box)
        except REFUSALS:
            continue
        target = full[:, :max(0, min(roi.height, 50)), :max(0, min(roi.width, 50))]
        verdict({b: outcome(lambda b=b: ops.roi_sq_err(outputs, target, roi, backend=b)) for b in backends()})
        raw = {"cpp": lambda: torch.ops.cem_fast.roi_sq_err(outputs, target.float(), box[0], box[1])}
        if "triton" in backends():
            raw["triton"] = lambda: torch.ops.cem_fast.roi_sq_err_triton(outputs, target.float(), box[0], box[1])
        if "cpp" in backends() and all(-2**63 <= v < 2**63 for v in box):
            verdict({name: outcome(fn) for name, fn in raw.items()})
    rois = []
    for box in call["boxes"]:
        try:
            rois.append(ROI(*box))
        except REFUSALS:
            pass
    verdict({b: outcome(lambda b=b: ops.roi_sq_err_multi(outputs, full, rois, backend=b)) for b in backends()})
    if call["boxes"] and "cpp" in backends() and all(-2**63 <= v < 2**63 for b in call["boxes"] for v in b):
        table = torch.tensor(call["boxes"], dtype=torch.int64)
        raw = {"cpp": lambda: torch.ops.cem_fast.roi_sq_err_multi(outputs, full.float(), table)}
        if "triton" in backends():
            raw["triton"] = lambda: torch.ops.cem_fast.roi_sq_err_multi_triton(outputs, full.float(), table, 0)
        verdict({name: outcome(fn) for name, fn in raw.items()})


def main(op: str, examples: int, fuzz_seed: int) -> None:
    print(f"fuzz {op}: {examples} examples, seed {fuzz_seed}, backends {', '.join(backends())}", flush=True)
    strategy, check = {"intervene": (intervene_call(), run_intervene), "roi": (roi_call(), run_roi)}[op]

    @seed(fuzz_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(call):
        check(call)

    fuzz()
    print(f"fuzz {op}: passed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
