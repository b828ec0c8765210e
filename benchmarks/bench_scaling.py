#!/usr/bin/env python
"""Speed-up of `cstoolkit bench` on N GPUs over 1 GPU, same items, same recipe, measured in one go.

    source benchmarks/device_setup.sh && python benchmarks/bench_scaling.py --gpus 2 --out $OUT
    python benchmarks/bench_scaling.py --gpus 2 --items 4 --device cpu --steps 2     # local smoke test

Builds a CSD-100-layout folder of ``--items`` items from examples/ (each example image under several
style words), then runs the same benchmark twice into fresh folders: ``torchrun --nproc-per-node 1``
on one GPU and ``torchrun --nproc-per-node N`` on N GPUs. Reports the wall time of each command and
of its items phase (first unit started to last unit finished, from the units' ``bench.json``), the
speed-ups, and the largest difference between the two runs' scores. Writes ``scaling.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STYLES = ["watercolor", "neon", "pixel_art", "origami", "flat_illustration", "oil_painting", "graffiti", "mosaic"]


def make_data(folder: Path, n: int) -> None:
    images = sorted((ROOT / "examples").glob("*.png"))
    for i in range(n):
        im = images[i % len(images)]
        name = f"{im.stem.replace('_', '-')}+{STYLES[(i // len(images)) % len(STYLES)]}"
        (folder / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(im, folder / name / "00.png")


def run(nproc: int, args: argparse.Namespace, data: Path, out: Path, prompts: Path) -> dict:
    # the same CPU threads per process in both runs: the cores divided by the larger process count
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.gpus)))
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "cstoolkit", "bench", "--data", str(data), "--recipe", str(ROOT / "recipes" / f"{args.recipe}.yaml"),
           "--out", str(out), "--prompts", str(prompts), "--num-images", str(args.num_images),
           "--metrics-preset", "tiny", "--set", "runtime.progress=false", "--set", f"runtime.device={args.device}",
           "--set", f"params.steps={args.steps}", "--set", f"generate.steps={args.sample_steps}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"bench on {nproc} process(es) failed")
    markers = [json.loads(p.read_text()) for p in out.glob("*/*/bench.json")]
    span = max(m["finished"] for m in markers) - min(m["started"] for m in markers)
    rows = {(r["method"], r["item"]): r for r in csv.DictReader((out / "results.csv").open())}
    return {"nproc": nproc, "wall_s": round(wall, 2), "items_phase_s": round(span, 2), "units": len(markers),
            "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--items", type=int, default=12)
    p.add_argument("--recipe", default="unziplora", help="a recipe of recipes/ (tiny preset)")
    p.add_argument("--steps", type=int, default=48, help="params.steps")
    p.add_argument("--sample-steps", type=int, default=20, help="generate.steps")
    p.add_argument("--num-images", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "scaling-out")))
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-scaling"))
    args = p.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    data = args.work / "data"
    make_data(data, args.items)
    prompts = args.work / "prompts.yaml"
    prompts.write_text("content: ['a <c> on the beach', 'a <c> in the snow landscape', 'a <c> in sticker style', "
                       "'a <c> made of gold']\nstyle: ['a dog in <s> style', 'a castle in <s> style', "
                       "'a robot in <s> style', 'a coffee cup in <s> style']\n")
    one = run(1, args, data, args.work / "out-1", prompts)
    print(f"1 process:  wall {one['wall_s']:.1f} s, items phase {one['items_phase_s']:.1f} s ({one['units']} units)")
    many = run(args.gpus, args, data, args.work / f"out-{args.gpus}", prompts)
    print(f"{args.gpus} processes: wall {many['wall_s']:.1f} s, items phase {many['items_phase_s']:.1f} s")
    diffs = [abs(float(one["rows"][k][m]) - float(many["rows"][k][m])) for k in one["rows"]
             for m in ("csd_c", "clip_i", "csd_s", "dino", "clip_t") if one["rows"][k][m] and many["rows"][k][m]]
    result = {"device": args.device, "gpus": args.gpus, "items": args.items, "recipe": args.recipe,
              "steps": args.steps, "sample_steps": args.sample_steps, "num_images": args.num_images,
              "one": {k: v for k, v in one.items() if k != "rows"},
              "many": {k: v for k, v in many.items() if k != "rows"},
              "speedup_wall": round(one["wall_s"] / many["wall_s"], 3),
              "speedup_items_phase": round(one["items_phase_s"] / many["items_phase_s"], 3),
              "max_abs_score_diff": max(diffs) if diffs else None}
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
