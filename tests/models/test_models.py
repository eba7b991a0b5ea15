import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cem_fast.models import (EDSR, RCAN, Bicubic, DnCNN, FDnCNN, MSRResNet, default_denoiser, detect_architecture,
                             load_model, model_digest)
from cem_fast.reference import psnr_uint8
from helpers import conv, crafted_pt2, layout, random_state_dict


def denoise_gain(net, img, sigma=50, seed=0):
    noise = np.random.RandomState(seed).normal(0, sigma / 255, img.shape)
    noisy = (np.clip(img / 255 + noise, 0, 1) * 255).astype(np.uint8)
    x = torch.from_numpy(noisy).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        y = torch.round(net(x).clamp(0, 1) * 255)[0].permute(1, 2, 0)
    gt = torch.from_numpy(img)
    return psnr_uint8(y, gt) - psnr_uint8(torch.from_numpy(noisy), gt)


def test_kair_dncnn_checkpoint_loads_and_denoises(shared, demo2):
    model, name = load_model(str(shared / "models" / "dncnn_color_blind.pth"))
    assert isinstance(model, DnCNN) and name == "dncnn_color_blind"
    assert model.config == {"channels": 3, "width": 64, "depth": 20}
    assert denoise_gain(model, demo2[64:160, 64:160].copy()) > 8


def test_default_denoiser_beats_the_noisy_input_by_6db():
    from importlib import resources
    net = default_denoiser()
    with resources.as_file(resources.files("cem_fast") / "data" / "demo.png") as p:
        img = np.asarray(Image.open(p).convert("RGB")).copy()  # a crop of the held-out photograph
    assert denoise_gain(net, img) >= 6
    size = (resources.files("cem_fast") / "data" / "default_denoiser.pt").stat().st_size
    assert size <= 2 * 1024 * 1024


def test_wrapped_and_prefixed_state_dicts_load(tmp_path):
    net = DnCNN(3, 8, 4)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"params": sd}, tmp_path / "ck.pth")
    model, _ = load_model(str(tmp_path / "ck.pth"))
    assert model_digest(model) == model_digest(net)


def test_torchscript_and_factory_specs(tmp_path):
    scripted = torch.jit.trace(Bicubic(2), torch.rand(1, 3, 4, 4))
    scripted.save(str(tmp_path / "bic.pt"))
    with pytest.raises(ValueError, match="is a TorchScript program, which can run code.*trust_model_code"):
        load_model(str(tmp_path / "bic.pt"))
    model, name = load_model(str(tmp_path / "bic.pt"), trust_model_code=True)
    x = torch.rand(1, 3, 5, 6)
    assert name == "bic" and torch.equal(model(x), Bicubic(2)(x))
    model, name = load_model("torch.nn:Identity")
    assert isinstance(model, torch.nn.Identity) and name == "Identity"
    model, name = load_model("bicubic:x3")
    assert model(x).shape == (1, 3, 15, 18) and name == "bicubic_x3"


@pytest.mark.parametrize("spec,match", [
    ("no_such_pkg_xyz:make", "no module .no_such_pkg_xyz. in .* or on PYTHONPATH: put no_such_pkg_xyz.py beside"),
    ("torch.nn:NoSuchThing", "has no attribute"),
    ("nothing-here.pth", "^model: no such file: .*nothing-here.pth$"),
    ("bicubic:xq", "expected bicubic:xS"),
])
def test_bad_model_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        load_model(spec)


def test_unknown_and_corrupt_checkpoints(tmp_path):
    torch.save({"conv.weight": torch.rand(3, 3, 3, 3)}, tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match=r"unknown architecture \(keys conv.weight"):
        load_model(str(tmp_path / "unknown.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_model(str(tmp_path / "bad.pth"))


def _demo_image():
    from importlib import resources
    with resources.as_file(resources.files("cem_fast") / "data" / "demo.png") as p:
        return np.asarray(Image.open(p).convert("RGB")).copy()


def test_default_sr_beats_bicubic_on_the_held_out_crop():
    from cem_fast.tasks import SuperResolution
    img = _demo_image()
    prep = SuperResolution(4).prepare(torch.from_numpy(img).permute(2, 0, 1), block=8)
    net, name = load_model("default:sr")
    with torch.inference_mode():
        sr = torch.round(net(prep.base[None]).clamp(0, 1) * 255)[0]
        bic = torch.round(Bicubic(4)(prep.base[None]).clamp(0, 1) * 255)[0]
    assert name == "default_sr" and sr.shape == prep.gt.shape
    assert psnr_uint8(sr, prep.gt) > psnr_uint8(bic, prep.gt)


def test_default_dr_beats_the_rainy_input_on_the_held_out_crop():
    from cem_fast.tasks import Derain
    img = _demo_image()
    prep = Derain("medium", rain_seed=0).prepare(torch.from_numpy(img).permute(2, 0, 1), block=8)
    net, name = load_model("default:dr")
    with torch.inference_mode():
        out = torch.round(net(prep.base[None]).clamp(0, 1) * 255)[0]
    rainy = torch.round(prep.base * 255)
    assert name == "default_dr"
    assert psnr_uint8(out, prep.gt) > psnr_uint8(rainy, prep.gt) + 2


@pytest.mark.parametrize("spec, arch", [("RCAN_DN", "RCAN"), ("DnCNN", "DnCNN"), ("SwinIR-M", "SwinIR")])
def test_a_reference_zoo_name_says_to_give_its_checkpoint(spec, arch):
    with pytest.raises(ValueError, match=rf"give the path of its checkpoint instead .*detects {arch} from"):
        load_model(spec)
    with pytest.raises(ValueError) as e:  # an unrelated name gets no such hint
        load_model("not_a_model_name")
    assert "checkpoint" not in str(e.value)


def test_a_factory_module_is_looked_for_in_the_given_folders_first(tmp_path, monkeypatch):
    from cem_fast.models import factory_module_origin
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "own_factory_mod.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Identity()\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the found folder is put on sys.path: undone after
    monkeypatch.delitem(sys.modules, "own_factory_mod", raising=False)
    with pytest.raises(ValueError, match=r"no module 'own_factory_mod' in .*elsewhere or on PYTHONPATH: put "
                                         r"own_factory_mod.py beside the config file"):
        load_model("own_factory_mod:make", module_dirs=[tmp_path / "elsewhere"])
    model, name = load_model("own_factory_mod:make", module_dirs=[tmp_path / "cfg", tmp_path])
    assert isinstance(model, torch.nn.Identity) and name == "make"
    assert factory_module_origin("own_factory_mod:make", [tmp_path / "cfg", tmp_path]) == {
        "path": str((tmp_path / "cfg" / "own_factory_mod.py").resolve()), "found_in": "config folder"}
    assert factory_module_origin("torch.nn:Identity", [tmp_path / "cfg", tmp_path])["found_in"] == "sys.path"
    assert factory_module_origin("bicubic", [tmp_path]) is None
    monkeypatch.delitem(sys.modules, "own_factory_mod")


# ---- public checkpoint layouts: loaded, and their architecture detected ----------------------------------------------

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


# ---- no code runs from a model file without the user's word ----------------------------------------------------------

def test_the_crafted_pt2_does_run_code_in_torch_export_load(tmp_path):
    """The threat is real (so the tests below can fail): torch.export.load itself runs the pickle."""
    marker = tmp_path / "pwned"
    evil = crafted_pt2(tmp_path / "evil.pt2", marker)
    with pytest.raises(Exception):
        torch.export.load(str(evil))
    assert marker.exists()


def test_pt2_and_torchscript_are_not_loaded_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_pt2(tmp_path / "evil.pt2", marker)
    with pytest.raises(ValueError, match=r"torch.export program, which can run code.*trust_model_code") as e:
        load_model(str(evil))
    assert "\n" not in str(e.value) and not marker.exists()
    torch.jit.trace(torch.nn.Conv2d(3, 3, 1), torch.rand(1, 3, 4, 4)).save(str(tmp_path / "ts.pt"))
    with pytest.raises(ValueError, match=r"TorchScript program.*--trust-model"):
        load_model(str(tmp_path / "ts.pt"))
    # the user's word loads it (and the crafted file still fails, with one line and no logger traceback)
    assert isinstance(load_model(str(tmp_path / "ts.pt"), trust_model_code=True)[0], torch.nn.Module)


# ---- a model's code digest (part of the sample cache's key) ----------------------------------------------------------

def test_torchscript_and_exported_code_changes_change_the_digest():
    from cem_fast.models import model_code_digest

    class A(torch.nn.Module):
        def forward(self, x):
            return x * 2

    class B(torch.nn.Module):
        def forward(self, x):
            return x * 3

    ts = [model_code_digest(torch.jit.script(m()))[0] for m in (A, B)]
    ex = [model_code_digest(torch.export.export(m(), (torch.rand(1, 3, 4, 4),)).module())[0] for m in (A, B)]
    assert None not in ts + ex and ts[0] != ts[1] and ex[0] != ex[1]
    # an instance whose forward was replaced is another model
    a, b = A(), A()
    b.forward = lambda x: x * 5
    assert model_code_digest(a)[0] != model_code_digest(b)[0]
