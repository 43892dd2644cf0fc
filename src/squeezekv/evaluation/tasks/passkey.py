"""Passkey retrieval: a 5-digit key hidden at a given depth of filler text, asked for at the end.

Prompts come from :func:`squeezekv.reference.passkey_prompt` (repeated filler sentences, so the key
is the only information in the context), at several lengths and depths. A sample is correct when
the greedy answer contains the key.
"""

from __future__ import annotations

import random

from squeezekv.evaluation.decoding import greedy_generate, pad_id
from squeezekv.evaluation.tasks.base import Sample, Task, model_context, register_task
from squeezekv.reference import passkey_prompt, random_passkey

ANSWER_TOKENS = 10


@register_task
class Passkey(Task):
    name = "passkey"
    metric = "accuracy"
    higher_is_better = True
    peer_supported = True
    heat_map = ("depth", "length")

    def lengths(self, model) -> tuple[int, ...]:
        if self.options.passkey_lengths:
            return self.options.passkey_lengths
        context = model_context(model, 4096) - ANSWER_TOKENS
        return (context // 4, context // 2, 3 * context // 4)

    def samples(self, tokenizer, model):
        if self.options.data is not None:
            raise ValueError("task 'passkey' builds its own filler text; --data is not used by it")
        limit = getattr(model.config, "max_position_embeddings", None)
        rng = random.Random(self.options.seed)
        samples = []
        for length in self.lengths(model):
            for depth in self.options.passkey_depths:
                built = passkey_prompt(tokenizer, length, depth, random_passkey(rng))
                prompt = tokenizer(built.prompt).input_ids
                if limit is not None and len(prompt) + ANSWER_TOKENS > limit:
                    raise ValueError(f"passkey length {length} + answer exceeds the model's {limit} tokens")
                facts = {"key": built.key, "length": length, "depth": depth}
                samples.append(Sample(f"len{length}-depth{depth:g}", prompt, facts))
        return samples

    def evaluate(self, model, tokenizer, samples, prepared, config):
        prompts = [sample.prompt for sample in samples]
        answers, held = greedy_generate(
            model, prompts, ANSWER_TOKENS, config, pad_id(tokenizer), self.options.engine
        )
        return [
            self.scored(tokenizer, sample, answer, held)
            for sample, answer in zip(samples, answers, strict=True)
        ]

    def scored(self, tokenizer, sample: Sample, answer: list[int], kv_tokens: float) -> dict:
        text = tokenizer.decode(answer, skip_special_tokens=True)
        return {
            "metrics": {"accuracy": float(sample.facts["key"] in text)},
            "kv_tokens": kv_tokens,
            "length": sample.facts["length"],
            "depth": sample.facts["depth"],
            "prediction": text,
        }

    def peer_job(self, sample):
        return {"kind": "generate", "prompt": sample.prompt, "new_tokens": ANSWER_TOKENS}

    def peer_result(self, tokenizer, sample, output):
        return self.scored(tokenizer, sample, output["tokens"], output["kv_tokens"])
