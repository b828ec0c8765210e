#!/usr/bin/env bash
# On the GPU machine (no network): install carried wheels (.whl/: diffusers, open_clip_torch) and
# cstoolkit itself into /tmp/site. Usage: source benchmarks/device_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . >/dev/null 2>&1
rm -rf build
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
