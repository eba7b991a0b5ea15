import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cem_fast
from cem_fast.models import Bicubic, DnCNN, default_denoiser, load_model, model_digest
from cem_fast.reference import psnr_uint8


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


def test_an_array_or_tensor_image_is_named_for_what_it_is():
    from cem_fast.images import load_image
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert load_image(a)[1] == "array"
    assert load_image(torch.from_numpy(a).permute(2, 0, 1))[1] == "tensor"
    res = cem_fast.causal_effect_map(Bicubic(2), a, "SR", scale=2, roi=(8, 8, 8), coarse=1, fine=1, locality="off")
    assert res.image_name == "array" and res.summary()["image"] == "array"


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
