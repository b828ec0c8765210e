"""How long a second process takes to compile the SDXL training step with the first one's on-disk cache.

    python benchmarks/compile_cache.py --out $OUT                    # GPU: UnZipLoRA's step, sdxl-base, 1024², bf16
    python benchmarks/compile_cache.py --step frozen --out $OUT      # the frozen UNet forward + backward
    python benchmarks/compile_cache.py --tiny --out /tmp/cc          # CPU smoke test (tiny preset, 128²)

Starts this script twice as a child (``--child``), each in a fresh process, on one compile cache folder
(``--cache-dir``, emptied first, given to the children as ``TORCHINDUCTOR_CACHE_DIR``): the first child
compiles with an empty cache (cold), the second with what the first left on disk (warm: Inductor's FX graph
cache and AOTAutograd's cache; Dynamo traces again). Each child builds the backbone with random weights and
the step as ``benchmarks/sdxl_step.py`` does (``unziplora``: UnZipLoRA's masked training step after its
warm-up; ``frozen``: the frozen UNet's forward + backward into the input latents), then

* (first child only, unless ``--eager-in both``) the step eagerly, replayed as a CUDA graph on CUDA: the
  step before issue 22 (with ``--autocast on``) or without autocast (default);
* the step with the UNet under ``torch.compile`` (:class:`cstoolkit.compile.CompiledForward`), replayed as
  a CUDA graph on CUDA: its first call is the compile (seconds, cache state, FX / AOTAutograd cache hits and
  misses), then warm-up past the capture and ``--repeats`` timings of ``--iters`` steps.

Writes ``<out>/compile_cache.json`` (both children: process wall time, build seconds, compile record, step
timings: median and min-max of the repeats) and ``<out>/compile_cache_<cold|warm>.log``, and prints a table.
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

T_START = time.perf_counter()
HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> int:
    """Build, time the eager (graphed) step if asked, compile and time the compiled step; write JSON."""
    import torch

    sys.path.insert(0, str(HERE))
    import sdxl_step

    record: dict = {"label": args.label, "device": "cpu", "torch": torch.__version__}
    if torch.cuda.is_available() and args.device == "cuda":
        record["device"] = torch.cuda.get_device_name()
    torch.backends.cuda.matmul.allow_tf32 = True
    ctx = sdxl_step.Context(args)
    record["build_s"] = round(ctx.build_s, 2)
    record["autocast"] = ctx.use_autocast
    builder = {"unziplora": sdxl_step._unziplora, "frozen": sdxl_step._frozen}[args.step]
    cuda = ctx.device.type == "cuda"
    if args.eager_in == "both" or (args.eager_in == "first" and args.label == "cold"):
        ctx.graph, ctx.compiled = cuda, False
        step, cleanup, _ = builder(ctx)
        record["eager_graphed" if cuda else "eager"] = sdxl_step._record(*sdxl_step.measure(ctx, step))
        del step
        cleanup()
        sdxl_step._free(ctx)
    ctx.graph, ctx.compiled = cuda, True
    compiles: dict[str, list[dict]] = {}
    with sdxl_step.compiled_row(ctx, args.step, compiles):
        step, cleanup, _ = builder(ctx)
        times, peak = sdxl_step.measure(ctx, step)
        record["compiled_graphed" if cuda else "compiled"] = sdxl_step._record(times, peak)
        del step
        cleanup()
    record["compile"] = compiles.get(args.step, [])
    record["process_s"] = round(time.perf_counter() - T_START, 2)  # this script's start to its end, in the child
    Path(args.child_json).write_text(json.dumps(record, indent=2))
    return 0


def forwarded(args: argparse.Namespace) -> list[str]:
    """The options a child gets (those of :func:`sdxl_step.Context` and the measurement)."""
    out = ["--preset", args.preset, "--resolution", str(args.resolution), "--device", args.device,
           "--dtype", args.dtype, "--rank", str(args.rank), "--warmup", str(args.warmup), "--iters", str(args.iters),
           "--repeats", str(args.repeats), "--step", args.step, "--autocast", args.autocast,
           "--compile-backend", args.compile_backend, "--eager-in", args.eager_in]
    return out


def parent(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir or work / "compile_cache").resolve()
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cache_dir": str(cache), "runs": []}
    for label in ("cold", "warm"):
        child_json = work / f"compile_cache_{label}.json"
        child_json.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--label", label, "--child-json",
               str(child_json), *forwarded(args)]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        files_before = sum(len(f) for _, _, f in os.walk(cache))
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
        wall = time.perf_counter() - t0
        (args.out / f"compile_cache_{label}.log").write_text((proc.stdout + proc.stderr)[-200_000:])
        run = {"label": label, "returncode": proc.returncode, "process_wall_s": round(wall, 2),
               "cache_files_before": files_before, "cache_files_after": sum(len(f) for _, _, f in os.walk(cache))}
        if child_json.is_file():
            run.update(json.loads(child_json.read_text()))
        else:
            print((proc.stdout + proc.stderr)[-4000:], flush=True)
        summary["runs"].append(run)
        (args.out / "compile_cache.json").write_text(json.dumps(summary, indent=2))
        print(describe(run), flush=True)
    return 0 if all(r["returncode"] == 0 for r in summary["runs"]) else 1


def describe(run: dict) -> str:
    lines = [f"== {run['label']}: process {run['process_wall_s']:.1f} s (rc {run['returncode']}), build "
             f"{run.get('build_s', float('nan')):.1f} s, cache files {run['cache_files_before']} -> "
             f"{run['cache_files_after']}, device {run.get('device')}, autocast {run.get('autocast')}"]
    for rec in run.get("compile", []):
        lines.append(f"   compile: {rec['seconds']:.1f} s, {rec['cache']} cache (FX {rec['fx_hits']} hits / "
                     f"{rec['fx_misses']} misses, AOTAutograd {rec['aot_hits']} / {rec['aot_misses']})"
                     + (f" FAILED: {rec['failed']}" if rec.get("failed") else ""))
    for key in ("eager_graphed", "eager", "compiled_graphed", "compiled"):
        if key in run:
            r = run[key]
            lines.append(f"   {key:<17} {r['s_per_step']:.4f} s/step [{r['min']:.4f}-{r['max']:.4f}] over "
                         f"{len(r['repeats'])} repeats, peak {r['peak_gib']:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/compile_cache_out")))
    p.add_argument("--work", default="/tmp/compile_cache_work", help="the children's JSON and the default cache")
    p.add_argument("--cache-dir", default=None, help="compile cache of both children (emptied first; default "
                                                     "<work>/compile_cache)")
    p.add_argument("--step", choices=["unziplora", "frozen"], default="unziplora")
    p.add_argument("--preset", default="sdxl-base")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--autocast", choices=["auto", "on"], default="auto")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--eager-in", choices=["first", "both", "none"], default="first",
                   help="which child also times the step without compile")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny preset, 128², 2 steps x 3, fp32")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="cold", help=argparse.SUPPRESS)
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.device, args.resolution, args.iters, args.warmup = "tiny", "cpu", 128, 2, 1
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        args.dtype = "fp32"
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (median and min-max of the repeats are reported)")
    if args.child:
        args.cache_dir = None  # the parent's TORCHINDUCTOR_CACHE_DIR is the cache
        return child(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
