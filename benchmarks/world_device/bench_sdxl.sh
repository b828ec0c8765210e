#!/usr/bin/env bash
# device call C: the SDXL half of the world bench (untracked helper); TOTAL: seconds for the call (default 600);
# VAE_GROUPS=16 [VAE_REINIT=1 VAE_MINUTES=6]: beside the bench, the VAE rebuilt, gated by vae_gate.py, back in vae.tar
set -uo pipefail
T0=$(date +%s)
mkdir -p world/weights/infinity world/weights/switti/transformer world/weights/switti/vqvae
source benchmarks/device_setup.sh
python3 -P -c "import cstoolkit.world, diffusers, torch; print('ok', torch.cuda.get_device_name())" || exit 3
if [ -s /tmp/vae_pick.txt ]; then  # a rebuilt VAE that passed vae_gate.py in the call before, on this machine
  mkdir -p /tmp/wsdxl/sdxl; ln -sfn "$PWD/world/weights/sdxl/unet" /tmp/wsdxl/sdxl/unet; ln -sfn "$(cat /tmp/vae_pick.txt)" /tmp/wsdxl/sdxl/vae
  export CSTOOLKIT_WORLD_WEIGHTS=/tmp/wsdxl; echo "VAE: $(cat /tmp/vae_pick.txt)"
fi
source benchmarks/world_device/vae_rebuilds.sh; start_vae_rebuilds 6  # beside the bench
LEFT=$(( ${TOTAL:-600} - ($(date +%s) - T0) - 130 ))  # bench_gpu.sh GRACE 90 s + packing
S="--set unziplora:params.steps=200 --set dreambooth_lora:params.steps=200 --set textual_inversion-sdxl:params.steps=200 --set b_lora:params.steps=200 --set ziplora:params.lora_steps=200 --set ziplora:params.steps=50 --set break_for_make:params.steps=200 --set break_for_make:params.make_steps=50"
OUT=$OUT PROCS=${PROCS:-12} TIME_LIMIT=$LEFT bash world/bench_gpu.sh \
  sdxl "--methods unziplora,dreambooth_lora,textual_inversion,b_lora,ziplora,break_for_make --backbones sdxl --kinds all --items 10 $S" 2>&1 | tail -60
wait  # the VAE rebuilds
if [ -n "${VAE_GROUPS:-}" ]; then
  python3 -P benchmarks/world_device/vae_gate.py /tmp/vae-g*/sdxl/vae > /tmp/vae_gate.json 2> /tmp/vae_gate.err
  (cd /tmp && tar cf "$OUT/vae.tar" vae-g*/sdxl/vae vae-g*/sdxl/world.json vae-g*.log vae_gate.json vae_gate.err)
  tail -c 1500 /tmp/vae_gate.json
fi
