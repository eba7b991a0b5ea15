"""Train the shipped x4 super-resolution and deraining defaults on CC0 / public-domain photographs.

Same data as scripts/train_default_denoiser.py (scikit-image's bundled samples, see cem_fast/data/LICENSES.md):
training on astronaut, coffee, rocket, brick, grass, gravel, camera; chelsea held out. Needs the `train` extra.

    python scripts/train_default_restorers.py sr --steps 1200
    python scripts/train_default_restorers.py dr --steps 1200

sr: MSRResNet (32 features, 4 blocks, x4; BasicSR key layout) on PIL-bicubic LR, against bicubic upsampling.
dr: DnCNN shape (12 x 48, residual) on medium synthetic rain (cem_fast.rain), against the rainy input.
Writes default_<task>.pt and default_<task>.json (held-out PSNRs) into --out.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cem_fast.models.dncnn import DnCNN
from cem_fast.models.sr_archs import MSRResNet
from cem_fast.rain import rain_layer
from cem_fast.reference import psnr_uint8
from train_default_denoiser import HELD_OUT, TRAIN, adam_cosine, seeded_data, training_parser

SCALE = 4


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1).float() / 255


def bicubic_lr(hr: np.ndarray) -> np.ndarray:
    h, w = hr.shape[0] // SCALE * SCALE, hr.shape[1] // SCALE * SCALE
    return np.array(Image.fromarray(hr[:h, :w]).resize((w // SCALE, h // SCALE), Image.BICUBIC))


def rainy(img: np.ndarray, seed: int) -> np.ndarray:
    layer, beta = rain_layer(img.shape[0], img.shape[1], seed, "medium")
    return np.floor(np.clip(img.astype(np.float32) + (beta * layer)[..., None], 0, 255)).astype(np.uint8)


def run_model(net, x: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return torch.round(net(to_tensor(x)[None]).clamp(0, 1) * 255)[0].permute(1, 2, 0)


def evaluate(task: str, net, img: np.ndarray) -> tuple[float, float, str]:
    if task == "sr":
        h, w = img.shape[0] // SCALE * SCALE, img.shape[1] // SCALE * SCALE
        gt = torch.from_numpy(img[:h, :w].copy())
        lr = bicubic_lr(img)
        base = torch.round(F.interpolate(to_tensor(lr)[None], scale_factor=float(SCALE), mode="bicubic",
                                         align_corners=False).clamp(0, 1) * 255)[0].permute(1, 2, 0)
        return psnr_uint8(base, gt), psnr_uint8(run_model(net, lr), gt), "bicubic x4"
    degraded = rainy(img, 0)
    gt = torch.from_numpy(img)
    return psnr_uint8(torch.from_numpy(degraded), gt), psnr_uint8(run_model(net, degraded), gt), "rainy input"


def main() -> None:
    ap = training_parser(__doc__, steps=1200, batch=16)
    ap.add_argument("task", choices=["sr", "dr"])
    args = ap.parse_args()
    rs, images, held = seeded_data(args.seed)
    if args.task == "sr":
        net = MSRResNet(num_feat=32, num_block=4, upscale=SCALE)
        crop = 64
        pairs = [(to_tensor(bicubic_lr(im)), to_tensor(im)) for im in images]
    else:
        net = DnCNN(3, 48, 12)
        crop = 48
        # a few rain layers per image, drawn once (the streak blur is the slow part)
        pairs = [(to_tensor(rainy(im, 1000 * i + k)), to_tensor(im)) for i, im in enumerate(images) for k in range(4)]
    opt, sched = adam_cosine(net, args.steps)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        xs, ys = [], []
        for _ in range(args.batch):
            lq, gt = pairs[rs.randint(len(pairs))]
            s = SCALE if args.task == "sr" else 1
            ly, lx = rs.randint(lq.shape[1] - crop // s), rs.randint(lq.shape[2] - crop // s)
            xs.append(lq[:, ly:ly + crop // s, lx:lx + crop // s])
            ys.append(gt[:, ly * s:ly * s + crop, lx * s:lx * s + crop])
        loss = F.l1_loss(net(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            net.eval()
            p_base, p_out, base_name = evaluate(args.task, net, held)
            net.train()
            print(f"step {step} loss {loss.item():.4f} held-out: {base_name} {p_base:.2f} dB -> model {p_out:.2f} dB "
                  f"({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sd = net.state_dict() if args.task == "sr" else {f"model.{k}": v for k, v in net.model.state_dict().items()}
    torch.save(sd, out / f"default_{args.task}.pt")
    p_base, p_out, base_name = evaluate(args.task, net, held)
    info = {"task": args.task, "architecture": type(net).__name__, **net.config, "steps": args.steps,
            "train_images": TRAIN, "held_out": HELD_OUT, "baseline": base_name,
            "held_out_psnr_baseline_db": round(p_base, 2), "held_out_psnr_model_db": round(p_out, 2),
            "gain_db": round(p_out - p_base, 2), "parameters": sum(p.numel() for p in net.parameters()),
            "file_bytes": (out / f"default_{args.task}.pt").stat().st_size, "seed": args.seed}
    (out / f"default_{args.task}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
