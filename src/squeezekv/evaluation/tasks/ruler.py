"""RULER's synthetic tasks (arXiv 2404.06654), generated here from the held-out documents.

Eleven subtasks need no downloaded data: needle-in-a-haystack (single 1/2/3, multi-key 1/2/3,
multi-value, multi-query), variable tracking, and common / frequent words extraction. Each follows
the paper's definition: the haystack (noise sentences, held-out prose, or distractor needles), the
key and value kinds, the number of needles, the answer length each task may generate, and the
string-match-all score (the share of expected answers found in the output). Prompts go through the
model's chat template when it has one, the question in the user turn and RULER's answer prefix
after the assistant start; a prompt plus its answer tokens fits the target length, as in RULER.

Prose comes from every source of the held-out set in turn; every random choice comes from a seed
derived from the run's seed, the subtask, the length and the sample index, so a sample is the
same whatever else a run contains. :func:`write_samples` saves the exact prompts and answers.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path

from squeezekv.evaluation.data import load_documents
from squeezekv.evaluation.metrics import string_match_all
from squeezekv.evaluation.tasks.base import AnswerTask, Asked, Sample, register_task

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 evenly spaced needle depths, in %
LENGTHS = (1024, 2048, 4096, 8192)
SAMPLES = 100
QUESTION_SETTINGS = ("in-prompt", "after-compression")  # kvpress's query-aware and query-agnostic


@dataclass(frozen=True)
class Subtask:
    """One RULER configuration. ``haystack``: "noise", "essay" or "needles" (distractor needles)."""

    family: str  # "niah", "vt", "cwe" or "fwe"
    new_tokens: int
    haystack: str = "essay"
    key: str = "word"  # "word" or "uuid"
    value: str = "number"  # "number" or "uuid"
    keys: int = 1  # needles with different keys (one is asked for)
    values: int = 1  # values hidden for the asked key
    queries: int = 1  # keys asked for at once


SUBTASKS = {
    "niah_single_1": Subtask("niah", 128, haystack="noise"),
    "niah_single_2": Subtask("niah", 128),
    "niah_single_3": Subtask("niah", 128, value="uuid"),
    "niah_multikey_1": Subtask("niah", 128, keys=4),
    "niah_multikey_2": Subtask("niah", 128, haystack="needles"),
    "niah_multikey_3": Subtask("niah", 128, haystack="needles", key="uuid", value="uuid"),
    "niah_multivalue": Subtask("niah", 128, values=4),
    "niah_multiquery": Subtask("niah", 128, queries=4),
    "vt": Subtask("vt", 30, haystack="noise"),
    "cwe": Subtask("cwe", 120, haystack=""),
    "fwe": Subtask("fwe", 50, haystack=""),
}


@dataclass(frozen=True)
class Built:
    """A prompt before the chat template: the user's text, the answer prefix and the expected answers.

    ``query`` is the end of the user's text that asks the question (everything before it is the
    context a cache holds before the question is known)."""

    question: str
    prefix: str
    answers: list[str]
    depths: list[int]
    query: str


class Generator:
    """Builds the samples of one run: the tokenizer measures every prompt, the documents give prose."""

    def __init__(self, tokenizer, documents: list[dict]) -> None:
        self.tokenizer = tokenizer
        self.documents = documents
        self.sources = list(dict.fromkeys(document["source"] for document in documents))
        words = re.findall(r"\b[a-z]{4,10}\b", " ".join(document["text"][:20000] for document in documents))
        self.words = sorted(set(words))
        if len(self.words) < 100:
            raise ValueError(f"the documents hold only {len(self.words)} distinct words; RULER needs >= 100")
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def render(self, built: Built) -> str:
        """The model's input text: the chat template when there is one, then the answer prefix."""
        if not self.templated:
            return f"{built.question}{built.prefix}"
        messages = [{"role": "user", "content": built.question}]
        start = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return start + built.prefix.lstrip()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.templated).input_ids

    def sample(self, name: str, length: int, index: int, seed: int) -> Sample:
        spec = SUBTASKS[name]
        budget = length - spec.new_tokens
        make = self.maker(name, spec, index, seed, length)
        size = largest_fitting(lambda n: len(self.encode(self.render(make(n)))), budget)
        built = make(size)
        text = self.render(built)
        prompt = self.encode(text)
        facts = {
            "subtask": name,
            "length": length,
            "answers": built.answers,
            "new_tokens": spec.new_tokens,
            "depths": built.depths,
            "text": text,
            "question_start": self.question_start(text, prompt, built.query),
        }
        return Sample(f"{name}-{length}-{index}", prompt, facts)

    def question_start(self, text: str, prompt: list[int], query: str) -> int:
        """The index of the first token that differs once the text is cut where the question starts:
        the tokens before it are the context alone, whatever the tokenizer merges at the cut."""
        context = self.encode(text[: text.rindex(query)])
        return next(
            (index for index, (a, b) in enumerate(zip(prompt, context, strict=False)) if a != b),
            min(len(context), len(prompt) - 1),
        )

    def maker(self, name: str, spec: Subtask, index: int, seed: int, length: int) -> Callable[[int], Built]:
        """``make(size)``: the prompt with a haystack of ``size`` units; the same draws for every size."""
        draw = random.Random(f"{seed}/{name}/{length}/{index}")
        state = draw.getstate()
        if spec.family == "niah":
            prose = self.prose(index, length) if spec.haystack == "essay" else []
            build = partial(self.niah, spec, prose=prose)
        elif spec.family == "cwe":
            build = partial(self.common_words, long=length >= 4096)
        else:
            build = self.variable_tracking if spec.family == "vt" else self.frequent_words

        def make(size: int) -> Built:
            draw.setstate(state)
            return build(draw, size)

        return make

    def prose(self, index: int, budget: int) -> list[int]:
        """``budget`` tokens of prose for sample ``index``: sources in turn, a source's documents joined."""
        source = self.sources[index % len(self.sources)]
        pool = [document for document in self.documents if document["source"] == source]
        start = index // len(self.sources)
        tokens: list[int] = []
        for step in range(len(pool)):
            text = pool[(start + step) % len(pool)]["text"]
            # a token holds at most a few characters: no need to tokenise the rest of a long document
            tokens += self.tokenizer(text[: 16 * budget], add_special_tokens=False).input_ids
            if len(tokens) >= budget:
                break
        return tokens[:budget]

    def key(self, draw: random.Random, kind: str) -> str:
        if kind == "uuid":
            return str(uuid.UUID(int=draw.getrandbits(128), version=4))
        return "-".join(draw.sample(self.words, 2))

    def value(self, draw: random.Random, kind: str) -> str:
        if kind == "uuid":
            return str(uuid.UUID(int=draw.getrandbits(128), version=4))
        return str(draw.randint(1_000_000, 9_999_999))

    def niah(self, spec: Subtask, draw: random.Random, size: int, prose: list[int]) -> Built:
        """Needles "one of the special magic numbers for KEY is: VALUE" at RULER's depths."""
        kind = "numbers" if spec.value == "number" else "UUIDs"
        keys = [self.key(draw, spec.key) for _ in range(max(spec.keys, spec.queries))]
        needles = [(key, self.value(draw, spec.value)) for key in keys for _ in range(spec.values)]
        asked = keys[: spec.queries]
        answers = [value for key, value in needles if key in asked]
        depths = sorted(draw.sample(DEPTHS, len(needles)))
        draw.shuffle(needles)
        lines = [f"One of the special magic {kind} for {key} is: {value}." for key, value in needles]
        if spec.haystack == "needles":
            filler = [
                f"One of the special magic {kind} for {self.key(draw, spec.key)} is: "
                f"{self.value(draw, spec.value)}."
                for _ in range(size)
            ]
            context = " ".join(inserted(filler, lines, depths))
        elif spec.haystack == "noise":
            context = " ".join(inserted([NOISE] * size, lines, depths))
        else:
            context = inserted_in_text(self.tokenizer.decode(prose[:size]), lines, depths)
        query = ", ".join(asked[:-1]) + " and " + asked[-1] if len(asked) > 1 else asked[0]
        asking = f"\nWhat are all the special magic {kind} for {query} mentioned in the text above?"
        question = (
            f"Some special magic {kind} are hidden within the following text. Memorise them: I will ask "
            f"you about these {kind} afterwards.\n{context}{asking}"
        )
        prefix = f" The special magic {kind} for {query} mentioned in the text above are"
        return Built(question, prefix, answers, depths, asking)

    def variable_tracking(self, draw: random.Random, size: int) -> Built:
        """One chain of four hops: a number assigned to a variable, then copied from variable to variable."""
        names = []
        while len(names) < 5:
            name = "".join(draw.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
            names += [name] if name not in names else []
        number = str(draw.randint(10_000, 99_999))
        chain = [f"VAR {names[0]} = {number}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
        depths = sorted(draw.sample(DEPTHS, len(chain)))
        context = " ".join(inserted([NOISE] * size, chain, depths))
        asking = f"\nQuestion: Find every variable that is assigned the value {number} in the text above."
        question = (
            "Memorise and follow the chain of variable assignments hidden in the following text.\n\n"
            f"{context}{asking}"
        )
        prefix = (
            f" Answer: Following the chain of assignments in the text above, {len(names)} variables are "
            f"assigned the value {number}, they are: "
        )
        return Built(question, prefix, names, depths, asking)

    def common_words(self, draw: random.Random, size: int, long: bool) -> Built:
        """Ten words repeated often among ``size`` words in a numbered list; one worked example first.

        Like RULER, below 4k tokens the common words appear 6 times and the others once, from 4k on
        30 and 3 times; the example is a shorter list of the same kind with its answer.
        """
        common_times, rare_times = (30, 3) if long else (6, 1)
        example_words, example_common, example_rare = (40, 10, 3) if long else (20, 3, 1)

        def listing(count: int, common: int, rare: int) -> tuple[str, list[str]]:
            chosen = draw.sample(self.words, max(count, 10))
            frequent = chosen[:10]
            words = frequent * common + chosen[10:] * rare
            draw.shuffle(words)
            return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words)), frequent

        asking = "\nQuestion: Which 10 words appear most often in the list above?"
        instruction = (
            "Below is a numbered list of words. Some of the words appear more often than the others; "
            "memorise the ones that appear most often.\n{context}" + asking
        )
        prefix = " Answer: The 10 words that appear most often in the list are:"
        example, example_answer = listing(example_words, example_common, example_rare)
        context, answers = listing(size, common_times, rare_times)
        shown = " ".join(f"{i + 1}. {word}" for i, word in enumerate(example_answer))
        question = (
            f"{instruction.format(context=example)}{prefix} {shown}\n\n{instruction.format(context=context)}"
        )
        return Built(question, prefix, answers, [], asking)

    def frequent_words(self, draw: random.Random, size: int) -> Built:
        """Made-up words with Zipf counts (alpha 2): the word of rank r appears ``size // r**2`` times."""
        vocabulary: list[str] = []
        while len(vocabulary) * len(vocabulary) < size:
            word = "".join(draw.choices("abcdefghijklmnopqrstuvwxyz", k=draw.randint(3, 6)))
            vocabulary += [word] if word not in vocabulary else []
        words = [word for rank, word in enumerate(vocabulary, 1) for _ in range(size // rank**2)]
        draw.shuffle(words)
        asking = (
            "\nQuestion: Without explaining, which three words appear most often in the coded text above?"
        )
        question = (
            "Read the following coded text and keep count of how often each coded word appears. Find the "
            f"three coded words that appear most often.\n{' '.join(words)}{asking}"
        )
        prefix = " Answer: The three words that appear most often in the coded text above are:"
        return Built(question, prefix, vocabulary[:3], [], asking)


def inserted(units: list[str], needles: list[str], depths: list[int]) -> list[str]:
    """``units`` with each needle placed at its depth (% of the units), in order."""
    result = list(units)
    for needle, depth in sorted(zip(needles, depths, strict=True), key=lambda pair: -pair[1]):
        result.insert(round(depth / 100 * len(units)), needle)
    return result


def inserted_in_text(text: str, needles: list[str], depths: list[int]) -> str:
    """``text`` with each needle inserted at the sentence end nearest before its depth (% of characters)."""
    ends = [0] + [match.end() for match in re.finditer(r"[.!?\n]\s+", text)] + [len(text)]
    pieces, last = [], 0
    for needle, depth in sorted(zip(needles, depths, strict=True), key=lambda pair: pair[1]):
        target = depth / 100 * len(text)
        cut = max((end for end in ends if end <= target), default=0)
        cut = max(cut, last)
        pieces += [text[last:cut], needle + " "]
        last = cut
    return "".join(pieces) + text[last:]


def largest_fitting(tokens_of: Callable[[int], int], budget: int, first: int = 64) -> int:
    """The largest size whose prompt has at most ``budget`` tokens (the count grows with the size).

    Each step predicts the size from the tokens per unit measured so far (prompts grow almost
    linearly) and keeps the sizes known to fit and not to fit, so a few tokenisations suffice.
    """
    base = tokens_of(0)
    if base > budget:
        raise ValueError(f"a RULER prompt without any haystack already has {base} > {budget} tokens")
    low, high, size = 0, None, first
    while high is None or high - low > 1:
        count = tokens_of(size)
        low, high = (size, high) if count <= budget else (low, size)
        guess = int(size * (budget - base) / max(count - base, 1))
        size = max(low + 1, guess if high is None else min(guess, high - 1))
    return low


@register_task
class Ruler(AnswerTask):
    name = "ruler"
    metric = "score"
    higher_is_better = True
    peer_supported = True

    def settings(self, model) -> tuple[list[str], tuple[int, ...], int]:
        options = self.options
        names = list(options.ruler_subtasks or SUBTASKS)
        unknown = [name for name in names if name not in SUBTASKS]
        if unknown:
            raise ValueError(
                f"unknown RULER subtask(s) {', '.join(unknown)}; choose from {', '.join(SUBTASKS)}"
            )
        limit = getattr(model.config, "max_position_embeddings", None)
        lengths = options.ruler_lengths or tuple(n for n in LENGTHS if limit is None or n <= limit)
        too_long = [n for n in lengths if limit is not None and n > limit]
        if too_long or any(n < 256 for n in lengths):
            raise ValueError(
                f"RULER lengths {', '.join(map(str, lengths))}: each must be >= 256 and at most the "
                f"model's {limit} positions"
            )
        if options.ruler_samples < 1:
            raise ValueError(f"--ruler-samples {options.ruler_samples} must be >= 1")
        return names, lengths, options.ruler_samples

    def asked(self, sample: Sample) -> Asked:
        """In the prompt (query-aware), or after the context is compressed (query-agnostic: the
        context is the prompt, the question and answer prefix are fed after compression)."""
        start = sample.facts.get("question_start")
        if self.options.ruler_question == "in-prompt":
            return Asked(sample.prompt, question_start=start)
        if start is None:
            raise ValueError(
                f"RULER sample {sample.id!r} does not say where its question starts (question_start), "
                "which --ruler-question after-compression needs: write the samples again"
            )
        return Asked(sample.prompt[:start], followup=sample.prompt[start:])

    def samples(self, tokenizer, model):
        if self.options.ruler_question not in QUESTION_SETTINGS:
            raise ValueError(
                f"ruler_question {self.options.ruler_question!r} must be one of "
                f"{', '.join(QUESTION_SETTINGS)}"
            )
        if self.options.samples_file is not None:
            return read_samples(self.options.samples_file)
        names, lengths, count = self.settings(model)
        generator = Generator(tokenizer, load_documents(self.options.data))
        samples = []
        for length in lengths:  # equal lengths and answer sizes side by side: batches need little padding
            for name in names:
                samples += [
                    generator.sample(name, length, index, self.options.seed) for index in range(count)
                ]
        return samples

    def scored(self, tokenizer, sample: Sample, answer: list[int], kv_tokens: float) -> dict:
        text = tokenizer.decode(until_eos(answer, tokenizer), skip_special_tokens=True)
        return {
            "metrics": {"score": string_match_all(text, sample.facts["answers"])},
            "kv_tokens": kv_tokens,
            "subtask": sample.facts["subtask"],
            "length": sample.facts["length"],
            "prediction": text,
        }

    def aggregate(self, results):
        """RULER's average: the mean over subtasks of each subtask's mean, then each subtask (and length)."""
        groups = subtask_groups(results)
        means = {name: sum(values) / len(values) for name, values in groups.items()}
        lengths = sorted({r["length"] for r in results})
        per_length = {}
        if len(lengths) > 1:
            for length in lengths:
                scores = [r["metrics"]["score"] for r in results if r["length"] == length]
                per_length[f"score@{length}"] = sum(scores) / len(scores)
        return {"score": sum(means.values()) / len(means), **per_length, **means}

    def bootstrap_terms(self, results):
        """Scores weighted by 1 / (samples of their subtask): their weighted mean is RULER's average."""
        sizes = {name: len(values) for name, values in subtask_groups(results).items()}
        return [r["metrics"]["score"] for r in results], [1 / sizes[r["subtask"]] for r in results], None

    def peer_job(self, sample):
        return {"kind": "generate", "prompt": sample.prompt, "new_tokens": sample.facts["new_tokens"]}

    def peer_result(self, tokenizer, sample, output):
        return self.scored(tokenizer, sample, output["tokens"], output["kv_tokens"])


def subtask_groups(results: list[dict]) -> dict[str, list[float]]:
    groups = defaultdict(list)
    for result in results:
        groups[result["subtask"]].append(result["metrics"]["score"])
    return dict(sorted(groups.items()))


def until_eos(tokens: list[int], tokenizer) -> list[int]:
    """The generated tokens before the first end-of-sequence token (later ones are padding)."""
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def write_samples(samples: list[Sample], path: str | Path) -> Path:
    """Writes RULER samples as JSONL (prompt text and ids, answers, answer length, score) for other tools."""
    path = Path(path)
    lines = [
        json.dumps(
            {
                "id": sample.id,
                "subtask": sample.facts["subtask"],
                "length": sample.facts["length"],
                "prompt": sample.facts["text"],
                "input_ids": sample.prompt,
                "answers": sample.facts["answers"],
                "depths": sample.facts["depths"],
                "question_start": sample.facts.get("question_start"),
                "max_new_tokens": sample.facts["new_tokens"],
                "metric": "string_match_all",
            }
        )
        for sample in samples
    ]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    temporary.replace(path)
    return path


def read_samples(path: str | Path) -> list[Sample]:
    """The samples :func:`write_samples` wrote, to run exactly them again (another seed, machine or tool)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RULER samples file {str(path)!r} does not exist")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            facts = {
                "subtask": record["subtask"],
                "length": record["length"],
                "text": record["prompt"],
                "answers": record["answers"],
                "new_tokens": record["max_new_tokens"],
                "depths": record.get("depths"),  # where the needles sit, when the writer recorded it
                "question_start": record.get("question_start"),  # the first token of the question
            }
            samples.append(Sample(record["id"], record["input_ids"], facts))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: line {number} is not a RULER sample ({error})") from None
    return samples
