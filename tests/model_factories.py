"""Nets and model factories shared by the tests; the CLI's model specs name them (``model_factories:make``, importable
because tests/ is on sys.path, and on the PYTHONPATH of the CLI processes the tests start)."""
import sys

import torch
import torch.nn.functional as F

from cem_fast.models import FDnCNN


class ConvStack(torch.nn.Module):
    """The small conv-stack restorer of many tests: ``n`` same-padded 3x3 convolutions (``dilation``) from 3
    channels to 3, ``width`` channels between them, ``act`` (``"tanh"`` or ``"relu"``) after each but the last
    (and after the last too with ``act_last``), plus ``residual`` x the input when it is not None. Weights drawn
    from ``randn * init`` with one generator seeded ``seed`` for all parameters in order, or with
    ``seed_per_parameter`` a generator seeded ``seed + i`` for the i-th. Receptive-field radius ``n * dilation``
    px.

    The defaults are the tanh stack of known reach that the locality tests probe; :class:`TinyNet` is the
    two-layer ReLU net, and ``ConvStack(2, width=4, act="relu", act_last=False, residual=None,
    seed_per_parameter=True, init=0.1)`` the plain conv-ReLU-conv of the custom-op compile tests."""

    def __init__(self, n=2, dilation=1, seed=0, *, width=3, act="tanh", act_last=True, residual=0.5, init=0.2,
                 seed_per_parameter=False):
        super().__init__()
        channels = [3] + [width] * (n - 1) + [3]
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(channels[i], channels[i + 1], 3, padding=dilation, dilation=dilation) for i in range(n))
        self.act = {"tanh": torch.tanh, "relu": torch.relu}[act]
        self.act_last, self.residual = act_last, residual
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                if seed_per_parameter:
                    g = torch.Generator().manual_seed(seed + i)
                p.copy_(torch.randn(p.shape, generator=g) * init)

    def forward(self, x):
        y = x
        for i, c in enumerate(self.convs):
            y = c(y)
            if self.act_last or i < len(self.convs) - 1:
                y = self.act(y)
        if self.residual is None:
            return y
        return x + (y if self.residual == 1 else self.residual * y)


class TinyNet(ConvStack):
    """A small same-size restorer with a bounded receptive field (radius 2): 3 -> 8 -> 3 channels, ReLU between,
    ``x + net(x)``, weights ``randn * 0.1`` (the ``tiny_net`` fixture)."""

    def __init__(self, seed: int = 0):
        super().__init__(2, seed=seed, width=8, act="relu", act_last=False, residual=1.0, init=0.1)


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


class RollBlur(torch.nn.Module):
    """Batch-invariant (no convolution algorithm to choose): a 3-tap average along x and a gain, the same outputs
    whatever the batch composition."""

    def forward(self, x):
        return 0.9 * (x + x.roll(1, -1) + x.roll(-1, -1)) / 3 + 0.05


class Dim(torch.nn.Module):
    """Not an exact restorer, so Y(I) is finite."""

    def forward(self, x):
        return x * 0.5


class InPlace(torch.nn.Module):
    def forward(self, x):
        return x.mul_(0.9)


class OutOfPlace(torch.nn.Module):
    def forward(self, x):
        return x * 0.9


def box_blur(x: torch.Tensor) -> torch.Tensor:
    w = torch.full((x.shape[1], 1, 3, 3), 1 / 9, dtype=x.dtype, device=x.device)
    return F.conv2d(x, w, padding=1, groups=x.shape[1])


class NaNEveryThird(torch.nn.Module):
    """A 3x3 box blur that writes NaN into a patch of every third forward's output."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = box_blur(x)
        if self.calls % 3 == 0:
            y[..., 2:6, 2:6] = float("nan")
        return y


def make_nan_every_third():
    return NaNEveryThird()


class Drifts(torch.nn.Module):
    """A box blur plus an offset that grows with every call (state kept between forwards)."""

    def __init__(self, step=1e-3):
        super().__init__()
        self.calls, self.step = 0, step

    def forward(self, x):
        self.calls += 1
        return box_blur(x) + self.step * self.calls


class ExitsOnBatches(torch.nn.Module):
    def forward(self, x):
        if x.shape[0] > 1:
            sys.exit("usage: model.py [-h]")  # research code that parses arguments, say
        return box_blur(x)


def make_exits():
    return ExitsOnBatches()


class Exits(torch.nn.Module):
    def forward(self, x):
        raise SystemExit(3)  # research code that parses arguments or exits


def make_exit_3():
    return Exits()


def raising_factory():
    raise KeyError("weights")


# ---- nets of the layer-by-layer tests (tests/layerwise, tests/pipeline/engines) ----

class RandomNet(torch.nn.Module):
    """Same-padded convolutions (kernel, dilation, groups drawn), eval batch norm with drawn statistics, mixed
    activations, a residual every other layer and a global residual: what the engine claims to support."""

    def __init__(self, layers, width, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs, self.norms, self.acts = torch.nn.ModuleList(), torch.nn.ModuleList(), torch.nn.ModuleList()
        cin, self.residual = 3, []
        for i, (k, d, groups) in enumerate(layers):
            cout = 3 if i == len(layers) - 1 else width
            groups = groups if cin % groups == 0 and cout % groups == 0 else 1
            self.convs.append(torch.nn.Conv2d(cin, cout, k, padding=d * (k - 1) // 2, dilation=d, groups=groups))
            bn = torch.nn.BatchNorm2d(cout)
            bn.running_mean.copy_(torch.randn(cout, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(cout, generator=g) + 0.5)
            self.norms.append(bn)
            self.acts.append([torch.nn.ReLU(inplace=True), torch.nn.LeakyReLU(0.2), torch.nn.PReLU(cout),
                              torch.nn.Tanh()][i % 4])
            self.residual.append(i % 2 == 1 and cin == cout)
            cin = cout
        with torch.no_grad():
            for p in self.convs.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.eval()

    def forward(self, x):
        y = x
        for c, n, a, res in zip(self.convs, self.norms, self.acts, self.residual):
            z = a(n(c(y)))
            y = z + y if res else z
        return x - 0.1 * torch.tanh(y)


class Reflect(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return x + 0.1 * self.conv(x)


class TinySR(torch.nn.Module):
    """MSRResNet's shape at a small size: convolutions, a residual block, pixel shuffles up to x``scale``, and the
    input upsampled by interpolation (``mode``) added to the output."""

    def __init__(self, scale=2, mode="bilinear", width=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.scale, self.mode = scale, mode
        self.first = torch.nn.Conv2d(3, width, 3, padding=1)
        self.body = torch.nn.Conv2d(width, width, 3, padding=1)
        self.ups = torch.nn.ModuleList(torch.nn.Conv2d(width, width * 4, 3, padding=1) for _ in range(scale // 2))
        self.last = torch.nn.Conv2d(width, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        f = torch.nn.functional.leaky_relu(self.first(x), 0.1)
        f = f + torch.relu(self.body(f))
        for up in self.ups:
            f = torch.nn.functional.leaky_relu(torch.nn.functional.pixel_shuffle(up(f), 2), 0.1)
        base = torch.nn.functional.interpolate(x, scale_factor=self.scale, mode=self.mode,
                                               align_corners=None if self.mode == "nearest" else False)
        return self.last(f) + base
