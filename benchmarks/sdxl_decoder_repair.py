"""Before/after figures of the world SDXL's VAE decoder repair (the top-right dot, docs/world.md "The SDXL dot").

For each weights folder (laid out like world/weights: ``<dir>/sdxl/{unet,vae}``, loaded through the ``world``
preset with ``CSTOOLKIT_WORLD_WEIGHTS``), with the same renders and seeds:

* ``artifacts``: :func:`decoder_artifacts` on ``--renders`` held-out renders (seed ``--render-seed``, not the
  repair's probe seed): the up blocks' peak-to-typical ratio, the 16 px corner errors and the reconstruction PSNR;
* ``oracle``: content / style / both accuracy (and rejected) of samples of the 10 held-out pairs x ``--seeds``
  seeds, Euler ``--steps`` steps, CFG ``--cfg`` (as tests/test_world_presets.py), by the world oracle;
* ``sample_corners``: per corner of the samples, the mean over samples of the largest deviation of a 16 px corner
  from its median colour (a dot is a few pixels far from the corner's background);
* a PNG per folder: the first ``--grid`` samples (4 per row), 2x nearest-neighbour enlarged.

    python benchmarks/sdxl_decoder_repair.py --weights shipped:world/weights repaired:/tmp/dot/run --out /tmp/dot/m
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CORNERS = {"tl": (slice(0, 16), slice(0, 16)), "tr": (slice(0, 16), slice(-16, None)),
           "bl": (slice(-16, None), slice(0, 16)), "br": (slice(-16, None), slice(-16, None))}


def sample_corners(images: torch.Tensor) -> dict[str, float]:
    """Mean over images (B, 3, H, W) in [-1, 1] of each 16 px corner's largest channel-summed absolute deviation
    from the corner's median colour."""
    out = {}
    for name, (r, c) in CORNERS.items():
        patch = images[:, :, r, c].flatten(2)  # (B, 3, 256)
        dev = (patch - patch.median(dim=2, keepdim=True).values).abs().sum(1)  # (B, 256)
        out[name] = round(float(dev.amax(1).mean()), 4)
    return out


def measure(root: str, *, renders: torch.Tensor, seeds: int, steps: int, cfg: float) -> tuple[dict, torch.Tensor]:
    """Figures of the world SDXL under ``root`` and its held-out samples (pair-major, ``seeds`` per pair)."""
    from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig
    from cstoolkit.world.generator import HELD_OUT, caption
    from cstoolkit.world.oracle import load_oracle
    from cstoolkit.world.train.sdxl import decoder_artifacts

    os.environ["CSTOOLKIT_WORLD_WEIGHTS"] = str(Path(root).resolve())
    bb = SDXLBackbone.from_config(SDXLConfig(preset="world"))
    vae = bb.vae.float()
    vae.disable_slicing()
    t0 = time.time()
    result: dict = {"weights": str(Path(root).resolve()), "artifacts": decoder_artifacts(vae, renders)}
    vae.enable_slicing()
    images = []
    for c, s in HELD_OUT:
        images += bb.sample(caption(c, s), num_images=seeds, seed=0, steps=steps, guidance_scale=cfg, progress=False)
    x = torch.stack([torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1) for i in images])
    x = x.float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
    verdicts = load_oracle().classify(images)
    pairs = [p for p in HELD_OUT for _ in range(seeds)]
    hit_c = [r["content"] == c for r, (c, _) in zip(verdicts, pairs)]
    hit_s = [r["style"] == s for r, (_, s) in zip(verdicts, pairs)]
    n = len(pairs)
    result["oracle"] = {"images": n, "content": sum(hit_c) / n, "style": sum(hit_s) / n,
                        "both": sum(a and b for a, b in zip(hit_c, hit_s)) / n,
                        "rejected": sum(bool(r.get("rejected")) for r in verdicts) / n}
    first = [k for k in range(n) if k % seeds < 2]  # seeds 0 and 1: the samples of tests/test_world_presets.py
    result["oracle_first_2_seeds"] = {"images": len(first), "content": sum(hit_c[k] for k in first) / len(first),
                                      "style": sum(hit_s[k] for k in first) / len(first)}
    result["verdicts"] = [[r["content"], r["style"]] for r in verdicts]
    result["seconds"] = round(time.time() - t0, 1)
    return result, x


def save_grid(images: torch.Tensor, path: Path, ncol: int = 4, scale: int = 2) -> None:
    """Images (B, 3, H, W) in [-1, 1] as one PNG, ``ncol`` per row, enlarged ``scale`` x (nearest)."""
    from PIL import Image

    x = F.interpolate(images.float(), scale_factor=scale, mode="nearest")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = x.shape
    rows = -(-n // ncol)
    grid = torch.full((3, rows * (h + 4), ncol * (w + 4)), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * (h + 4):r * (h + 4) + h, c * (w + 4):c * (w + 4) + w] = x[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", required=True, help="NAME:DIR, DIR laid out like world/weights")
    p.add_argument("--out", required=True)
    p.add_argument("--renders", type=int, default=128)
    p.add_argument("--render-seed", type=int, default=7)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--grid", type=int, default=16)
    args = p.parse_args()
    from cstoolkit.world.train.sdxl import held_out_renders

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    renders = held_out_renders(args.renders, seed=args.render_seed)
    report = {"threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}
    for item in args.weights:
        name, root = item.split(":", 1)
        res, samples = measure(root, renders=renders, seeds=args.seeds, steps=args.steps, cfg=args.cfg)
        res["sample_corners"] = sample_corners(samples)
        # one sample of each of the first pairs, then the next seed: 16 different pairs/seeds in the grid
        order = [k * args.seeds + j for j in range(args.seeds) for k in range(len(samples) // args.seeds)]
        save_grid(samples[order[:args.grid]], out / f"samples_{name}.png")
        torch.save(samples, out / f"samples_{name}.pt")
        report[name] = res
        print(name, json.dumps(res), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
