"""SDXL sampling of many prompts: one batch across prompts against one prompt at a time.

    python benchmarks/sdxl_sampling.py                    # the world SDXL (128 px), the world bench's load
    python benchmarks/sdxl_sampling.py --device cuda      # the same on a GPU
    python benchmarks/sdxl_sampling.py --prompts 2 --images 2 --steps 2 --repeats 1   # smoke test

The load is what one world bench unit samples: 10 content prompts and 10 style prompts, 8 images each,
20 steps, CFG. Rows (the same images, seeds ``seed + i`` per prompt):

* ``per prompt, batch 4``: the old path (before 2026-12-08): one pipeline run per prompt, 4 images
  at a time (``sample_batch_size: 4``);
* ``per prompt, auto``: one prompt per call, the new automatic batch (all 8 images at once);
* ``all prompts, auto``: one call for every prompt, 64 images per batch at 128 px (now the default).

Prints median and min-max seconds of ``--repeats`` runs, and each row's ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _timing import import_toolkit, repeat


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="world")
    p.add_argument("--prompts", type=int, default=20, help="prompts (default 20: 10 content + 10 style)")
    p.add_argument("--images", type=int, default=8, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import_toolkit("cstoolkit.backbones")
    from cstoolkit.backbones.sdxl import SDXLBackbone, SDXLConfig

    device = torch.device(args.device)
    bb = SDXLBackbone.from_config(SDXLConfig(preset=args.preset), device=device)
    prompts = [f"a {w} in {s} style" for w in ("star", "heart", "tree", "house", "boat")
               for s in ("neon", "mosaic", "outline", "gradient")][:args.prompts]

    def run(batch: int | None, together: bool):
        def fn() -> None:
            bb.config.sample_batch_size = batch
            try:
                groups = [prompts] if together else [[q] for q in prompts]
                for group in groups:
                    bb.sample(group, num_images=args.images, seed=0, steps=args.steps, guidance_scale=5.0,
                              progress=False)
            finally:
                bb.config.sample_batch_size = None
        return fn

    rows = [("per prompt, batch 4", run(4, False)), ("per prompt, auto", run(None, False)),
            ("all prompts, auto", run(None, True))]
    print(f"SDXL {args.preset} on {device}: {len(prompts)} prompts x {args.images} images, {args.steps} steps, "
          f"auto batch {bb.sample_batch()}; {args.repeats} repeats")
    base = None
    for name, fn in rows:
        times = repeat(fn, device, warmup=1, repeats=args.repeats)
        med = statistics.median(times)
        base = base or med
        print(f"{name:22s} {med:8.2f} s  [{min(times):.2f}, {max(times):.2f}]  x{med / base:.2f} of the first row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
