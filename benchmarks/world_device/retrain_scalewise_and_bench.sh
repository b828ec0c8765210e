#!/usr/bin/env bash
# device call A: continue Infinity + Switti with caption augmentation, evaluate the shipped weights alongside,
# then bench the scale-wise embedding methods on whichever weights won (untracked helper, not shipped).
# Knobs: TOTAL (seconds for the call), MINUTES / HARD_S (training), BACKBONES (default infinity,switti; one at a time
# fits an 80 GB H100 with room to spare), PROCS (bench processes), BENCH (0: no bench), VAE_GROUPS (e.g. "8 16": beside
# the training, the world SDXL VAE rebuilt with that many GroupNorm groups, `world train sdxl --repair-decoder-only
# --vae-groups G`, for VAE_MINUTES; VAE_REINIT=1: its decoder from fresh weights; needs world/weights/sdxl/ in the
# tree: `untrack.sh sdxl+switti`)
set -uo pipefail
T0=$(date +%s)
mkdir -p world/weights/sdxl/unet world/weights/sdxl/vae world/weights/infinity world/weights/switti
source benchmarks/device_setup.sh
python3 -P -c "import cstoolkit.world.train, open_clip, torch; print('ok', torch.cuda.get_device_name())" || exit 3
( cd /tmp && python3 -P -m cstoolkit.world.train all --out /tmp/base --minutes 0.002 --init-from shipped --backbones ${BACKBONES:-infinity,switti} --images-per-pair 8 --workers 2 --device cuda > /tmp/base.log 2>&1 )
# (before the training, not beside it: on an 80 GB H100 a third process on the card ran Switti's training out of memory)
# at most 8 files come back: the weights parts go to $OUT, the small files into one $OUT/meta.tar
M=/tmp/meta; mkdir -p $M
pack() { tar cf $OUT/meta.tar -C $M .; }
source benchmarks/world_device/vae_rebuilds.sh; start_vae_rebuilds 4  # beside the training
OUT=$M MINUTES=${MINUTES:-5} HARD_S=${HARD_S:-400} INIT_FROM=shipped BACKBONES=${BACKBONES:-infinity,switti} bash world/train_gpu.sh > $M/train.log 2>&1
mv $M/world.tar.part-* $OUT/ 2>/dev/null
tail -5 /tmp/base.log > $M/base.log; for b in infinity switti; do cp /tmp/base/$b/world.json $M/base-$b.json 2>/dev/null; done
wait  # the VAE regroups
for G in ${VAE_GROUPS:-}; do mkdir -p $M/vae-g$G; cp /tmp/vae-g$G.log $M/; cp -r /tmp/vae-g$G/sdxl/vae /tmp/vae-g$G/sdxl/world.json $M/vae-g$G/; done
[ -n "${VAE_GROUPS:-}" ] && python3 -P benchmarks/world_device/vae_gate.py /tmp/vae-g*/sdxl/vae --pick /tmp/vae_pick.txt \
  > $M/vae_gate.json 2> $M/vae_gate.err  # the dot gone, PSNR kept? /tmp/vae_pick.txt is read by bench_sdxl.sh
pack
python3 - <<'PY' > $M/gate.txt
import json, os, pathlib
sel = pathlib.Path("/tmp/wsel"); sel.mkdir(exist_ok=True)
def best(p):
    e = json.loads(pathlib.Path(p).read_text())["eval"]
    accs = [v["accuracy"]["held_out"] for k, v in e.items() if k.startswith("cfg")]
    return max(accs, key=lambda a: a["content"] + a["style"])
for b in ("infinity", "switti"):
    new, base = f"/tmp/world-train/{b}/world.json", f"/tmp/base/{b}/world.json"
    try:
        n, o = best(new), best(base)
        ok = n["content"] >= o["content"] - 0.05 and n["style"] >= o["style"] - 0.05
    except Exception as exc:
        print(b, "gate error", exc); ok = False; n = o = None
    src = f"/tmp/world-train/{b}" if ok else f"{os.getcwd()}/world/weights/{b}"
    if ok and not pathlib.Path(src, "vae.safetensors").exists() and b == "infinity":
        os.symlink(f"{os.getcwd()}/world/weights/infinity/vae.safetensors", f"{src}/vae.safetensors")
    os.symlink(src, sel / b)
    print(b, "new" if ok else "shipped", "new", n, "base", o)
PY
cat $M/gate.txt; pack
export CSTOOLKIT_WORLD_WEIGHTS=/tmp/wsel
LEFT=$(( ${TOTAL:-600} - ($(date +%s) - T0) - 130 ))  # bench_gpu.sh GRACE 90 s + packing
[ "$LEFT" -lt 40 ] || [ "${BENCH:-1}" = 0 ] && { echo "no bench (time left $LEFT s, BENCH=${BENCH:-1})"; exit 0; }
echo "bench time limit $LEFT s"
if ! grep -q " new new" $M/gate.txt; then  # no new weights: a rerun of the last CSD-VAR/TI bench would add nothing
  echo "shipped weights kept on both backbones: the LoRA / ablation bench instead"
  exec env TOTAL=$(( ${TOTAL:-600} - ($(date +%s) - T0) )) bash benchmarks/world_device/bench_scalewise.sh
fi
S="--set csd_var-switti:params.steps=151 --set csd_var-infinity:params.steps=151 --set textual_inversion-switti:params.steps=151 --set textual_inversion-infinity:params.steps=151"
OUT=$OUT/b PROCS=${PROCS:-10} TIME_LIMIT=$LEFT bash world/bench_gpu.sh \
  scalewise "--methods csd_var,textual_inversion --backbones switti,infinity --kinds all --items 10 $S" 2>&1 | tail -40
