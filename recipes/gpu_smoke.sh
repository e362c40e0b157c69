#!/usr/bin/env bash
# GPU smoke run of recipes/train_gpt2.py, unchanged, under the accelerate configs of recipes/accelerate/:
# a GPT-2 124M-shaped model on the embedded stdlib corpus (8K-token BPE trained locally, blocks of 1024),
# bf16, the batch size following the GNS, a budget of $MAX_TOKENS tokens (under a minute per config on
# an H100). Prints each run's summary: steps, tokens/s (median between logs) and the final GNS.
#
#   bash recipes/gpu_smoke.sh                     # single_gpu, then ddp over every GPU when there are 2+
#   CONFIGS="ddp fsdp" bash recipes/gpu_smoke.sh  # pick configs (single_gpu, ddp, fsdp)
#   MAX_TOKENS=2000000 bash recipes/gpu_smoke.sh  # shorter
#
# No network needed. Where `datasets`/`evaluate` are missing (the GPU image), their wheels in .whl/ are
# installed into /tmp/site first (pip download them elsewhere: see README, "Running on GPUs").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import datasets, evaluate" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        echo "gpu_smoke.sh: datasets/evaluate are not installed and .whl/ holds no wheels for them" >&2
        exit 1
    fi
fi

N_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$N_GPUS" -lt 1 ]; then
    echo "gpu_smoke.sh: no CUDA GPU" >&2
    exit 1
fi
CONFIGS="${CONFIGS:-single_gpu$([ "$N_GPUS" -ge 2 ] && echo ' ddp')}"
MAX_TOKENS="${MAX_TOKENS:-8000000}"
OUT_DIR="${OUT_DIR:-outputs/gpu_smoke}"
mkdir -p "$OUT_DIR"

ARGS=(
    --model_size gpt2-124m --block_size 1024
    --vocab_size 8192 --corpus_max_bytes 0 --tokenizer_train_bytes 4000000 --preprocessing_num_workers 8
    --per_device_train_batch_size 16 --bf16 true
    --max_tokens "$MAX_TOKENS" --batch_size_policy gns --batch_size_max 512
    --lr_schedule d2z --lr_warmup_fraction 0.05 --learning_rate 6e-4
    --gns_ema_decay 0.999  # per example: the GNS of about the last 1000 examples (60 steps), not of the run
    --logging_steps 5 --eval_strategy no --save_strategy no
    --max_eval_samples 64 --per_device_eval_batch_size 16
    --dataloader_num_workers 2 --disable_tqdm true
)

for config in $CONFIGS; do
    processes=1 extra=()
    [ "$config" != single_gpu ] && processes="$N_GPUS"
    # DDP: also the classic two-batch-size estimate (small batch = one process's), to compare.
    [ "$config" = ddp ] && extra=(--gns_log_ddp_estimate true)
    echo "=== $config: $processes process(es), recipes/accelerate/$config.yaml ==="
    "$PYTHON" -m accelerate.commands.launch --config_file "recipes/accelerate/$config.yaml" \
        --num_processes "$processes" recipes/train_gpt2.py "${ARGS[@]}" "${extra[@]}" --output_dir "$OUT_DIR/$config" "$@" \
        >"$OUT_DIR/$config.log" 2>&1 || { tail -40 "$OUT_DIR/$config.log"; exit 1; }
    grep -E "^(data|model):|^trained" "$OUT_DIR/$config.log"
    "$PYTHON" - "$OUT_DIR/$config/training_curves.csv" <<'PY'
import csv, sys
rows = [row for row in csv.DictReader(open(sys.argv[1])) if row["loss"]]
keys = ("step", "tokens_seen", "batch_size", "loss", "gns", "gns_ddp", "tokens_per_second")
print("last log:", ", ".join(f"{k}={float(rows[-1][k]):.4g}" for k in keys if rows[-1].get(k)))
PY
done
