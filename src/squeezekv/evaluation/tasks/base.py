"""What every task shares: its options, samples, the base class and the registry."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from squeezekv import SqueezeConfig
from squeezekv.evaluation.decoding import greedy_generate, pad_id


@dataclass(frozen=True)
class TaskOptions:
    """Task settings recorded in the run configuration (``None``: the task's default)."""

    data: str | None = None
    context: int | None = None
    score_tokens: int = 256
    passkey_lengths: tuple[int, ...] | None = None
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0
    ruler_subtasks: tuple[str, ...] | None = None
    ruler_lengths: tuple[int, ...] | None = None
    ruler_samples: int = 100
    samples_file: str | None = None  # run exactly these samples (a JSONL from --write-samples)
    ruler_question: str = (
        "in-prompt"  # or "after-compression": the question is asked once the context is compressed
    )
    engine: str = (
        "simple"  # how compressed cells generate: "simple" (session hooks) or "fast" (FastGenerator)
    )


@dataclass(frozen=True)
class Sample:
    """One unit of evaluation: its prompt as token ids plus task-specific, JSON-able facts."""

    id: str
    prompt: list[int]
    facts: dict = field(default_factory=dict)


class Task:
    """Base class; ``metric`` is the headline metric of the summary."""

    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    peer_supported: ClassVar[bool] = False
    relative: ClassVar[bool] = False  # the summary also shows the headline metric / full cache's
    heat_map: ClassVar[tuple[str, str] | None] = None  # result fields for the rows and columns of a heat map

    def __init__(self, options: TaskOptions) -> None:
        self.options = options

    def samples(self, tokenizer, model: nn.Module) -> list[Sample]:
        raise NotImplementedError

    def prepare(self, model: nn.Module, tokenizer, samples: list[Sample]) -> list[Any]:
        return [None] * len(samples)

    def evaluate(
        self,
        model: nn.Module,
        tokenizer,
        samples: list[Sample],
        prepared: list[Any],
        config: SqueezeConfig | None,
    ) -> list[dict]:
        """One result per sample: ``{"metrics": {...}, "kv_tokens": float, ...}``."""
        raise NotImplementedError

    def aggregate(self, results: list[dict]) -> dict[str, float]:
        """Metrics of a cell over samples (plain means unless a task knows better)."""
        names = results[0]["metrics"].keys()
        return {name: sum(r["metrics"][name] for r in results) / len(results) for name in names}

    def peer_job(self, sample: Sample) -> dict:
        raise ValueError(f"task {self.name!r} cannot run on a peer library")

    def peer_result(self, tokenizer, sample: Sample, output: dict) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class Asked:
    """What a sample feeds the model: the prompt, where its question starts (``None``: unknown) and
    the tokens asked after the prompt is compressed (``None``: none)."""

    prompt: list[int]
    question_start: int | None = None
    followup: list[int] | None = None


class AnswerTask(Task):
    """A task that generates a greedy answer per sample, ``facts["new_tokens"]`` tokens long at most,
    and scores it with :meth:`scored`; samples of one answer length are generated together. The
    answer ends at the tokenizer's end-of-sequence token (generation stops once all have it)."""

    def asked(self, sample: Sample) -> Asked:
        return Asked(sample.prompt)

    def evaluate(self, model, tokenizer, samples, prepared, config):
        groups = defaultdict(list)
        for index, sample in enumerate(samples):
            groups[sample.facts["new_tokens"]].append(index)
        results = [None] * len(samples)
        for new_tokens, indices in groups.items():
            asked = [self.asked(samples[i]) for i in indices]
            starts = [a.question_start for a in asked]
            followups = [a.followup for a in asked]
            answers, held = greedy_generate(
                model,
                [a.prompt for a in asked],
                new_tokens,
                config,
                pad_id(tokenizer),
                self.options.engine,
                question_starts=None if None in starts else starts,
                followups=None if None in followups else followups,
                stop_id=tokenizer.eos_token_id,
            )
            for i, answer in zip(indices, answers, strict=True):
                results[i] = self.scored(tokenizer, samples[i], answer, held)
        return results

    def scored(self, tokenizer, sample: Sample, answer: list[int], kv_tokens: float) -> dict:
        raise NotImplementedError


TASKS: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    TASKS[task.name] = task
    return task


def task_named(name: str, options: TaskOptions) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](options)


def model_context(model: nn.Module, default: int = 2048) -> int:
    """The model's usable context: its position limit, at most ``default``."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(default, limit) if limit else default
