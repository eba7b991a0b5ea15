"""Count the host synchronisation points of the sampling loop, on any device (tests/pipeline/test_runner.py, and the GPU
check's microbenchmark).

On CUDA every one of these makes the host wait for the device (the queue drains, the GPU idles while Python
prepares the next batch): ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()`` / ``int()`` /
``float()`` of a tensor, and a blocking copy from the host (``.to(device)`` without ``non_blocking``, pageable
memory: torch synchronises the stream after it; ``torch.tensor(..., device=...)``). On the CPU they cost
nothing, but the same code runs: counting the calls there shows what the GPU will pay. ``.numpy()`` right after
``.cpu()`` of the same tensor counts once. Only what runs inside the sampling loop (``runner._Batches.run``) is
counted; ``batches`` counts the batches it ran (``Runner._scores`` calls).

    with SyncCounter() as c:
        cem_fast.causal_effect_map(...)
    c.total, c.batches, c.counts, c.sites
"""
from __future__ import annotations

import collections
import sys

import torch

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    def __init__(self, where: str = "sampling"):
        self.counts: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()  # "file:line kind" of the callers in cem_fast
        self.batches = 0
        self.where = where
        self._depth = 0
        self._saved: list = []
        self._last_cpu = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _hit(self, kind: str) -> None:
        if self._depth <= 0 and self.where == "sampling":
            return
        self.counts[kind] += 1
        f = sys._getframe(2)
        while f is not None and "cem_fast" not in f.f_code.co_filename:
            f = f.f_back
        if f is not None:
            self.sites[f"{f.f_code.co_filename.split('cem_fast')[-1].lstrip('/')}:{f.f_lineno} {kind}"] += 1

    def _patch(self, owner, name, make):
        old = getattr(owner, name)
        self._saved.append((owner, name, old))
        setattr(owner, name, make(old))

    def __enter__(self) -> "SyncCounter":
        from cem_fast.pipeline import runner
        counter = self

        for name in METHODS:
            def make(old, name=name):
                def wrapper(t, *a, **k):
                    out = old(t, *a, **k)
                    if name == "numpy" and counter._last_cpu is not None and counter._last_cpu() is t:
                        return out  # x.cpu().numpy(): one point
                    if name == "cpu":
                        import weakref
                        try:
                            counter._last_cpu = weakref.ref(out)
                        except TypeError:
                            counter._last_cpu = None
                    counter._hit(name)
                    return out
                return wrapper
            self._patch(torch.Tensor, name, make)

        def make_to(old):
            def to(t, *a, **k):
                device, _, non_blocking, _ = torch._C._nn._parse_to(*a, **k)
                if device is not None and t.device.type == "cpu" and not non_blocking:
                    counter._hit("blocking copy to the device")
                return old(t, *a, **k)
            return to
        self._patch(torch.Tensor, "to", make_to)

        for fn in ("tensor", "as_tensor"):
            def make_new(old, fn=fn):
                def new(*a, **k):
                    if k.get("device") is not None:
                        counter._hit(f"torch.{fn}(device=...)")
                    return old(*a, **k)
                return new
            self._patch(torch, fn, make_new)

        def make_loop(old):
            def run(*a, **k):
                counter._depth += 1
                try:
                    return old(*a, **k)
                finally:
                    counter._depth -= 1
            return run
        self._patch(runner._Batches, "run", make_loop)

        def make_scores(old):
            def scores(*a, **k):
                counter.batches += 1
                return old(*a, **k)
            return scores
        self._patch(runner.Runner, "_scores", make_scores)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, old in reversed(self._saved):
            setattr(owner, name, old)
        self._saved.clear()

    def report(self) -> dict:
        return {"syncs": self.total, "batches": self.batches,
                "per_batch": round(self.total / max(1, self.batches), 2), "by_kind": dict(self.counts),
                "top_sites": dict(self.sites.most_common(12))}
