#!/usr/bin/env bash
# Reproduces the GPU part of docs/results/ (stability/, passkey-gpu/, fidelity-gpu/, ppl/): the
# grouping-stability profile and three `squeezekv eval` tasks on the bundled reference model, on one GPU.
#
#   docs/results/run_reference.sh [RESULTS_DIR] [SECONDS] [DEVICE]
#
# The four stages run in this order under one deadline (default 3600 s); a stage that would start
# with less than 20 s left is skipped. Each eval stage resumes its output directory, so a stage cut
# off by the deadline keeps every (sample, cell) it finished and a rerun completes it; the summaries
# only count samples finished in every cell. On one H100 the four stages take about 20 + 38 + 64 +
# 223 s (see gpu_run.log). The CPU folders (fidelity-cpu/, peer-kvpress-cpu/) are made by the
# commands in README.md.
set -u
cd "$(dirname "$0")/../.."
RESULTS=${1:-docs/results}
DEADLINE=$(($(date +%s) + ${2:-3600}))
DEVICE=${3:-cuda}
MODEL=(--model models/squeeze-ref-25m --device "$DEVICE" --dtype float32)
mkdir -p "$RESULTS"

stage() {
    local started left rc
    started=$(date +%s)
    left=$((DEADLINE - started))
    if ((left < 20)); then
        echo "skipped, deadline reached: squeezekv $*"
        return
    fi
    echo "== squeezekv $* (${left}s left)"
    timeout "$left" python3 -m squeezekv.cli "$@" >>"$RESULTS/stdout.log"
    rc=$?
    echo "   exit $rc after $(($(date +%s) - started))s"
}

stage profile "${MODEL[@]}" --stability --limit 32 --context 2048 --policy window --out "$RESULTS/stability"
stage eval "${MODEL[@]}" --no-progress --task passkey --passkey-lengths 1024,2048,4000 \
    --passkey-depths 0.1,0.3,0.5,0.7,0.9 --budgets 0.2,0.5 --policies window,streaming,h2o,snapkv \
    --allocators uniform,squeeze --batch-size 15 --out "$RESULTS/passkey-gpu"
stage eval "${MODEL[@]}" --no-progress --task fidelity --score-tokens 64 --limit 8 --batch-size 8 \
    --budgets 0.2,0.5 --policies window,h2o,snapkv --allocators uniform,squeeze,pyramid --out "$RESULTS/fidelity-gpu"
stage eval "${MODEL[@]}" --no-progress --budgets 0.1,0.2,0.3,0.5 --policies window,streaming,h2o,snapkv \
    --allocators uniform,squeeze,pyramid --task ppl --score-tokens 128 --limit 16 --batch-size 16 --out "$RESULTS/ppl"
