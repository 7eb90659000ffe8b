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
# SD3 and FLUX.1-dev at real size (FLOW=1): the quantize_base / checkpointing options' resident and peak GiB,
# and generation with the transformer in bf16 and quantized (needs torchao and bitsandbytes: pip install '.[quant]')
if [ -n "${FLOW:-}" ]; then
  timeout 420 python3 benchmarks/train_step.py --models '' --flow-models sd3,flux --flow-options bf16+ckpt,int8+ckpt,nf4+ckpt \
    --flow-variants tscd --budget 380 --no-compile --no-memory $EXTRA --json "$OUT/train_flow.json" > "$OUT/train_flow.log" 2>&1
  grep -v -i warn "$OUT/train_flow.log" | tail -12
  timeout 300 python3 benchmarks/generate.py --models '' --flow-models flux --flow-options bf16,int8,nf4 --steps 1,8 \
    --iters 3 $EXTRA --json "$OUT/generate_flow.json" > "$OUT/generate_flow.log" 2>&1
  grep -v -i warn "$OUT/generate_flow.log" | tail -10
fi
