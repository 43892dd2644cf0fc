#!/usr/bin/env bash
# Reproduces docs/results/: `squeezekv eval` of every task and the grouping-stability profile on the
# bundled reference model, on one GPU.
#
#   docs/results/run_reference.sh [RESULTS_DIR] [SECONDS] [DEVICE]
#
# The stages run in order of priority under one deadline. Each resumes its task's directory, so the
# later stages (larger --limit) extend the earlier ones, and a stage cut off by the deadline keeps
# every (sample, cell) it finished; the summaries only count samples finished in every cell.
set -u
cd "$(dirname "$0")/../.."
RESULTS=${1:-docs/results}
DEADLINE=$(($(date +%s) + ${2:-3600}))
DEVICE=${3:-cuda}
MODEL=(--model models/squeeze-ref-25m --device "$DEVICE" --dtype float32)
GRID=(--budgets 0.1,0.2,0.3,0.5 --policies window,streaming,h2o,snapkv --allocators uniform,squeeze,pyramid)
mkdir -p "$RESULTS"

stage() {
    local started left
    started=$(date +%s)
    left=$((DEADLINE - started))
    if ((left < 20)); then
        echo "skipped, deadline reached: $*"
        return
    fi
    echo "== squeezekv $* (${left}s left)"
    timeout "$left" python3 -m squeezekv.cli "$@" >>"$RESULTS/stdout.log"
    echo "   exit $? after $(($(date +%s) - started))s"
}

eval_task() {
    stage eval "${MODEL[@]}" "${GRID[@]}" --no-progress "$@"
}

stage profile "${MODEL[@]}" --stability --limit 32 --context 2048 --policy window --out "$RESULTS/stability"
eval_task --task ppl --score-tokens 128 --limit 16 --batch-size 16 --out "$RESULTS/ppl"
eval_task --task fidelity --score-tokens 128 --limit 8 --batch-size 8 --out "$RESULTS/fidelity"
eval_task --task passkey --batch-size 5 --out "$RESULTS/passkey"
eval_task --task ppl --score-tokens 128 --limit 48 --batch-size 16 --out "$RESULTS/ppl"
eval_task --task fidelity --score-tokens 128 --limit 32 --batch-size 8 --out "$RESULTS/fidelity"
eval_task --task longbench --data data/longbench_sample.jsonl --batch-size 8 --out "$RESULTS/longbench"
