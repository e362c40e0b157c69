#!/usr/bin/env bash
# Issue 11's table of record on one GPU, in three device calls of under 10 minutes each (the
# machine's limit per command), everything written to $OUT:
#
#   bash benchmarks/trainer_record.sh 1   # GPU test suite (8 workers) + the eager table (~7.5 min)
#   bash benchmarks/trainer_record.sh 2   # compiled GPT-2 and Llama-124M, graph-break check (~9 min)
#   bash benchmarks/trainer_record.sh 3   # compiled Llama-0.85B + eager Llama-124M, 3 rounds (~8 min)
#   PYTHONPATH=. python benchmarks/bench_trainer.py --from-json eager.json,compiled_a.json,compiled_b.json
#
# Every ratio is taken within one bench_trainer.py invocation (its Trainer ran beside it); the
# last line prints one table of all parts whose JSON is in $OUT. Each step has a hard time limit
# below the command's, so a slow step cuts only itself. BENCH_ARGS adds bench_trainer.py
# arguments to every run ("--tiny --steps 2 --warmup 1" is a CPU smoke run; TESTS=0 skips pytest).
# Installs nothing (the GPU image has torch, triton, transformers, accelerate and pytest).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-outputs/trainer_record}"
PART="${1:?usage: trainer_record.sh 1|2|3}"
read -r -a BENCH <<< "${BENCH_ARGS:-}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
status=0
SECONDS=0
echo "part $PART, commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  $(date -u '+%Y-%m-%d %H:%M UTC')"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1

bench() {  # bench LIMIT_S NAME ARGS...: one bench_trainer.py invocation, its table to NAME.txt
    local limit=$1 name=$2
    shift 2
    echo "== $name: $* (limit $limit s)"
    timeout "$limit" "$PYTHON" benchmarks/bench_trainer.py "$@" "${BENCH[@]}" --json "$OUT/$name.json" \
        > "$OUT/$name.txt" 2>&1 || status=1
    grep -E "ms/step|FAILED|naming hf_gns|->|MISS|PASS" "$OUT/$name.txt"
    echo "($SECONDS s)"
}

case "$PART" in
1)
    if [ "${TESTS:-1}" = 1 ]; then
        echo "== pytest -m gpu (8 workers, limit 200 s)"
        timeout 200 "$PYTHON" -m pytest -m gpu -n 8 -q -p no:cacheprovider --durations=8 tests \
            > "$OUT/gpu_tests.txt" 2>&1 || status=1
        grep -E "passed|failed|error|FAILED|ERROR" "$OUT/gpu_tests.txt" | tail -25
        echo "($SECONDS s)"
    fi
    bench 330 eager --models gpt2,llama124,llama850 --variants trainer,gns-norms,gns-all
    ;;
2)
    bench 570 compiled_a --check-graph-breaks --models gpt2,llama124 \
        --variants trainer-compile,gns-norms-compile,gns-all-compile
    ;;
3)
    bench 380 compiled_b --check-graph-breaks --models llama850 \
        --variants trainer-compile,gns-norms-compile,gns-all-compile
    bench $((570 - SECONDS)) eager_rounds --rounds 3 --models llama124 --variants trainer,gns-norms
    ;;
*)
    echo "unknown part $PART: 1, 2 or 3" >&2
    exit 2
    ;;
esac

parts=$(for name in eager compiled_a compiled_b eager_rounds; do
    [ -s "$OUT/$name.json" ] && printf '%s,' "$OUT/$name.json"
done)
if [ -n "$parts" ]; then
    "$PYTHON" benchmarks/bench_trainer.py --from-json "${parts%,}" > "$OUT/table.txt" 2>&1 || status=1
    cat "$OUT/table.txt"
fi
echo "total $SECONDS s"
exit $status
