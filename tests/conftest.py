import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through the interpreter; with one they are compiled (the
# interpreter would take hours on the GPU-sized tests). Set before the kernels are imported; an explicit
# TRITON_INTERPRET in the environment wins.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
# The pipeline calls the ops through their unchecked fast paths; here they check every argument anyway, so that
# every test that runs the pipeline also shows that the indices it builds pass the ops' checks
os.environ.setdefault("CEM_FAST_CHECK_INTERNAL_OPS", "1")

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the repo; CEM_FAST_SHARED_DATA elsewhere (the GPU machine gets a copy inside the repo)
SHARED = Path(os.environ.get("CEM_FAST_SHARED_DATA") or ROOT.parent / "shared" / "data")


NO_SHARED = (f"needs the project's shared data ({SHARED}: ../shared/data beside the repository, or "
             "CEM_FAST_SHARED_DATA), which developers and CI have and a clone alone does not")


def pytest_runtest_setup(item):
    """The one place where marks become skips, each with its reason: ``gpu`` (a CUDA device), ``needs_backend(name,
    device="cpu")`` (the backend can run there: its own reasons otherwise) and ``interpreter`` (Triton kernels run
    under the interpreter, i.e. on CPU tensors)."""
    for mark in item.iter_markers("gpu"):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device" + (f" ({mark.kwargs['reason']})" if "reason" in mark.kwargs else ""))
    for mark in item.iter_markers("needs_backend"):
        from cem_fast import ops
        name, device = mark.args[0], mark.kwargs.get("device", "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip(f"the {name} backend on cuda needs a CUDA device")
        why = ops.backend_reasons(name, torch.device(device))
        if why:
            pytest.skip(f"{name} cannot run on {device}: " + "; ".join(why))
    for mark in item.iter_markers("interpreter"):
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("runs the Triton kernels under the interpreter (TRITON_INTERPRET=1): " +
                        mark.kwargs.get("reason", "CPU only"))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(NO_SHARED)
    return SHARED


@pytest.fixture
def rng() -> np.random.RandomState:
    return np.random.RandomState(1234)


@pytest.fixture
def image(rng) -> np.ndarray:
    """A 96x96 noise image (modules may define their own)."""
    return rng.randint(0, 256, (96, 96, 3)).astype(np.uint8)


@pytest.fixture
def bank(rng):
    """A bank of 32 random 8x8 patches (modules may define their own)."""
    from cem_fast.patches import PatchBank
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))


@pytest.fixture
def image32(rng) -> np.ndarray:
    """A 32x32 noise image."""
    from helpers import random_image
    return random_image(rng, 32, 32)


@pytest.fixture
def bank256(rng):
    """A bank of 256 random patches."""
    from helpers import random_bank
    return random_bank(rng, 256)


@pytest.fixture(scope="session")
def demo2(shared) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(shared / "images" / "demo_2.png").convert("RGB")).copy()


@pytest.fixture
def tiny_net():
    """model_factories.TinyNet: two 3x3 convolutions, 3 -> 8 -> 3 channels, radius 2."""
    from model_factories import TinyNet
    return TinyNet()
