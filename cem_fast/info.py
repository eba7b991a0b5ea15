"""``python -m cem_fast.info``: versions, devices, and which backends can run (and why the others cannot)."""
from __future__ import annotations

import os
import platform

import numpy as np
import torch


def info_text() -> str:
    from ._version import __version__
    from .ops import BACKENDS, backend_reasons
    lines = [f"cem_fast {__version__} from {os.path.dirname(os.path.abspath(__file__))}",
             f"python {platform.python_version()}, torch {torch.__version__}, "
             f"numpy {np.__version__}"]
    cuda = torch.cuda.is_available()
    lines.append("cuda: " + (f"{torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})" if cuda
                             else f"not available (torch CUDA build: {torch.version.cuda or 'none'})"))
    from .threads import describe
    lines.append(f"cpu threads: torch {torch.get_num_threads()}; {describe()}")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    lines.append("backends:")
    for name in BACKENDS:
        for dev in devices:
            why = backend_reasons(name, torch.device(dev))
            lines.append(f"  {name:7s} {dev:5s} " + ("available" if not why else "unavailable: " + "; ".join(why)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(info_text())
