"""Answer drift: how far a compressed cache moves the answer a user reads.

The model answers a question about, or summarises, a held-out document through its chat template;
the full cache's greedy answer is the reference, and each cell's greedy answer is scored against it
by exact match (the same text) and ROUGE-L. Documents come from every source in turn, and the
requests cycle through several kinds, so no single prompt style decides the result.
"""

from __future__ import annotations

from squeezekv.evaluation.data import load_documents
from squeezekv.evaluation.decoding import greedy_generate, pad_id
from squeezekv.evaluation.metrics import rouge_l
from squeezekv.evaluation.tasks.base import Sample, Task, model_context, register_task
from squeezekv.evaluation.tasks.ruler import until_eos

ANSWER_TOKENS = 64
REQUESTS = (
    "Summarise the document above in three sentences.",
    "What is the document above about? Answer in one sentence.",
    "List the names, commands or terms that the document above explains, separated by commas.",
    "What does the last part of the document above say? Answer briefly.",
    "Who is the document above written for, and what will they learn from it? Answer briefly.",
)


def chat_prompt(tokenizer, content: str) -> list[int]:
    """Token ids of ``content`` as the user's turn, ready for the assistant's answer (or plain text)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(f"{content}\nAnswer:").input_ids


@register_task
class Drift(Task):
    name = "drift"
    metric = "rouge_l"
    higher_is_better = True

    def samples(self, tokenizer, model):
        context = self.options.context or model_context(model)
        samples = []
        for index, document in enumerate(load_documents(self.options.data, split="short")):
            request = REQUESTS[index % len(REQUESTS)]
            frame = len(chat_prompt(tokenizer, f"Document:\n\n\n{request}"))
            room = context - ANSWER_TOKENS - frame
            if room < 16:
                raise ValueError(f"--context {context} leaves no room for a document and an answer")
            body = tokenizer(document["text"], add_special_tokens=False).input_ids[:room]
            prompt = self.prompt(tokenizer, body, request)
            while len(prompt) > context - ANSWER_TOKENS:  # decoded text may re-tokenise a little longer
                body = body[: len(body) - (len(prompt) - context + ANSWER_TOKENS)]
                prompt = self.prompt(tokenizer, body, request)
            facts = {"request": request, "source": document["source"]}
            samples.append(Sample(document["id"], prompt, facts))
        return samples

    @staticmethod
    def prompt(tokenizer, body: list[int], request: str) -> list[int]:
        return chat_prompt(tokenizer, f"Document:\n{tokenizer.decode(body)}\n\n{request}")

    def answers(self, model, tokenizer, samples, config) -> tuple[list[str], float]:
        prompts = [sample.prompt for sample in samples]
        tokens, held = greedy_generate(
            model, prompts, ANSWER_TOKENS, config, pad_id(tokenizer), self.options.engine
        )
        texts = [
            tokenizer.decode(until_eos(row, tokenizer), skip_special_tokens=True).strip() for row in tokens
        ]
        return texts, held

    def prepare(self, model, tokenizer, samples):
        texts, held = self.answers(model, tokenizer, samples, None)
        return [(text, held) for text in texts]

    def evaluate(self, model, tokenizer, samples, prepared, config):
        if config is None:  # greedy decoding is deterministic: the full cache's answers are the reference
            texts, held = [text for text, _ in prepared], prepared[0][1]
        else:
            texts, held = self.answers(model, tokenizer, samples, config)
        results = []
        for (reference, _), text in zip(prepared, texts, strict=True):
            metrics = {
                "exact": float(text == reference),
                "rouge_l": 1.0 if text == reference else rouge_l(text, reference),
            }
            results.append(
                {"metrics": metrics, "kv_tokens": held, "prediction": text, "reference": reference}
            )
        return results
