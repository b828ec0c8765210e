#!/usr/bin/env python
"""Tables from the finished units of a `world bench` that was stopped (its bench.json files, what
world/bench_gpu.sh brings back from a killed bench): per method and kind, with the bench's own intervals.

    python benchmarks/world_device/collect_units.py UNITS_DIR [--out results.json]

UNITS_DIR holds RECIPE/ITEM/bench.json (RECIPE e.g. dreambooth_lora-switti). Only units marked done count;
the table says how many items each row has, so a partial run is never read as a full one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cstoolkit.world.bench import KINDS, summarise, table_markdown


def collect(folder: Path) -> tuple[list[dict], list[str], list[str]]:
    rows, methods = [], []
    for marker in sorted(folder.glob("*/*/bench.json")):
        done = json.loads(marker.read_text())
        if done.get("status") != "done":
            continue
        row = done["row"]
        rows.append(row)
        if row["method"] not in methods:
            methods.append(row["method"])
    kinds = [k for k in KINDS if any(r.get("kind", "held_out_pair") == k for r in rows)]
    return rows, methods, kinds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, default=None, help="also write {methods, per_kind, rows} here as JSON")
    args = p.parse_args()
    rows, methods, kinds = collect(args.folder)
    if not rows:
        raise SystemExit(f"{args.folder}: no finished unit (expected RECIPE/ITEM/bench.json files marked done)")
    per_kind = summarise(rows, methods, kinds)
    print(table_markdown(per_kind))
    if args.out:
        args.out.write_text(json.dumps({"settings": {"source": "finished units of a stopped bench", "units": len(rows)},
                                        "methods": summarise(rows, methods), "per_kind": per_kind,
                                        "rows": [{k: v for k, v in r.items()
                                                  if isinstance(v, (int, float, str, type(None)))} for r in rows]},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
