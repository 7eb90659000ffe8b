#!/usr/bin/env bash
# Both benchmarks in one call on one GPU (about 9 minutes with compilation), the training one with
# the memory option ladder (docs/SPEED.md). On a machine without diffusers, carry its wheel and
# peft's in .whl/ (pip download --no-deps diffusers peft).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
if ! python3 -c "import diffusers, peft" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# EXTRA="--tiny --no-compile" runs the same plumbing on tiny models on a CPU (a rehearsal)
EXTRA=${EXTRA:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 320 python3 benchmarks/train_step.py --budget 270 --options $EXTRA --json "$OUT/train_step.json" > "$OUT/train_step.log" 2>&1
grep -v -i warn "$OUT/train_step.log" | tail -40
timeout 240 python3 benchmarks/generate.py --budget 190 $EXTRA --json "$OUT/generate.json" > "$OUT/generate.log" 2>&1
grep -v -i warn "$OUT/generate.log" | tail -16
