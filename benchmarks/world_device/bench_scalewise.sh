#!/usr/bin/env bash
# device call B: the rest of the scale-wise bench: LoRA methods and style_share (METHODS), CSD-VAR ablations with
# ABLATIONS=1 (untracked helper); TOTAL: seconds for the call (default 600)
set -uo pipefail
T0=$(date +%s)
mkdir -p world/weights/sdxl/unet world/weights/sdxl/vae
source benchmarks/device_setup.sh
python3 -P -c "import cstoolkit.world, open_clip, torch; print('ok', torch.cuda.get_device_name())" || exit 3
[ -d /tmp/wsel ] && { export CSTOOLKIT_WORLD_WEIGHTS=/tmp/wsel; echo "weights: /tmp/wsel (call A on this machine)"; ls -la /tmp/wsel; }
LEFT=$(( ${TOTAL:-600} - ($(date +%s) - T0) - 130 ))  # TOTAL: seconds for the whole call (GRACE 90 s + packing)
METHODS=${METHODS:-unziplora,style_share,break_for_make}
L=""  # GPU settings: 200 steps a LoRA stage (the recipes' CPU demo settings are 20-30), 50 merge / make steps
for m in ${METHODS//,/ }; do for b in switti infinity; do case $m in
  unziplora|dreambooth_lora) L+=" --set $m-$b:params.steps=200";;
  break_for_make) L+=" --set $m-$b:params.steps=200 --set $m-$b:params.make_steps=50";;
  ziplora) L+=" --set $m-$b:params.lora_steps=200 --set $m-$b:params.steps=50";;
esac; done; done
# METHODS: the scale-wise methods not yet benched on the GPU on every item (CSD-VAR, textual inversion and the CSD-VAR
# ablations were: docs/world.md); the units interleave items, so a time-limited run gives every method some items
A="--methods csd_var --backbones switti,infinity --kinds held_out_pair,novel_content --items 10 --set params.steps=151"
if [ "${ABLATIONS:-0}" = 1 ]; then
  extra=(no_kv "$A --set params.kv_memory=false" no_svd "$A --set params.svd=false" no_alt "$A --set params.alternating=false")
else extra=(); fi
OUT=$OUT PROCS=${PROCS:-16} TIME_LIMIT=$LEFT bash world/bench_gpu.sh \
  lora "--methods $METHODS --backbones switti,infinity --kinds all --items 10 $L" \
  "${extra[@]}" 2>&1 | tail -60
