"""SwinIR (cem_fast/models/swinir.py): the official key layout loads as it is, and the window attention is a
softmax over each window."""
import pytest
import torch

from cem_fast.models import load_model
from helpers import conv, layout, random_state_dict


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
