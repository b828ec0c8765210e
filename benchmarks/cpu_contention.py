#!/usr/bin/env python
"""Wall time of a CPU run with and without the start-up CPU tuning, alone and beside busy processes.

    python benchmarks/cpu_contention.py                          # make demo's recipe, 2 repeats
    python benchmarks/cpu_contention.py --steps 40 --repeats 3   # shorter fit

Runs ``cstoolkit run RECIPE --overwrite`` in fresh processes (imports included), each time "before"
(``CSTOOLKIT_CPU_TUNING=off``: torch's defaults, one spinning OpenMP thread per core) and "after" (the
CLI's choice: ``OMP_WAIT_POLICY=PASSIVE`` and the cores left free by the runnable tasks), back to
back and in alternating order, first with no process of ours beside it ("quiet") then beside
``--busy`` processes spinning ``while True: pass`` ("busy"). ``OMP_*``/``MKL_NUM_THREADS`` are removed
from the children's environment (a plain user's shell). Prints every time, the machine's 1-minute
load average before each run (a shared machine's other work is not ours to stop), and the
before/after ratio of the medians; ``--out`` also gets them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CSTOOLKIT_CPU_TUNING")


def run_once(args: argparse.Namespace, tuned: bool, out_dir: Path) -> float:
    """Seconds of one ``cstoolkit run`` in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    if not tuned:
        env["CSTOOLKIT_CPU_TUNING"] = "off"
    cmd = [sys.executable, "-m", "cstoolkit", "run", str(args.recipe), "--overwrite",
           "--set", f"runtime.output_dir={out_dir}", "--set", "runtime.checkpoint_every=0"]
    if args.steps is not None:
        cmd += ["--set", f"params.steps={args.steps}"]
    if args.gen_steps is not None:
        cmd += ["--set", f"generate.steps={args.gen_steps}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cstoolkit run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def start_busy(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(1.0)  # runnable before the measured run starts
    return procs


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "unziplora.yaml")
    parser.add_argument("--steps", type=int, default=None, help="params.steps (default: the recipe's)")
    parser.add_argument("--gen-steps", type=int, default=None, help="generate.steps (default: the recipe's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the run in the 'busy' scenario")
    parser.add_argument("--scenarios", default="quiet,busy", help="comma-separated: quiet, busy")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="cstoolkit-cpu-") as tmp:
        for scenario in args.scenarios.split(","):
            for r in range(args.repeats):
                order = (False, True) if r % 2 == 0 else (True, False)
                for tuned in order:
                    busy = start_busy(args.busy) if scenario == "busy" else []
                    try:
                        load = os.getloadavg()[0]
                        seconds = run_once(args, tuned, Path(tmp) / "run")
                    finally:
                        stop_busy(busy)
                    row = {"scenario": scenario, "repeat": r, "policy": "after" if tuned else "before",
                           "seconds": round(seconds, 1), "load1_before_run": round(load, 2)}
                    rows.append(row)
                    print(f"{scenario:5s} repeat {r} {row['policy']:6s} {seconds:7.1f} s   (load average {load:.2f})",
                          flush=True)
    summary = {}
    for scenario in args.scenarios.split(","):
        med = {p: statistics.median(x["seconds"] for x in rows if x["scenario"] == scenario and x["policy"] == p)
               for p in ("before", "after")}
        summary[scenario] = {"before_median_s": med["before"], "after_median_s": med["after"],
                             "before_over_after": round(med["before"] / med["after"], 2)}
        print(f"{scenario}: before {med['before']:.1f} s, after {med['after']:.1f} s, "
              f"before/after = {med['before'] / med['after']:.2f}")
    result = {"recipe": str(args.recipe), "steps": args.steps, "gen_steps": args.gen_steps, "busy": args.busy,
              "cpus": os.cpu_count(), "rows": rows, "summary": summary}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
