"""Time to a decomposition: the real user path (``cstoolkit run``) with its phase breakdown and GPU memory.

    python3 benchmarks/run_phases.py --out $OUT                  # GPU: full SDXL, 1024², bf16, rank 64
    python3 benchmarks/run_phases.py --out $OUT --methods unziplora --compile on --cache-runs cold warm
    python3 benchmarks/run_phases.py --tiny --out /tmp/phases    # CPU smoke test (tiny SDXL, few steps)

For each of ``recipes/unziplora.yaml`` and ``recipes/break_for_make.yaml`` it runs ``cstoolkit run`` in
a fresh process (imports, CUDA start-up and all) with the paper's settings (rank 64, UnZipLoRA 600 steps
with t = 200 and 5 warm-up steps; Break-for-Make ``--bfm-steps`` per stage and 50 make steps), bf16,
1024², the recipes' 6 samples (3 uses x 2 images, 20 denoising steps), no checkpoints, and reads the
run's ``phases.json``: seconds, peak allocated and peak reserved CUDA memory per phase. Weights:
``--weights local`` (default) first writes the full-size SDXL with random weights to a local diffusers
folder and runs from it (``backbone.pretrained``: the "weights already on local disk" case);
``--weights random`` builds them in the run (``backbone.preset: sdxl-base-random``). Random weights:
speed and memory only.

``--compile on|off|auto`` sets ``runtime.compile`` (default: the recipe's, ``auto``); the compile cache of
the runs is ``--cache-dir`` (default ``<work>/compile_cache``, given to each run as
``TORCHINDUCTOR_CACHE_DIR``). ``--cache-runs cold warm`` runs each method twice: first with the cache folder
emptied (a machine's first run: the cold compile), then again with what the first run left there (every
later run: a warm cache); the run's ``phases.json`` holds the ``.../compile`` phase and a ``compile`` record
(seconds, cold or warm, cache hits and misses).

Each run is a fresh ``python -P`` process started outside the checkout, so it imports the installed
cstoolkit (``pip install -e .`` or benchmarks/device_setup.sh), not the checkout's ``cstoolkit/`` folder
from the current directory, whose plugins a plain import would not find.

Writes ``<out>/run_phases.json`` (summary), ``<out>/<method>[_<cold|warm>]_phases.json`` (each run's
record) and ``<out>/<method>[_<cold|warm>].log`` (the run's console, tail), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def paper_overrides(method: str, args: argparse.Namespace) -> list[str]:
    """``--set`` values for the paper's settings (the shipped recipes are tiny CPU demos)."""
    if args.tiny:
        common = ["runtime.device=cpu", "runtime.mixed_precision='no'", "generate.steps=2", "generate.num_images=2"]
        if method == "unziplora":
            return common + ["params.rank=4", "params.steps=6", "params.warmup_steps=2", "params.recalibrate_every=2"]
        return common + ["params.rank=4", "params.steps=2", "params.make_steps=2"]
    common = ["runtime.mixed_precision=bf16", "runtime.device=cuda", "generate.steps=20", "generate.num_images=2"]
    if method == "unziplora":  # Sec. 4.1: rank 64, lr 5e-5, 600 steps, t = 200, N = 30 %, λ = 0.5, 5 warm-up steps
        return common + ["params.rank=64", "params.lr=5.0e-5", "params.merger_lr=5.0e-3", "params.steps=600",
                         "params.warmup_steps=5", "params.recalibrate_every=200"]
    return common + ["params.rank=64", "params.lr=1.0e-4", f"params.steps={args.bfm_steps}", "params.make_steps=50"]


def write_local_weights(folder: Path, tiny: bool) -> float:
    """Save the preset's weights (random) as a diffusers folder; returns the seconds it took."""
    import torch

    from cstoolkit.backbones.sdxl import build_pipeline

    t0 = time.perf_counter()
    if tiny:
        pipe = build_pipeline("tiny")
    else:
        pipe = build_pipeline("sdxl-base-random", device="cuda", dtype=torch.bfloat16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def child_command(recipe: Path, sets: list[str]) -> list[str]:
    """The ``cstoolkit run`` command line of a run: this Python with ``-P`` (3.11+: no current directory on
    ``sys.path``), so the installed package is imported wherever the run starts."""
    cli = "import sys; from cstoolkit.cli import main; sys.exit(main())"  # the `cstoolkit` command
    isolate = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [sys.executable, *isolate, "-c", cli, "run", str(recipe), "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_one(method: str, args: argparse.Namespace, backbone: list[str], out: Path, cache: str = "") -> dict:
    """One ``cstoolkit run`` of ``method``; ``cache``: ``cold`` empties the compile cache first, ``warm``
    keeps it (the name also tags the output files)."""
    tag = f"{method}_{cache}" if cache else method
    run_dir = Path(args.work) / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    compile_sets = [f"runtime.compile={args.compile}"] if args.compile else []
    sets = backbone + paper_overrides(method, args) + compile_sets + [
        "runtime.checkpoint_every=0", "runtime.progress=false", f"runtime.output_dir={run_dir}"]
    cache_dir = Path(args.cache_dir or Path(args.work) / "compile_cache").resolve()
    if cache == "cold":
        shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files_before = sum(len(f) for _, _, f in os.walk(cache_dir))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    cmd = child_command(ROOT / "recipes" / f"{method}.yaml", sets)
    print("$", " ".join(cmd), f"(cwd {args.work}, TORCHINDUCTOR_CACHE_DIR={cache_dir})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=args.work, env=env)
    wall = time.perf_counter() - t0
    log = (proc.stdout + proc.stderr)[-200_000:]
    (out / f"{tag}.log").write_text(log)
    result: dict = {"method": method, "cache": cache or None, "returncode": proc.returncode, "wall_s": round(wall, 2),
                    "overrides": sets, "cache_dir": str(cache_dir), "cache_files_before": files_before,
                    "cache_files_after": sum(len(f) for _, _, f in os.walk(cache_dir))}
    phases_file = run_dir / "phases.json"
    if phases_file.is_file():
        phases = json.loads(phases_file.read_text())
        shutil.copy(phases_file, out / f"{tag}_phases.json")
        result["compile"] = phases.get("compile", [])
        result["phases"] = phases["phases"]
        result["in_process_total_s"] = phases["total_s"]
        reserved = [p.get("peak_reserved_gib", 0.0) for p in phases["phases"]]
        result["max_peak_reserved_gib"] = max(reserved) if reserved else None
        result["max_peak_allocated_gib"] = max((p.get("peak_allocated_gib", 0.0) for p in phases["phases"]),
                                               default=None)
    if proc.returncode != 0:
        print(log[-4000:], flush=True)
    return result


def table(result: dict) -> str:
    cache = f" ({result['cache']} compile cache)" if result.get("cache") else ""
    lines = [f"== {result['method']}{cache}: wall {result['wall_s']:.1f} s (process), rc {result['returncode']}, "
             f"in-process {result.get('in_process_total_s', float('nan')):.1f} s, max reserved "
             f"{result.get('max_peak_reserved_gib')} GiB, max allocated {result.get('max_peak_allocated_gib')} GiB"]
    agg: dict[str, dict] = {}
    for p in result.get("phases", []):
        a = agg.setdefault(p["phase"], {"n": 0, "s": 0.0, "alloc": 0.0, "res": 0.0, "end": 0.0, "depth": p["depth"]})
        a["n"] += 1
        a["s"] += p["seconds"]
        a["alloc"] = max(a["alloc"], p.get("peak_allocated_gib", 0.0))
        a["res"] = max(a["res"], p.get("peak_reserved_gib", 0.0))
        a["end"] = p.get("end_reserved_gib", 0.0)
    for rec in result.get("compile", []):
        lines.append(f"   compile {rec['label']}: {rec['seconds']:.1f} s, {rec['cache']} cache "
                     f"(FX {rec['fx_hits']} hits / {rec['fx_misses']} misses, AOT {rec['aot_hits']} / "
                     f"{rec['aot_misses']}){' FAILED: ' + rec['failed'] if rec.get('failed') else ''}")
    lines.append(f"   {'phase':<28} {'n':>3} {'seconds':>8} {'peak alloc':>11} {'peak resv':>10} {'resv at end':>12}")
    for name, a in agg.items():
        lines.append(f"   {'  ' * a['depth'] + name:<28} {a['n']:>3} {a['s']:>8.2f} {a['alloc']:>11.2f} "
                     f"{a['res']:>10.2f} {a['end']:>12.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/run_phases_out")))
    p.add_argument("--work", default="/tmp/run_phases", help="run folders and the local weights (not copied back)")
    p.add_argument("--weights", choices=["local", "random"], default="local")
    p.add_argument("--methods", nargs="+", default=["unziplora", "break_for_make"])
    p.add_argument("--bfm-steps", type=int, default=200, help="Break-for-Make steps per stage (official code: 1000)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny preset")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="runtime.compile of the runs (default: the recipe's)")
    p.add_argument("--cache-dir", default=None, help="compile cache of the runs (default <work>/compile_cache)")
    p.add_argument("--cache-runs", nargs="+", choices=["cold", "warm"], default=None,
                   help="run each method once per entry: cold empties the compile cache first, warm keeps it")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = str(Path(args.work).resolve())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        summary["torch"] = torch.__version__
        print(f"device {summary['device']}, torch {summary['torch']}", flush=True)
    except Exception as exc:  # pragma: no cover - informative only
        summary["device"] = repr(exc)
    backbone = ["backbone.preset=tiny"] if args.tiny else ["backbone.preset=sdxl-base-random"]
    if args.weights == "local":
        folder = Path(args.work) / "sdxl-weights"
        try:
            if not (folder / "model_index.json").is_file():
                summary["write_local_weights_s"] = round(write_local_weights(folder, args.tiny), 2)
                print(f"local weights written to {folder} in {summary['write_local_weights_s']} s", flush=True)
            backbone = [f"backbone.pretrained={folder}"]
        except Exception as exc:  # keep the measurement: fall back to weights built in the run
            print(f"could not write local weights ({exc!r}); building random weights in each run", flush=True)
            summary["local_weights_error"] = repr(exc)
    for method in args.methods:
        for cache in args.cache_runs or [""]:
            result = run_one(method, args, backbone, args.out, cache)
            summary["runs"].append(result)
            print(table(result), flush=True)
            (args.out / "run_phases.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(r["returncode"] == 0 for r in summary["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
