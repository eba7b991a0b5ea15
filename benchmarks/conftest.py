"""Benchmarks (pytest-benchmark): ratios against a baseline row measured in the same run. Not part of `make test`."""
import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
