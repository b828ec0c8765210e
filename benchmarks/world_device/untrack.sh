#!/bin/bash
# usage: untrack.sh sdxl|scalewise|sdxl+switti  (untrack the other weights for a device call); untrack.sh restore
cd "$(git rev-parse --show-toplevel)"
case "$1" in
 scalewise) echo "/world/weights/sdxl/" >> .git/info/exclude; git rm -r -q --cached world/weights/sdxl;;
 sdxl) printf '/world/weights/infinity/\n/world/weights/switti/\n' >> .git/info/exclude; git rm -r -q --cached world/weights/infinity world/weights/switti;;
 sdxl+switti) echo "/world/weights/infinity/" >> .git/info/exclude; git rm -r -q --cached world/weights/infinity;;
 restore) git reset -q -- world/weights; sed -i '/world\/weights\//d' .git/info/exclude;;
esac
git ls-files | xargs du -cb 2>/dev/null | tail -1; git status --short | head -3
