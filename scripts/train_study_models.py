"""Train the two small denoisers of the worked study (docs/study.md): a shallow and a deep DnCNN-like net.

Both are cem_fast.models.DnCNN (3x3 convolutions of ``--width`` channels with ReLU between, predicting the noise):
``--shallow`` layers (default 3: receptive-field radius 3 px) and ``--deep`` layers (default 12: radius 12 px),
trained with the same data, steps and seed, on DN sigma 50 (the DN task's degradation: add noise, clip, truncate
to uint8) from random 32x32 crops (flips and rotations) of the project's shared images demo_1.png and demo_3.png
(../shared/data/images; with --images, any others). The study maps the held-out images (the shipped demo.png and
demo_2.png). About 4-5 minutes on one CPU thread:

    python scripts/train_study_models.py --out docs/study/models

Writes shallow.pt and deep.pt (KAIR DnCNN key layout: ``model: docs/study/models/deep.pt`` in a config) and
training.json (steps, time and held-out PSNRs of each).
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
from cem_fast.reference import psnr_uint8

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGES = ROOT.parent / "shared" / "data" / "images"
TRAIN = [SHARED_IMAGES / "demo_1.png", SHARED_IMAGES / "demo_3.png"]
HELD_OUT = [ROOT / "cem_fast" / "data" / "demo.png", SHARED_IMAGES / "demo_2.png"]
SIGMA = 50.0


def load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def degrade(clean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """DN sigma 50 as the task applies it: add noise, clip to [0, 1], truncate to uint8."""
    noise = torch.randn(clean.shape, generator=gen) * SIGMA / 255
    return torch.floor(torch.clamp(clean + noise, 0, 1) * 255) / 255


def held_out_psnr(net: DnCNN, images: list[torch.Tensor]) -> list[float]:
    gen = torch.Generator().manual_seed(123)
    out = []
    with torch.inference_mode():
        for img in images:
            y = torch.round(net(degrade(img[None], gen)).clamp(0, 1) * 255)[0].permute(1, 2, 0)
            out.append(round(float(psnr_uint8(y, torch.round(img * 255).permute(1, 2, 0))), 3))
    return out


def train(depth: int, width: int, steps: int, batch: int, crop: int, images: list[torch.Tensor], seed: int):
    torch.manual_seed(seed)
    rs = np.random.RandomState(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DnCNN(3, width, depth)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(1, steps + 1):
        crops = []
        for _ in range(batch):
            img = images[rs.randint(len(images))]
            _, h, w = img.shape
            y, x = rs.randint(h - crop), rs.randint(w - crop)
            c = img[:, y:y + crop, x:x + crop]
            if rs.rand() < 0.5:
                c = c.flip(-1)
            crops.append(torch.rot90(c, rs.randint(4), (1, 2)))
        clean = torch.stack(crops)
        loss = F.mse_loss(net(degrade(clean, gen)), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval(), float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/study/models")
    ap.add_argument("--shallow", type=int, default=3, help="layers of the shallow net (default 3)")
    ap.add_argument("--deep", type=int, default=12, help="layers of the deep net (default 12)")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: these small batches run faster on one, and on a busy machine "
                         "two threads ran 10-25x slower here)")
    ap.add_argument("--images", nargs="*", default=None, help="training images (default: demo_1 and demo_3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_paths = [Path(p) for p in args.images] if args.images else TRAIN
    missing = [str(p) for p in train_paths if not p.is_file()]
    if missing:
        raise SystemExit(f"training images not found: {', '.join(missing)} (the project's shared data, or --images)")
    images = [load(p) for p in train_paths]
    held = [load(p) for p in HELD_OUT if p.is_file()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = {"task": "DN", "sigma": SIGMA, "train_images": [p.name for p in train_paths],
           "held_out_images": [p.name for p in HELD_OUT if p.is_file()], "steps": args.steps, "batch": args.batch,
           "crop": args.crop, "width": args.width, "seed": args.seed, "threads": args.threads, "models": {}}
    for name, depth in (("shallow", args.shallow), ("deep", args.deep)):
        t0 = time.time()
        net, loss = train(depth, args.width, args.steps, args.batch, args.crop, images, args.seed)
        torch.save({f"model.{k}": v for k, v in net.model.state_dict().items()}, out / f"{name}.pt")
        psnr = held_out_psnr(net, held)
        log["models"][name] = {"depth": depth, "receptive_field_radius_px": depth, "final_loss": round(loss, 6),
                               "train_s": round(time.time() - t0, 1), "held_out_psnr_db": psnr,
                               "params": sum(p.numel() for p in net.parameters())}
        print(f"{name}: {depth} layers, {time.time() - t0:.0f} s, held-out PSNR {psnr} dB", flush=True)
    (out / "training.json").write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
