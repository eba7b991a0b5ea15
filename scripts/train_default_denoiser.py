"""Train the denoiser shipped as cem_fast's default model, and build the default patch bank and demo image.

Data: scikit-image's bundled sample photographs, all CC0 or public domain (see cem_fast/data/LICENSES.md):
astronaut, coffee, rocket (colour) and brick, grass, gravel, camera (grey, replicated to RGB) for training;
chelsea is held out for evaluation and the demo. Needs the `train` extra (`pip install scikit-image`).

    python scripts/train_default_denoiser.py --steps 1500 --out cem_fast/data

Writes default_denoiser.pt (KAIR DnCNN key layout, loadable by cem_fast.models.DnCNN.from_state_dict),
default_denoiser.json (held-out PSNRs), default_patches.npz and demo.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cem_fast.models.dncnn import DnCNN
from cem_fast.patches import PatchBank
from cem_fast.reference import psnr_uint8

TRAIN = ["astronaut.png", "coffee.png", "rocket.jpg", "brick.png", "grass.png", "gravel.png", "camera.png"]
HELD_OUT = "chelsea.png"
SIGMA = 50.0


def skimage_data_dir() -> Path:
    import skimage.data
    return Path(skimage.data.__file__).parent


def load_rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def noisy_u8(img: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.RandomState(seed).normal(0, SIGMA / 255, img.shape)
    return (np.clip(img / 255.0 + noise, 0, 1) * 255).astype(np.uint8)


def evaluate(net: DnCNN, img: np.ndarray) -> tuple[float, float]:
    noisy = noisy_u8(img, 0)
    x = torch.from_numpy(noisy).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        y = torch.round(net(x).clamp(0, 1) * 255)[0].permute(1, 2, 0)
    gt = torch.from_numpy(img)
    return psnr_uint8(torch.from_numpy(noisy), gt), psnr_uint8(y, gt)


def training_parser(doc: str, steps: int, batch: int) -> argparse.ArgumentParser:
    """The options every training script takes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--out", default="cem_fast/data")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def seeded_data(seed: int) -> tuple[np.random.RandomState, list[np.ndarray], np.ndarray]:
    """Seed torch; return the generator of the crops, the training photographs and the held-out one."""
    torch.manual_seed(seed)
    rs = np.random.RandomState(seed)
    data = skimage_data_dir()
    return rs, [load_rgb(data / n) for n in TRAIN], load_rgb(data / HELD_OUT)


def adam_cosine(net: torch.nn.Module, steps: int):
    """Adam at 1e-3 with a cosine decay over ``steps``: (optimizer, scheduler)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)


def main() -> None:
    ap = training_parser(__doc__, steps=1500, batch=24)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--crop", type=int, default=48)
    args = ap.parse_args()
    rs, images, held = seeded_data(args.seed)
    train = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]
    net = DnCNN(3, args.width, args.depth)
    opt, sched = adam_cosine(net, args.steps)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        crops = []
        for _ in range(args.batch):
            img = train[rs.randint(len(train))]
            _, H, W = img.shape
            y, x = rs.randint(H - args.crop), rs.randint(W - args.crop)
            c = img[:, y:y + args.crop, x:x + args.crop]
            if rs.rand() < 0.5:
                c = c.flip(-1)
            crops.append(torch.rot90(c, rs.randint(4), (1, 2)))
        clean = torch.stack(crops)
        # the same degradation as the DN task: add noise, clip, truncate to uint8
        noisy = torch.floor(torch.clamp(clean + torch.randn_like(clean) * SIGMA / 255, 0, 1) * 255) / 255
        loss = F.mse_loss(net(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            net.eval()
            p_noisy, p_out = evaluate(net, held)
            net.train()
            print(f"step {step} loss {loss.item():.5f} held-out {HELD_OUT}: noisy {p_noisy:.2f} dB -> "
                  f"{p_out:.2f} dB ({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {f"model.{k}": v for k, v in net.model.state_dict().items()}
    torch.save(sd, out / "default_denoiser.pt")
    p_noisy, p_out = evaluate(net, held)
    info = {"architecture": "DnCNN (KAIR layout)", **net.config, "sigma": SIGMA, "steps": args.steps,
            "train_images": TRAIN, "held_out": HELD_OUT, "held_out_psnr_noisy_db": round(p_noisy, 2),
            "held_out_psnr_denoised_db": round(p_out, 2), "gain_db": round(p_out - p_noisy, 2),
            "parameters": sum(p.numel() for p in net.parameters()),
            "file_bytes": (out / "default_denoiser.pt").stat().st_size, "seed": args.seed}
    (out / "default_denoiser.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))

    data = skimage_data_dir()
    bank = PatchBank.build([data / n for n in TRAIN[:3] + [HELD_OUT] + TRAIN[3:6]], count=4096, size=8, seed=1)
    bank.save(out / "default_patches.npz")
    # demo image: a 128x128 crop of the held-out photograph (the cat's face)
    Image.fromarray(held[40:168, 120:248]).save(out / "demo.png")


if __name__ == "__main__":
    main()
