#!/usr/bin/env bash
# Several `cstoolkit world bench` commands side by side on one GPU machine, each sharded over PROCS processes
# (torchrun; processes on one GPU share it), all stopping new units after TIME_LIMIT seconds, then their tables
# packed under $OUT (what comes back from a remote device: a few files of <= 15 MiB).
# Run from the repository root, with cstoolkit installed:
#   OUT=out PROCS=4 TIME_LIMIT=420 bash world/bench_gpu.sh \
#       scalewise "--methods csd_var,textual_inversion --backbones switti,infinity --kinds all --items 10" \
#       ablation  "--methods csd_var --backbones switti --kinds novel_content --set params.kv_memory=false"
# Knobs (environment): PROCS (processes per bench, default 4), TIME_LIMIT (seconds, default 420; `--time-limit`), GRACE
# (seconds after TIME_LIMIT before a bench with units still in flight is killed, default 90; its finished units'
# bench.json files come back instead of results.json),
# DEVICE (default cuda), WORK (scratch folder, default /tmp/world-bench; a rerun with the same WORK skips
# finished units). Per bench NAME comes back: NAME/results.json, table.md, plot.png, NAME.log (tail) and a
# half-size JPEG of the sample grid of the first item of every kind for every method (NAME/grids/).
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
PROCS=${PROCS:-4}
TIME_LIMIT=${TIME_LIMIT:-420}
GRACE=${GRACE:-90}  # a bench still running GRACE s after TIME_LIMIT (units in flight) is killed; its finished units come back
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/world-bench}
PY=$(command -v "${PYTHON:-python}" || command -v python3)
mkdir -p "$WORK" "$OUT"
export CSTOOLKIT_RECIPES=${CSTOOLKIT_RECIPES:-$PWD/recipes}  # the benches run from $WORK (below)
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true) | tee "$WORK/device.txt"
names=()
start=$(date +%s)
# every 15 s: GPU utilisation and memory, the 1-minute load average (is the card or the CPU the limit?)
( while sleep 15; do
    echo "$(( $(date +%s) - start )) s | $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null | head -1) | load $(cut -d' ' -f1 /proc/loadavg)"
  done > "$WORK/util.txt" ) &
monitor=$!
while [ $# -ge 2 ]; do
  name=$1; args=$2; shift 2
  names+=("$name")
  # shellcheck disable=SC2086
  # from $WORK: started in the checkout, `-m cstoolkit` would import its cstoolkit/ folder, not the installed package
  ( cd "$WORK" && OMP_NUM_THREADS=1 timeout -k 10 "$(( TIME_LIMIT + GRACE ))" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$PROCS" -m cstoolkit world bench \
      $args --out "$WORK/$name" --time-limit "$TIME_LIMIT" --device "$DEVICE" > "$WORK/$name.log" 2>&1
    echo "exit $? after $(( $(date +%s) - start )) s" >> "$WORK/$name.log" ) &
done
for p in $(jobs -p); do [ "$p" = "$monitor" ] || wait "$p"; done
kill "$monitor" 2>/dev/null
echo "wall $(( $(date +%s) - start )) s" | tee "$WORK/wall.txt"
"$PY" - "$WORK" "${names[@]}" <<'PYEOF'
import json, sys, pathlib
from PIL import Image
work, names = pathlib.Path(sys.argv[1]), sys.argv[2:]
for n in names:
    root = work / n
    res = root / "results.json"
    if not res.is_file():
        print(f"{n}: no results.json"); continue
    r = json.loads(res.read_text())
    first = {}
    for row in r["rows"]:
        first.setdefault((row["method"], row.get("kind", "held_out_pair")), row["item"])
    (root / "grids").mkdir(exist_ok=True)
    for (method, kind), item in first.items():
        g = root / method / item / "grid.png"
        if g.is_file():
            im = Image.open(g).convert("RGB")
            im.resize((im.width // 2, im.height // 2), Image.LANCZOS).save(root / "grids" / f"{method}--{item}.jpg", quality=85)
    s = r["settings"]
    print(f"{n}: {s['units_reported']} of {s['units']} units, {s['wall_seconds']} s")
PYEOF
cd "$WORK"
files=(device.txt wall.txt util.txt)
for n in "${names[@]}"; do
  tail -c 20000 "$n.log" > "$n.tail.log"; files+=("$n.tail.log")
  for f in results.json table.md plot.png grids; do [ -e "$n/$f" ] && files+=("$n/$f"); done
  [ -e "$n/results.json" ] || while IFS= read -r f; do files+=("$f"); done < <(find "$n" -name bench.json 2>/dev/null)  # killed: its units
done
tar cf "$WORK/bench.tar" "${files[@]}"
split -b 15M -d "$WORK/bench.tar" "$OUT/bench.tar.part-"
for n in "${names[@]}"; do [ -f "$n/table.md" ] && { echo "== $n"; cat "$n/table.md"; }; done
ls -la "$OUT"
