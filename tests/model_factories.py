"""Model factories for the CLI tests (``model_factories:make``); importable because tests/ is on sys.path."""
import torch
import torch.nn.functional as F

from cem_fast.models import FDnCNN


class SharpSR(torch.nn.Module):
    def forward(self, x):
        up = F.interpolate(x, scale_factor=4.0, mode="bicubic", align_corners=False)
        return up + 0.5 * (up - F.avg_pool2d(up, 3, 1, 1))


def make():
    return SharpSR()


def make_fdncnn():
    torch.manual_seed(0)
    return FDnCNN(3, 8, 3)


class Blur(torch.nn.Module):
    """``n`` depthwise ``k x k`` box blurs (positive weights, each channel alone): receptive-field radius
    ``n * (k // 2)`` px, and every input pixel in it moves the output the same way."""

    def __init__(self, n: int, k: int):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(3, 3, k, padding=k // 2, bias=False, groups=3)
                                         for _ in range(n))
        with torch.no_grad():
            for c in self.convs:
                c.weight.fill_(1.0 / (k * k))

    def forward(self, x):
        for c in self.convs:
            x = torch.relu(c(x))
        return x
