#!/usr/bin/env bash
# Issue 20: the user path, `cstoolkit run`, of the scale-wise LoRA recipes on the full presets with random weights
# (bf16, CUDA). On the GPU machine, from the repository root:
#   source benchmarks/device_setup.sh && STEPS=30 PER=150 bash benchmarks/world_device/full_presets_run.sh
# PRESETS picks presets (default "switti-ar infinity-2b"); UNTIL (epoch seconds) skips the runs that would end after it. Each run's phases.json, run.json and log land in $OUT/full_presets.tgz; one summary line per run.
set -uo pipefail
STEPS=${STEPS:-30}; PER=${PER:-150}; ROOT=$(pwd); W=/tmp/full_presets
rm -rf "$W"; mkdir -p "$W"
for pair in "unziplora switti switti-ar" "dreambooth_lora switti switti-ar" \
            "unziplora infinity infinity-2b" "dreambooth_lora infinity infinity-2b"; do
  set -- $pair
  case " ${PRESETS:-switti-ar infinity-2b} " in *" $3 "*) ;; *) continue;; esac
  d="$W/$1-$3"
  t=$(date +%s)
  if [ -n "${UNTIL:-}" ] && [ $(( UNTIL - t )) -lt "$PER" ]; then echo "$1 on $3: skipped (UNTIL)"; continue; fi
  # -P: the checkout's cstoolkit/ folder must not shadow the installed package
  (cd /tmp && timeout "$PER" python3 -P -m cstoolkit run "$ROOT/recipes/$1-switti.yaml" --device ${DEV:-cuda} \
     --set backbone.name="$2" --set backbone.preset="${PRESET:-$3}" --set backbone.random_weights=true \
     --set runtime.mixed_precision=${MP:-bf16} --set params.steps="$STEPS" --set generate.num_images=1 \
     --set runtime.output_dir="$d/run" >"$d.log" 2>&1)
  rc=$?
  echo "$1 on $3: rc=$rc wall=$(( $(date +%s) - t )) s; $(find "$d/run/samples" -name '*.png' 2>/dev/null | wc -l) images"
  tail -3 "$d.log"
  [ -f "$d/run/phases.json" ] && python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print('total', p['total_s'], 's;', ', '.join(f\"{q['phase']} {q['seconds']:.1f}\" for q in p['phases'] if q['depth'] == 0 or q['phase'].startswith('fit/')))" "$d/run/phases.json"
done
(cd "$W" && tar czf "${OUT:-/tmp}/full_presets.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude=samples .)
