"""DnCNN in KAIR's layout (keys ``model.0.weight`` ... ``model.<2(n-1)>.bias``), residual: ``x - net(x)``."""
from __future__ import annotations

import torch
from torch import nn


class DnCNN(nn.Module):
    """``depth`` 3x3 convolutions of ``width`` channels with ReLU between; predicts the noise and subtracts it.

    Input and output: (N, channels, H, W) float in [0, 1].
    """

    def __init__(self, channels: int = 3, width: int = 64, depth: int = 20, in_channels: int | None = None):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNN depth must be at least 2 convolutions, got {depth}")
        layers: list[nn.Module] = []
        for i in range(depth):
            cin = (in_channels or channels) if i == 0 else width
            cout = channels if i == depth - 1 else width
            layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=True))
            if i < depth - 1:
                layers.append(nn.ReLU(inplace=True))
        self.model = nn.Sequential(*layers)
        self.config = {"channels": channels, "width": width, "depth": depth}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.model(x)

    @classmethod
    def from_state_dict(cls, sd: dict) -> "DnCNN":
        """Build from a KAIR state dict, inferring channels, width and depth from the tensors."""
        convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("model.") and k.endswith(".weight"))
        if not convs or convs != list(range(0, 2 * len(convs), 2)):
            raise ValueError("state dict is not a KAIR DnCNN: expected keys model.0.weight, model.2.weight, ...")
        first, last = sd["model.0.weight"], sd[f"model.{convs[-1]}.weight"]
        kw = {"channels": last.shape[0], "width": first.shape[0], "depth": len(convs)}
        if cls is DnCNN and first.shape[1] == last.shape[0] + 1:
            cls = FDnCNN  # one more input channel: the noise-level map
        if first.shape[1] != last.shape[0]:
            kw["in_channels"] = first.shape[1]
        net = cls(**kw)
        net.load_state_dict(sd)
        return net


class FDnCNN(DnCNN):
    """KAIR's FDnCNN: DnCNN layers fed with the image plus a noise-level map channel (sigma / 255), predicting
    the clean image directly. Wrap it in :class:`cem_fast.models.wrappers.WithNoiseMap` to give it the map."""

    def __init__(self, channels: int = 3, width: int = 64, depth: int = 20, in_channels: int | None = None):
        super().__init__(channels, width, depth, in_channels or channels + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def is_dncnn_state_dict(sd: dict) -> bool:
    keys = [k for k in sd if isinstance(k, str)]
    return bool(keys) and all(k.startswith("model.") and k.rsplit(".", 1)[-1] in ("weight", "bias") for k in keys) \
        and "model.0.weight" in sd and getattr(sd["model.0.weight"], "dim", lambda: 0)() == 4
