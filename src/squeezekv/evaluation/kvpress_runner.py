"""Runs kvpress presses on token-id jobs; executed by the Python of an environment with kvpress.

Standalone on purpose (it imports nothing from squeezekv, whose transformers is newer). Usage:
``python kvpress_runner.py request.json``; prints one JSON line per job. A press compresses the
prompt during prefill to ``budget`` of its tokens (a fraction, or whole tokens) and, as kvpress does,
keeps every token that follows. ``score`` jobs return the negative log-likelihood of each target
token fed one at a time; ``generate`` jobs return the greedy continuation's token ids.
"""

import json
import sys

import torch
from kvpress import ObservedAttentionPress, PyramidKVPress, SnapKVPress, StreamingLLMPress
from transformers import AutoModelForCausalLM, DynamicCache

PRESSES = {
    "snapkv": SnapKVPress,
    "streaming": StreamingLLMPress,
    "pyramid": PyramidKVPress,
    "observed": ObservedAttentionPress,
}


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
            # positions continue from the uncompressed prompt length, not from the shrunken cache
            position = torch.tensor([[prompt.shape[1] + step]], device=model.device)
            next_input = torch.tensor([[token]], device=model.device)
            output = model(input_ids=next_input, past_key_values=cache, use_cache=True, position_ids=position)
            logits = output.logits[0, -1].float()
    held = sum(layer.keys.shape[-2] for layer in cache.layers) / len(cache.layers)
    return {"nll": nll, "tokens": tokens, "kv_tokens": held}


def main():
    with open(sys.argv[1], encoding="utf-8") as file:
        request = json.load(file)
    models = {}
    with torch.inference_mode():
        for job in request["jobs"]:
            kind = implementation(job["press"])
            if kind not in models:
                models[kind] = load(request, kind)
            output = run(models[kind], job, request["settings"])
            print(json.dumps({"sample": job["sample"], "cell": job["cell"], **output}), flush=True)


if __name__ == "__main__":
    main()
