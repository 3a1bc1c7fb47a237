#!/usr/bin/env bash
# KV strategies after a short RDS run (benchmarks/README.md, "After a short RDS run"): convert the embedded
# default model at 8:24, fine-tune 20 updates, then bench_kv.py on the trained checkpoint. Work in $1 (/tmp/kvrds).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/kvrds}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH="$PWD"
python -m loopus convert --split 8:24 --out "$work/conv"
python -m loopus finetune "$work/conv" --out "$work/run" --block-size 64 --batch-size 2 --steps 20 \
    --loop-steps 4 --supervised 2 --lr 1e-4 --warmup 2 --eval-every 100 --save-every 20 --eval-loops 1,4 \
    --eval-blocks 4
python benchmarks/bench_kv.py --checkpoint "$work/run/checkpoints/step-00000020" --json "$work/kv.json"
