#!/usr/bin/env bash
# Unpack what world/train_gpu.sh packed under $OUT (world.tar.part-*) into the shipped layout:
#   bash world/unpack_run.sh FILES_AT [DEST]          # DEST defaults to world/weights
# Per backbone that finished (its world.json is in the archive) the trained parts replace the shipped ones:
#   sdxl/{unet/,vae/,world.json}  infinity/{transformer.safetensors,vae.safetensors,text_encoder/,world.json}
#   switti/{transformer/,vqvae/,world.json}
# Parts a continued run (INIT_FROM) did not pack (the frozen SDXL vae/, Infinity vae.safetensors) stay as they
# are; logs, sample grids and .npz files are not shipped. Nothing in DEST changes unless the archive is whole.
set -euo pipefail
src=${1:?usage: bash world/unpack_run.sh FILES_AT [DEST]}
dest=${2:-world/weights}
compgen -G "$src/world.tar.part-*" >/dev/null || { echo "unpack_run: no $src/world.tar.part-* files" >&2; exit 2; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cat "$src"/world.tar.part-* > "$tmp/world.tar"
tar xf "$tmp/world.tar" -C "$tmp"   # fails (exit 2) on a truncated archive, before DEST is touched
for b in sdxl infinity switti; do
  [ -f "$tmp/$b/world.json" ] || { echo "unpack_run: $b not in the archive (or unfinished): kept"; continue; }
  case $b in
    sdxl) parts=(unet vae world.json) ;;
    infinity) parts=(transformer.safetensors vae.safetensors text_encoder world.json) ;;
    switti) parts=(transformer vqvae world.json) ;;
  esac
  mkdir -p "$dest/$b"
  for p in "${parts[@]}"; do
    [ -e "$tmp/$b/$p" ] || continue
    rm -rf "${dest:?}/$b/$p"
    cp -r "$tmp/$b/$p" "$dest/$b/$p"
    echo "unpack_run: $dest/$b/$p"
  done
done
