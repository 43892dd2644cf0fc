"""Runs kvpress presses on token-id jobs; executed by the Python of an environment with kvpress.

Standalone on purpose (it imports nothing from squeezekv, whose transformers is newer). Usage:
``python kvpress_runner.py request.json``; prints one JSON line per job. A press compresses the
prompt during prefill to ``budget`` of its tokens (a fraction, or whole tokens) and, as kvpress does,
keeps every token that follows. ``score`` jobs return the negative log-likelihood of each target
token fed one at a time; ``generate`` jobs return the greedy continuation's token ids. A request
with ``"mode": "bench"`` measures decode throughput instead (see :func:`bench`).
"""

import gc
import importlib.metadata
import json
import sys
import time

import torch
import transformers
from kvpress import ObservedAttentionPress, PyramidKVPress, SnapKVPress, StreamingLLMPress
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

PRESSES = {
    "snapkv": SnapKVPress,
    "streaming": StreamingLLMPress,
    "pyramid": PyramidKVPress,
    "observed": ObservedAttentionPress,
}
WARM_UP_TOKENS = 128  # more than SnapKV's observation window and StreamingLLM's sinks
GIB = 2**30


def load(request, implementation):
    device = request["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if request["dtype"] == "auto" else getattr(torch, request["dtype"])
    model = AutoModelForCausalLM.from_pretrained(
        request["model"], dtype=dtype, attn_implementation=implementation
    )
    return model.to(device).eval()


def implementation(press):
    """Observed attention needs the attention weights, which only eager attention returns; the
    others use SDPA, whose one-token decode needs no mask, so layers may hold different lengths
    (PyramidKV)."""
    return "eager" if press == "observed" else "sdpa"


def compression_ratio(budget, prompt_tokens):
    kept = budget if isinstance(budget, float) else min(1.0, budget / prompt_tokens)
    return 1.0 - kept


def make_press(job, prompt_tokens, settings):
    """The press at the job's budget, with the observation window and sinks squeezekv uses."""
    ratio = compression_ratio(job["budget"], prompt_tokens)
    name = job["press"]
    if name in ("snapkv", "pyramid"):
        window = {"window_size": settings["window"], "kernel_size": settings["kernel"]}
        return PRESSES[name](compression_ratio=ratio, **window)
    if name == "streaming":
        return PRESSES[name](compression_ratio=ratio, n_sink=settings["sinks"])
    return PRESSES[name](compression_ratio=ratio)


def decode_step(model, cache, tokens, position):
    """Logits of the next token after ``tokens`` (``[batch, 1]``), at ``position`` of every sequence.

    Positions continue from the uncompressed prompt length, not from the shrunken cache, as kvpress's
    pipeline does.
    """
    positions = torch.full_like(tokens, position)
    output = model(input_ids=tokens, past_key_values=cache, use_cache=True, position_ids=positions)
    return output.logits[:, -1]


def run(model, job, settings):
    prompt = torch.tensor([job["prompt"]], device=model.device)
    press = make_press(job, prompt.shape[1], settings)
    cache = DynamicCache()
    steps = len(job["targets"]) if job["kind"] == "score" else job["new_tokens"]
    nll, tokens = [], []
    with press(model):
        logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[0, -1].float()
        for step in range(steps):
            if job["kind"] == "score":
                token = job["targets"][step]
                nll.append(float(-torch.log_softmax(logits, -1)[token]))
            else:
                token = int(logits.argmax())
                tokens.append(token)
            if step == steps - 1:
                break
            next_input = torch.tensor([[token]], device=model.device)
            logits = decode_step(model, cache, next_input, prompt.shape[1] + step)[0].float()
    held = sum(layer.keys.shape[-2] for layer in cache.layers) / len(cache.layers)
    return {"nll": nll, "tokens": tokens, "kv_tokens": held}


def clock(device):
    """Seconds on a monotonic clock, once the work queued on ``device`` is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def free(device):
    """Returns what the last job held to the device, so the next job starts with all of its memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prefill(model, press, ids):
    """Compresses each prompt alone, as kvpress's pipeline does, into one cache for the whole batch.

    Each sequence's compressed keys and values are copied into batch-wide tensors as soon as it is
    done, so memory never holds two copies of the whole cache. Returns the batched cache, the prompt
    tokens kept per layer and the first new token of every sequence (``[batch, 1]``).
    """
    batch = ids.shape[0]
    keys, values, first = [], [], []
    for row in range(batch):
        cache, sequence = DynamicCache(), ids[row : row + 1]
        with press(model):
            output = model(input_ids=sequence, past_key_values=cache, use_cache=True, logits_to_keep=1)
        first.append(output.logits[:, -1].argmax(-1, keepdim=True))
        if row == 0:
            keys = [layer.keys.new_empty((batch, *layer.keys.shape[1:])) for layer in cache.layers]
            values = [layer.values.new_empty((batch, *layer.values.shape[1:])) for layer in cache.layers]
        for index, layer in enumerate(cache.layers):
            if layer.keys.shape[-2] != keys[index].shape[-2]:
                raise ValueError(
                    f"sequence {row} kept {layer.keys.shape[-2]} tokens in layer {index}, sequence 0 "
                    f"kept {keys[index].shape[-2]}: a batched cache needs the same count"
                )
            keys[index][row] = layer.keys[0]
            values[index][row] = layer.values[0]
        del cache, output
    kept = [layer_keys.shape[-2] for layer_keys in keys]
    batched = DynamicCache()
    for index in range(len(keys)):
        batched.update(keys[index], values[index], index)
        keys[index] = values[index] = None  # the cache holds its own copy now
    return batched, kept, torch.cat(first)


def prefill_and_decode(model, press, ids, new_tokens):
    """``new_tokens`` greedy tokens per sequence: the prefill gives the first, a Python loop the rest,
    as kvpress's pipeline decodes (outside the press, which compresses the prompt only)."""
    started = clock(ids.device)
    cache, kept, tokens = prefill(model, press, ids)
    prefilled = clock(ids.device)
    for step in range(new_tokens - 1):
        tokens = decode_step(model, cache, tokens, ids.shape[1] + step).argmax(-1, keepdim=True)
    finished = clock(ids.device)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    step_seconds = (finished - prefilled) / (new_tokens - 1)
    return {
        "prefill_seconds": prefilled - started,
        "decode_ms_per_step": 1000 * step_seconds,
        "tokens_per_second": ids.shape[0] / step_seconds,
        "kv_gib": held / GIB,
        "kept": kept,
    }


def bench_job(model, prompts, job, request):
    """One press at one budget and batch, after a warm-up on a short prompt."""
    device = model.device
    ids = prompts[: job["batch"]].to(device)
    press = make_press(job, ids.shape[1], request["settings"])
    prefill_and_decode(model, press, ids[:1, :WARM_UP_TOKENS], 2)
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = prefill_and_decode(model, press, ids, request["new_tokens"])
    result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return result


def bench(request):
    """Decode throughput and memory of each job's press, budget and batch, one JSON line per job.

    The model is built from the bench's ``config.json`` with random weights (speed does not depend
    on them), bf16 on a GPU; the prompts are drawn exactly as the bench draws its own. The first line
    names the versions that ran. A job that runs out of memory reports an error; the next one runs.
    """
    device = torch.device(request["device"])
    config = AutoConfig.from_pretrained(request["config"])
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(request["seed"])
    shape = (request["max_batch"], request["prompt_tokens"])
    prompts = torch.randint(3, config.vocab_size, shape, generator=generator)
    if int(prompts.sum()) != request["prompt_sum"]:
        raise ValueError(f"the prompts drawn with torch {torch.__version__} differ from the bench's")
    versions = {
        "kvpress": importlib.metadata.version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    print(json.dumps({"versions": versions}), flush=True)
    for job in request["jobs"]:
        output = dict(job)
        try:
            output.update(bench_job(model, prompts, job, request))
        except torch.OutOfMemoryError as error:
            output["error"] = f"out of memory: {str(error).splitlines()[0]}"
        free(device)  # after the except clause, which held the failed job's tensors
        print(json.dumps(output), flush=True)


def main():
    with open(sys.argv[1], encoding="utf-8") as file:
        request = json.load(file)
    with torch.inference_mode():
        if request.get("mode") == "bench":
            bench(request)
            return
        models = {}
        for job in request["jobs"]:
            kind = implementation(job["press"])
            if kind not in models:
                models[kind] = load(request, kind)
            output = run(models[kind], job, request["settings"])
            print(json.dumps({"sample": job["sample"], "cell": job["cell"], **output}), flush=True)


if __name__ == "__main__":
    main()
