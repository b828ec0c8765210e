#!/usr/bin/env bash
# Train the `world` preset of every backbone in parallel on one GPU, then pack the results under $OUT
# (what comes back from the device: <= 8 files of <= 15 MiB each). Run from the repository root:
#   OUT=/some/dir bash world/train_gpu.sh
# Knobs (environment): MINUTES (training budget per backbone, default 6), DEVICE (default cuda),
# EXTRA (more `world train` options, e.g. "--batch 4 --size 64" for a CPU smoke test), WORK (scratch dir),
# HARD_S (training is killed after this many seconds so that packing still happens; default 560),
# BACKBONES (comma-separated subset, default all), INIT_FROM (continue from trained weights: a folder like world/weights, or "shipped"; the tokenizers
# are then loaded frozen; Infinity's BSQ-VAE is not packed again, SDXL's vae/ is: its decoder is repaired, see
# TrainConfig.decoder_repair). Unpack what comes back into world/weights with: bash world/unpack_run.sh FILES_AT
set -euo pipefail
: "${OUT:?set OUT to the folder that comes back}"
MINUTES=${MINUTES:-6}
INIT_FROM=${INIT_FROM:-}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/world-train}
PY=$(command -v "${PYTHON:-python}" || command -v python3); PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"
# Python runs from $WORK: started in the checkout, `-m` would import its cstoolkit/ folder (no world/, no backbones/)
# instead of the installed package
if [ -n "$INIT_FROM" ] && [ -d "$INIT_FROM" ]; then INIT_FROM=$(cd "$INIT_FROM" && pwd); fi
start=$(date +%s)
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true) | tee "$WORK/device.txt"
workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 1 ))
# shellcheck disable=SC2086
(cd "$WORK" && timeout -k 5 "${HARD_S:-560}" "$PY" -m cstoolkit.world.train all --out "$WORK" --minutes "$MINUTES" --device "$DEVICE" --workers "$workers" \
    ${INIT_FROM:+--init-from "$INIT_FROM"} ${BACKBONES:+--backbones "$BACKBONES"} ${EXTRA:-}) 2>&1 | tee "$WORK/all.log" || echo "world train all failed: $?"
echo "wall $(( $(date +%s) - start )) s" | tee -a "$WORK/all.log"
cd "$WORK"
parts=()
for d in sdxl infinity switti; do [ -d "$d" ] && parts+=("$d"); done
# weights + world.json + logs + 64 px grids (the .npz samples stay on the device: too big to come back)
excl=(--exclude='cache_*' --exclude='*.npz')
# continued runs: Infinity's frozen BSQ-VAE is the one already shipped (SDXL's vae/ comes back: decoder repair)
if [ -n "$INIT_FROM" ]; then excl+=(--exclude='infinity/vae.safetensors'); fi
tar cf "$WORK/world.tar" "${excl[@]}" "${parts[@]}" all.log device.txt
if [ "$(stat -c %s "$WORK/world.tar")" -gt 66000000 ]; then  # 64 MiB come back at most: drop the grids
  tar cf "$WORK/world.tar" "${excl[@]}" --exclude='*.png' "${parts[@]}" all.log device.txt
fi
split -b 15M -d "$WORK/world.tar" "$OUT/world.tar.part-"
"$PY" - "$OUT/summary.json" "${parts[@]}" <<'PYEOF'
import json, sys, pathlib
out, names = sys.argv[1], sys.argv[2:]
summary = {}
for n in names:
    p = pathlib.Path(n) / "world.json"
    if p.is_file():
        r = json.loads(p.read_text())
        summary[n] = {"eval": r.get("eval"), "wall_seconds": r.get("wall_seconds"),
                      **{k: r.get(k) for k in ("vae", "unet", "transformer", "vae_decoder_repair", "captions")}}
pathlib.Path(out).write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1)[:6000])
PYEOF
ls -la "$OUT"
