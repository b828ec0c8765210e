#!/usr/bin/env bash
# device call B: the rest of the scale-wise bench: LoRA methods, style_share, CSD-VAR ablations (untracked helper)
set -uo pipefail
T0=$(date +%s)
mkdir -p world/weights/sdxl/unet world/weights/sdxl/vae
source benchmarks/device_setup.sh
python3 -P -c "import cstoolkit.world, open_clip, torch; print('ok', torch.cuda.get_device_name())" || exit 3
[ -d /tmp/wsel ] && { export CSTOOLKIT_WORLD_WEIGHTS=/tmp/wsel; echo "weights: /tmp/wsel (call A on this machine)"; ls -la /tmp/wsel; }
LEFT=$(( ${TOTAL:-600} - ($(date +%s) - T0) - 130 ))  # TOTAL: seconds for the whole call (GRACE 90 s + packing)
L="--set dreambooth_lora-switti:params.steps=200 --set dreambooth_lora-infinity:params.steps=200 --set unziplora-switti:params.steps=200 --set unziplora-infinity:params.steps=200"
A="--methods csd_var --backbones switti,infinity --kinds held_out_pair,novel_content --items 10 --set params.steps=151"
OUT=$OUT PROCS=${PROCS:-4} TIME_LIMIT=$LEFT bash world/bench_gpu.sh \
  lora "--methods dreambooth_lora,unziplora,style_share --backbones switti,infinity --kinds all --items 10 $L" \
  no_kv "$A --set params.kv_memory=false" \
  no_svd "$A --set params.svd=false" \
  no_alt "$A --set params.alternating=false" 2>&1 | tail -60
