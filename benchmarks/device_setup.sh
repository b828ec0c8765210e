#!/usr/bin/env bash
# On the GPU machine (no network): install the carried wheels (.whl/: diffusers, open_clip_torch, ftfy, wcwidth;
# or .whl-a/: the same without diffusers) and cstoolkit itself into /tmp/site. Usage: source benchmarks/device_setup.sh
# Python started with `-m` from the repository root would import the checkout's cstoolkit/ folder (no world/,
# backbones/, methods/): start it elsewhere or with -P.
for d in .whl .whl-a; do
  if compgen -G "$d/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$d"/*.whl 2>&1 | tail -3
    break
  fi
done
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . 2>&1 | tail -3
rm -rf build
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
