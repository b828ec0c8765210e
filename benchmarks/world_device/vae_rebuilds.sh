# Sourced by the device scripts: start_vae_rebuilds MINUTES starts, in the background of the calling shell (its `wait`
# waits for them), one `world train sdxl --repair-decoder-only --vae-groups G` per G in VAE_GROUPS (VAE_REINIT=1: a fresh
# decoder; VAE_MINUTES overrides MINUTES), each writing /tmp/vae-gG/sdxl/{vae,world.json} and /tmp/vae-gG.log, for
# vae_gate.py. Small (1 M parameters): they run beside a training or a bench, with their own image cache.
start_vae_rebuilds() {
  local G
  for G in ${VAE_GROUPS:-}; do
    ( cd /tmp && python3 -P -m cstoolkit.world.train sdxl --repair-decoder-only --vae-groups "$G" ${VAE_REINIT:+--reinit-decoder} \
        --device cuda --minutes "${VAE_MINUTES:-$1}" --out "/tmp/vae-g$G" --images-per-pair 64 --tokenizer-batch 64 --workers 2 \
        > "/tmp/vae-g$G.log" 2>&1 ) &
  done
}
