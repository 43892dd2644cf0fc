#!/usr/bin/env bash
# Regenerates the published `squeezekv bench` results (docs/performance.md) on one H200.
#
#   PYTHONPATH=... benchmarks/run_h200.sh OUTDIR [SHAPE ...]
#
# Assumes PYTHONPATH already points at squeezekv's src/ and at transformers 5.24 (the machine's own
# torch and Triton are used). Writes each shape's report (.json, .md) into OUTDIR and tees its log
# to OUTDIR/<shape>.log. With SHAPE arguments (llama2-7b, mistral-7b, qwen2.5-7b) only those run,
# so that the three can be split over two calls of at most 10 minutes each. PYTHON names the
# interpreter (default python3).
#
# Every path: one full-length warm-up run, then --repeats 2 timed runs (median and spread).
# Estimated H200 seconds per command are written above it; they are estimates from the H100 runs
# (8k prefill ~0.27 s plain, ~0.42 s with h2o; a static-cache compile ~45 s per transformers
# column), not measurements: about 16 minutes for all three, ~8 for Llama-2-7B alone.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [llama2-7b] [mistral-7b] [qwen2.5-7b]" >&2
    exit 2
fi
out=$1
shift
shapes=("$@")
[ ${#shapes[@]} -eq 0 ] && shapes=(llama2-7b mistral-7b qwen2.5-7b)
for shape in "${shapes[@]}"; do
    case $shape in
        llama2-7b | mistral-7b | qwen2.5-7b) ;;
        *) echo "unknown shape $shape; choose llama2-7b, mistral-7b or qwen2.5-7b" >&2 && exit 2 ;;
    esac
done
python=${PYTHON:-python3}
mkdir -p "$out"
"$python" -c "import torch, transformers, triton, squeezekv; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"

common=(--prompt-tokens 8192 --new-tokens 256 --reference-batch 8 --budgets 0.2 --repeats 2 --out "$out")
failed=0
for shape in "${shapes[@]}"; do
    case $shape in
        llama2-7b)
            # ~480 s: hf_dynamic ~70 (three 256-token generates of 8 x 8k), full ~40, four compressed
            # paths ~170 (batch ~41: three runs each, the prefill of 41 prompts dominating), hf_static
            # and hf_static_gqa ~65 each (compile, then three runs), checks and prefill overhead ~40
            args=(--policies window,h2o --allocators squeeze,uniform --baselines hf_dynamic,full,hf_static,hf_static_gqa)
            ;;
        mistral-7b | qwen2.5-7b)
            # ~260 s each: full ~40, two compressed paths ~85, hf_static and hf_static_gqa ~65 each,
            # checks ~30. No hf_dynamic: at 0.1-0.4x of the static cache it bounds nothing, and its
            # three long generates would cost ~70 s per shape
            args=(--policies window,h2o --allocators squeeze --baselines full,hf_static,hf_static_gqa)
            ;;
    esac
    echo "== $shape: $(date -u +%FT%TZ)" | tee -a "$out/$shape.log"
    if ! "$python" -m squeezekv.cli bench --shape "$shape" --device cuda "${common[@]}" "${args[@]}" 2>&1 \
        | tee -a "$out/$shape.log"; then
        echo "== $shape FAILED (see $out/$shape.log)" | tee -a "$out/$shape.log"
        failed=1
    fi
    echo "== $shape done: $(date -u +%FT%TZ)" | tee -a "$out/$shape.log"
done
exit $failed
