#!/usr/bin/env bash
# Re-measures, on one GPU, the README tables that came from older code on an H100:
# "Norm layers: forward + backward" (bench_norms.py) and both "Training step" tables
# (bench_train_step.py: unpatched / norms / all layers, one run). About 3 minutes on an H200;
# each step has a hard time limit so the whole script stays under 4.
#
#   bash benchmarks/readme_gpu_numbers.sh                 # writes $OUT/{bench_norms,bench_train_step}.{txt,json}
#   OUT=/tmp/readme_gpu bash benchmarks/readme_gpu_numbers.sh
#
# Installs nothing (the GPU image has torch, triton, transformers). The Trainer-loop benchmark of
# record (bench_trainer.py), the batch-schedule and calibration benchmarks and the multi-GPU
# recipe table (recipes/gpu_smoke.sh, needs datasets/evaluate and 2 GPUs) are separate.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-outputs/readme_gpu_numbers}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
status=0

echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git)')  $(date -u '+%Y-%m-%d %H:%M UTC')"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1

# README "Norm layers: forward + backward": 9 shapes x 4 implementations, eager and CUDA-graph
# kernel time, roofline against the copy bandwidth of the same run (~60-90 s with Triton's JIT).
echo "== bench_norms.py"
timeout 120 "$PYTHON" benchmarks/bench_norms.py --repeats 100 --json "$OUT/bench_norms.json" \
    2>&1 | tee "$OUT/bench_norms.txt" || status=1

# README "Training step": GPT-2 124M (16 x 1024) and Llama-style 124M (8 x 2048), bf16 autocast,
# fused AdamW; unpatched, norms only and all layers interleaved in one process; the norms column
# is the first table's "patched" (~60-90 s).
echo "== bench_train_step.py --all-layers"
timeout 120 "$PYTHON" benchmarks/bench_train_step.py --models gpt2,llama --all-layers --steps 30 --warmup 5 \
    --json "$OUT/bench_train_step.json" 2>&1 | tee "$OUT/bench_train_step.txt" || status=1

exit $status
