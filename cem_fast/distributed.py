"""One CEM study across processes and machines (``torch.distributed``): the interventions are sharded.

Interventions are independent and keyed by (seed, block, draw), so any split of them gives the same samples.
Under an initialised process group (``torchrun ... -m cem_fast run``, or ``init_process_group`` before calling
the Python API) every rank plans the same run, computes a contiguous, equal slice of each stage's missing
interventions (:func:`shard`: equal counts of forwards, the cost of a run) on its own device, and the scores are
all-gathered (:func:`gather_scores`), so every rank holds the stage's whole (n, n_rois) array and gates the fine
stage identically. Only host arrays travel (scores, flags, a few integers), over the group's CPU backend (gloo)
where it has one.

Failures stay in step: every exchange starts with a header (failed?, step tag, size, value) gathered from all
ranks. A rank that fails on its own (an error in its slice, a full disk) says so at the end of its step
(:func:`agreed_step`), where the others, waiting in any exchange of that step, learn it and fail the step too:
no rank waits forever, and the next step starts together. Ranks that planned different runs (another model file,
another image) disagree in a header and fail the step with one line. A killed rank ends the job (torchrun stops
the others); a re-run resumes from the cache, whatever the new world size.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import sys
import zlib
from typing import Callable, Iterator, TypeVar

import numpy as np

from .checks import first_line

T = TypeVar("T")
_TEXT = 512  # bytes of an error message sent to the other ranks
# how long a rank waits in an exchange (torchrun's group): up to a whole stage of the others when it failed early,
# so hours, not gloo's default 30 minutes; a dead rank is noticed at once (its connections close)
EXCHANGE_TIMEOUT_S = 12 * 3600


class PeerFailed(RuntimeError):
    """A step failed on some rank, and every rank knows it (no further exchange for this step)."""

    agreed = True


class GroupLost(RuntimeError):
    """A rank is gone (its process ended, or the network failed): the study cannot go on in this job."""

    agreed = True


_alone = False  # inside alone(): this process runs by itself whatever group exists


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none (or inside :func:`alone`)."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group can exist (and the CLI stays light)
    if _alone or dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Runs within it are this process's alone, under a process group too: for cem_fast called on one rank of a
    job that has a group for other reasons (a training script), where the other ranks would never join."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def is_lead() -> bool:
    """Rank 0 (or no group): the rank that writes outputs and speaks."""
    return world()[0] == 0


def shard(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """(start, end) of ``rank``'s contiguous slice of ``n`` equal-cost items; sizes differ by at most one."""
    if rank is None or size is None:
        rank, size = world()
    return n * rank // size, n * (rank + 1) // size


def local_device(dev):
    """A CUDA device without an index means this rank's own GPU under a group (``LOCAL_RANK``)."""
    import torch
    if dev.type != "cuda" or dev.index is not None or world()[1] == 1:
        return dev
    count = torch.cuda.device_count()
    local = int(os.environ.get("LOCAL_RANK", world()[0] % max(1, count)))
    if local >= count:
        raise ValueError(f"LOCAL_RANK must name one of this machine's {count} CUDA devices, got {local}: "
                         "one process per device (torchrun --nproc_per_node <= GPUs)")
    return torch.device("cuda", local)


def _comm_device():
    import torch
    import torch.distributed as dist
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())  # an NCCL-only group takes CUDA tensors


def _all_gather(arr: np.ndarray) -> np.ndarray:
    """(world, *arr.shape): every rank's ``arr`` (same shape and dtype on every rank)."""
    import torch
    import torch.distributed as dist
    t = torch.from_numpy(np.array(arr)).to(_comm_device())  # a copy: torch wants writable memory
    parts = [torch.empty_like(t) for _ in range(world()[1])]
    try:
        dist.all_gather(parts, t)
    except RuntimeError as e:  # the headers make every exchange match: what fails here is the group itself
        why = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e)).split(". ")[0][:200]  # gloo: "[file:line] Read error..."
        raise GroupLost(f"lost a rank of the study (its process ended, or the network failed: {why}); run the same "
                        "command again: it resumes from the finished batches in the cache") from None
    return torch.stack(parts).cpu().numpy()


def _tag(name: str) -> int:
    return zlib.crc32(name.encode())


def exchange(step: str, size: int = 0, value: int = 0, error: str | None = None,
             same_value: bool = False) -> np.ndarray:
    """Every rank's header for ``step``, (world, 4) int64 [failed, tag, size, value]. Raises :class:`PeerFailed`
    on every rank when some rank failed, or is at another step, or has another ``size`` (or another ``value``,
    with ``same_value``): those ranks planned different runs, and no rank goes on with wrong data."""
    head = np.array([error is not None, _tag(step), size, value], dtype=np.int64)
    heads = _all_gather(head)
    if heads[:, 0].any():
        text = (error or "").encode()[:_TEXT]
        texts = _all_gather(np.frombuffer(text.ljust(_TEXT, b"\0"), dtype=np.uint8))
        r = int(np.flatnonzero(heads[:, 0])[0])
        raise PeerFailed(f"rank {r} failed: {texts[r].tobytes().rstrip(bytes(1)).decode(errors='replace')}")
    columns = [1, 2, 3] if same_value else [1, 2]
    if (heads[:, columns] != head[columns]).any():
        r = int(np.flatnonzero((heads[:, columns] != heads[0, columns]).any(1))[0])
        where = "" if heads[r, 1] == heads[0, 1] else ", at another step"
        raise PeerFailed(f"ranks disagree at {step!r} (rank 0: size {heads[0, 2]}, value {heads[0, 3]}; rank {r}: "
                         f"size {heads[r, 2]}, value {heads[r, 3]}{where}): every rank must run the same model, "
                         "image and options (the same files on every machine)")
    return heads


@contextlib.contextmanager
def agreed_step(step: str) -> Iterator[None]:
    """A step that ends together on every rank: an error on one rank fails the step on all (see the module
    docstring). The failing rank raises its own error, the others :class:`PeerFailed` naming it."""
    if world()[1] == 1:
        yield
        return
    try:
        yield
    except (Exception, SystemExit) as e:  # SystemExit: a model's own sys.exit, which the CLI survives
        if not getattr(e, "agreed", False):
            try:
                exchange(f"end {step}", error=first_line(e))
            except PeerFailed:
                pass
            try:
                e.agreed = True  # the outer steps must not exchange again
            except AttributeError:
                pass
        raise
    exchange(f"end {step}")


def agree_done(step: str, done: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The rows every rank read from the cache (a rank that cannot see a chunk recomputes its rows, so no rank
    uses a score another lacks), after checking that every rank has the same interventions."""
    if world()[1] == 1:
        return done
    digest = zlib.crc32(np.ascontiguousarray(ids, "<i8").tobytes())
    exchange(f"stage {step}", size=len(done), value=digest, same_value=True)
    return _all_gather(done.astype(np.uint8)).all(axis=0)


def gather_scores(local: np.ndarray, n: int, width: int, step: str = "scores") -> np.ndarray:
    """(n, width): every rank's slice (:func:`shard` of n) of the rows, in order, on every rank."""
    size = world()[1]
    if size == 1:
        return local
    exchange(f"gather {step}", size=n * width)
    rows = -(-n // size)
    padded = np.full((rows, width), np.nan)
    padded[:len(local)] = local
    parts = _all_gather(padded)
    return np.concatenate([parts[r][:e - s] for r, (s, e) in enumerate(shard(n, r, size) for r in range(size))])


def from_rank0(arr: np.ndarray, step: str) -> np.ndarray:
    """Rank 0's ``arr`` on every rank (same shape everywhere), e.g. Y(I), so that every rank gates alike."""
    if world()[1] == 1:
        return arr
    exchange(step, size=arr.size)
    return _all_gather(np.asarray(arr))[0]


def rank0_first(make: Callable[[bool], T], step: str) -> T:
    """``make(True)`` on rank 0, then ``make(False)`` on the others once rank 0 is done: for steps that create,
    clear or clean shared files (the cache entry with ``fresh``, stale temporaries), so ranks never race there."""
    rank, size = world()
    out = make(True) if rank == 0 else None
    if size > 1:
        exchange(step)
    return out if rank == 0 else make(False)


def rank0_value(value: int, step: str) -> int:
    """Rank 0's integer on every rank (a random token all ranks must share)."""
    return int(exchange(step, value=value)[0, 3]) if world()[1] > 1 else value


def same_on_all(step: str, text: str) -> str:
    """``text`` (a cache key), checked to be the same on every rank."""
    if world()[1] > 1:
        exchange(step, value=int(hashlib.sha256(text.encode()).hexdigest()[:15], 16), same_value=True)
    return text


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), once:
    gloo for the host arrays, NCCL beside it when CUDA is there; each rank on ``cuda:LOCAL_RANK``. Returns
    whether this call started a group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    import torch
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build: run without torchrun")
    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and local < torch.cuda.device_count():  # else a CUDA run says so (local_device); a CPU run is fine
        torch.cuda.set_device(local)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=EXCHANGE_TIMEOUT_S))
    return True


def shutdown() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
