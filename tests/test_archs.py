"""Built-in architectures load state dicts in their public key layouts, detection picks the right one, model
needs are met by wrappers, and a model compared with itself differs by exactly nothing."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.compare import difference
from cem_fast.models import (EDSR, RCAN, DnCNN, FDnCNN, MSRResNet, PadToMultiple, PerChannel, PreUpsample,
                             WithNoiseMap, apply_model_options, detect_architecture, load_model)


def conv(cout, cin, k=3):
    return {"weight": (cout, cin, k, k), "bias": (cout,)}


def layout(prefix_shapes):
    """Flatten {"prefix": {"weight": shape, "bias": shape}} into state-dict key -> shape."""
    return {f"{p}.{n}": shape for p, d in prefix_shapes.items() for n, shape in d.items()}


# The public key layouts (BasicSR / KAIR), written out by hand for small configurations.
MSRRESNET_X4 = layout({"conv_first": conv(8, 3), "body.0.conv1": conv(8, 8), "body.0.conv2": conv(8, 8),
                       "body.1.conv1": conv(8, 8), "body.1.conv2": conv(8, 8), "upconv1": conv(32, 8),
                       "upconv2": conv(32, 8), "conv_hr": conv(8, 8), "conv_last": conv(3, 8)})
EDSR_X4 = layout({"conv_first": conv(8, 3), "body.0.conv1": conv(8, 8), "body.0.conv2": conv(8, 8),
                  "body.1.conv1": conv(8, 8), "body.1.conv2": conv(8, 8), "body.2.conv1": conv(8, 8),
                  "body.2.conv2": conv(8, 8), "conv_after_body": conv(8, 8), "upsample.0": conv(32, 8),
                  "upsample.2": conv(32, 8), "conv_last": conv(3, 8)})
RCAN_X2 = layout({"conv_first": conv(16, 3),
                  **{f"body.{g}.residual_group.{b}.{n}": c for g in range(2) for b in range(2)
                     for n, c in (("rcab.0", conv(16, 16)), ("rcab.2", conv(16, 16)),
                                  ("rcab.3.attention.1", conv(4, 16, 1)), ("rcab.3.attention.3", conv(16, 4, 1)))},
                  "body.0.conv": conv(16, 16), "body.1.conv": conv(16, 16), "conv_after_body": conv(16, 16),
                  "upsample.0": conv(64, 16), "conv_last": conv(3, 16)})
FDNCNN = layout({"model.0": conv(8, 4), "model.2": conv(8, 8), "model.4": conv(3, 8)})
DNCNN = layout({"model.0": conv(8, 3), "model.2": conv(8, 8), "model.4": conv(8, 8), "model.6": conv(3, 8)})


def random_state_dict(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}


@pytest.mark.parametrize("shapes,cls,config,scale", [
    (MSRRESNET_X4, MSRResNet, {"num_feat": 8, "num_block": 2, "upscale": 4}, 4),
    (EDSR_X4, EDSR, {"num_feat": 8, "num_block": 3, "upscale": 4, "res_scale": 1.0}, 4),
    (RCAN_X2, RCAN, {"num_feat": 16, "num_group": 2, "num_block": 2, "squeeze_factor": 4, "upscale": 2}, 2),
    (FDNCNN, FDnCNN, {"width": 8, "depth": 3}, 1),
    (DNCNN, DnCNN, {"width": 8, "depth": 4}, 1),
])
@pytest.mark.parametrize("wrap", ["params_ema", "params", "state_dict", "module.", None])
def test_public_layouts_load_and_are_detected(tmp_path, shapes, cls, config, scale, wrap):
    sd = random_state_dict(shapes)
    if wrap == "module.":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = {wrap: sd} if wrap else sd
    torch.save(obj, tmp_path / "ck.pth")
    model, name = load_model(str(tmp_path / "ck.pth"))
    assert type(model) is cls and name == "ck"
    assert {k: model.config[k] for k in config} == config
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.rand(1, 4 if cls is FDnCNN else 3, 6, 5)
    assert model(x).shape == (1, 3, 6 * scale, 5 * scale)


def test_unknown_layout_names_the_closest_architecture():
    sd = random_state_dict(EDSR_X4)
    sd["conv_after_body_renamed.weight"] = sd.pop("conv_after_body.weight")
    with pytest.raises(ValueError, match=r"unknown architecture .* closest known: EDSR"):
        detect_architecture(sd)
    sd = random_state_dict(MSRRESNET_X4)
    sd["upconv1.weight"] = torch.zeros(5, 8, 3, 3)  # right names, wrong shapes
    with pytest.raises(ValueError, match="looks like MSRResNet but does not load"):
        detect_architecture(sd)


def test_model_need_wrappers():
    fd = FDnCNN(3, 8, 3)
    x = torch.rand(2, 3, 7, 9)
    y = WithNoiseMap(fd, 25)(x)
    assert torch.equal(y, fd(torch.cat([x, torch.full_like(x[:, :1], 25 / 255)], 1)))

    class NeedsMultipleOf8(torch.nn.Module):
        def forward(self, t):
            assert t.shape[-1] % 8 == 0 and t.shape[-2] % 8 == 0, t.shape
            return torch.nn.functional.interpolate(t, scale_factor=2.0)

    out = PadToMultiple(NeedsMultipleOf8(), 8, scale=2)(x)
    assert out.shape == (2, 3, 14, 18)
    assert torch.allclose(out, torch.nn.functional.interpolate(x, scale_factor=2.0))  # pad only adds a border
    same = PreUpsample(torch.nn.Identity(), 4)(x)
    assert same.shape == (2, 3, 28, 36)
    grey = PerChannel(DnCNN(1, 4, 2))
    assert grey(x).shape == x.shape
    assert torch.allclose(grey(x)[:, 1:2], grey.model(x[:, 1:2]))
    m = apply_model_options(fd, {"noise_level": 50, "pad_multiple": 4})
    assert isinstance(m, PadToMultiple) and isinstance(m.model, WithNoiseMap)
    with pytest.raises(ValueError, match="unknown key"):
        apply_model_options(fd, {"noise": 50})


def test_torch_export_files_load(tmp_path):
    net = DnCNN(3, 4, 2).eval()
    ep = torch.export.export(net, (torch.rand(1, 3, 8, 8),))
    torch.export.save(ep, str(tmp_path / "net.pt2"))
    model, name = load_model(str(tmp_path / "net.pt2"), trust_model_code=True)
    x = torch.rand(1, 3, 8, 8)
    assert name == "net" and torch.allclose(model(x), net(x))


def test_spandrel_path():
    try:
        import spandrel  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the optional extra is not usable here
        with pytest.raises(ValueError, match="needs the optional spandrel package"):
            load_model("spandrel:some.pth")
        pytest.skip(f"spandrel is not importable here ({type(e).__name__}); the error path was checked")
    with pytest.raises(ValueError, match="spandrel cannot load"):
        load_model("spandrel:/nonexistent.pth")


def test_a_model_compared_with_itself_differs_by_nothing(rng):
    img = rng.randint(0, 256, (16, 24, 3)).astype(np.uint8)
    bank = cem_fast.PatchBank(torch.from_numpy(rng.randint(0, 256, (8, 3, 8, 8)).astype(np.uint8)))
    results, diffs = cem_fast.compare_models([DnCNN(3, 4, 2), DnCNN(3, 4, 2)], img, task="DN", roi=(0, 8, 8),
                                             patches=bank, coarse=2, fine=3)
    a = results[0]
    same = difference(a, a)
    assert np.array_equal(same.diff, np.zeros_like(same.diff)) and not same.significant.any()
    assert (same.half_width == 0).all()
    d = diffs[0]  # two different random DnCNNs: paired differences over the same draws
    assert d.diff.shape == a.cem.shape and (d.draws >= 2).all()


def test_paired_differences_are_tighter_than_independent_ones(rng):
    img = rng.randint(0, 256, (24, 24, 3)).astype(np.uint8)
    bank = cem_fast.PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))
    kw = dict(task="SR", scale=2, roi=(8, 8, 8), patches=bank, mode="exhaustive", samples=8)
    a = cem_fast.causal_effect_map(cem_fast.models.Bicubic(2), img, seed=0, **kw)

    class Sharper(torch.nn.Module):
        def forward(self, x):
            up = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bicubic", align_corners=False)
            return up + 0.3 * (up - torch.nn.functional.avg_pool2d(up, 3, 1, 1))

    b_same = cem_fast.causal_effect_map(Sharper(), img, seed=0, **kw)
    b_other = cem_fast.causal_effect_map(Sharper(), img, seed=1, **kw)
    paired = difference(b_same, a).half_width
    # unpaired: the spread of the per-draw effect difference with independent draws
    ind = (cem_fast.pipeline.samples.effects(b_other.psnr_origin, b_other.samples_fine)
           - cem_fast.pipeline.samples.effects(a.psnr_origin, a.samples_fine))
    unpaired = 1.96 * ind.std(axis=2, ddof=1) / np.sqrt(8)
    assert np.median(paired) < 0.5 * np.median(unpaired)


def swinir_layout(embed=12, depths=(2, 2), heads=(2, 3), ws=4, img=8, upsampler="pixelshuffle", scale=2, feat=8):
    """The official SwinIR key layout (parameters and persistent buffers), written from its structure."""
    n = ws * ws
    keys = {"conv_first": conv(embed, 3)}
    shapes = layout(keys)
    shapes.update({"patch_embed.norm.weight": (embed,), "patch_embed.norm.bias": (embed,)})
    for i, (d, h) in enumerate(zip(depths, heads)):
        for b in range(d):
            p = f"layers.{i}.residual_group.blocks.{b}"
            shapes.update({f"{p}.norm1.weight": (embed,), f"{p}.norm1.bias": (embed,),
                           f"{p}.attn.relative_position_bias_table": ((2 * ws - 1) ** 2, h),
                           f"{p}.attn.relative_position_index": (n, n),
                           f"{p}.attn.qkv.weight": (3 * embed, embed), f"{p}.attn.qkv.bias": (3 * embed,),
                           f"{p}.attn.proj.weight": (embed, embed), f"{p}.attn.proj.bias": (embed,),
                           f"{p}.norm2.weight": (embed,), f"{p}.norm2.bias": (embed,),
                           f"{p}.mlp.fc1.weight": (2 * embed, embed), f"{p}.mlp.fc1.bias": (2 * embed,),
                           f"{p}.mlp.fc2.weight": (embed, 2 * embed), f"{p}.mlp.fc2.bias": (embed,)})
            if b % 2 == 1:
                shapes[f"{p}.attn_mask"] = ((img // ws) ** 2, n, n)
        shapes.update(layout({f"layers.{i}.conv": conv(embed, embed)}))
    shapes.update({"norm.weight": (embed,), "norm.bias": (embed,)})
    shapes.update(layout({"conv_after_body": conv(embed, embed)}))
    if upsampler == "pixelshuffle":
        shapes.update(layout({"conv_before_upsample.0": conv(feat, embed), "upsample.0": conv(4 * feat, feat),
                              "conv_last": conv(3, feat)}))
    elif upsampler == "pixelshuffledirect":
        shapes.update(layout({"upsample.0": conv(scale * scale * 3, embed)}))
    else:
        shapes.update(layout({"conv_last": conv(3, embed)}))
    return shapes


@pytest.mark.parametrize("upsampler,scale", [("pixelshuffle", 2), ("pixelshuffledirect", 3), ("", 1)])
def test_swinir_official_layout_loads(tmp_path, upsampler, scale):
    from cem_fast.models import SwinIR
    shapes = swinir_layout(upsampler=upsampler, scale=scale)
    sd = random_state_dict(shapes)
    # buffers carry their real values in released checkpoints: take them from the structure they describe
    ref = SwinIR(8, 3, 12, (2, 2), (2, 3), 4, 2.0, scale, 1.0, upsampler, 8)
    for k in shapes:
        if k.endswith(("relative_position_index", "attn_mask")):
            sd[k] = ref.state_dict()[k]
    assert set(ref.state_dict()) == set(shapes)
    torch.save({"params": sd}, tmp_path / "swinir.pth")
    model, _ = load_model(str(tmp_path / "swinir.pth"))
    assert isinstance(model, SwinIR)
    assert model.config["depths"] == [2, 2] and model.config["num_heads"] == [2, 3]
    assert model.config["window_size"] == 4 and model.config["upscale"] == scale
    x = torch.rand(1, 3, 10, 7)  # not a multiple of the window: padded inside, cropped back
    y = model(x)
    assert y.shape == (1, 3, 10 * scale, 7 * scale) and torch.isfinite(y).all()


def test_swinir_window_attention_matches_a_naive_softmax():
    from cem_fast.models.swinir import WindowAttention
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, 2)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(3, 4, 8)
    out = attn(x)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0  # scale = (8 / 2) ** -0.5
        # relative bias: positions (0,0),(0,1),(1,0),(1,1); index = (dy + 1) * 3 + (dx + 1)
        pos = [(0, 0), (0, 1), (1, 0), (1, 1)]
        bias = torch.tensor([[attn.relative_position_bias_table[(a[0] - b[0] + 1) * 3 + (a[1] - b[1] + 1), h].item()
                              for b in pos] for a in pos])
        heads.append((logits + bias).softmax(-1) @ v[..., sl])
    assert torch.allclose(out, attn.proj(torch.cat(heads, -1)), atol=1e-5)
