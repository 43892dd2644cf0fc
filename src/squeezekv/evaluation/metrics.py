"""Scores: language-modelling quantities and LongBench's answer metrics, each a pure function.

The answer metrics follow LongBench's definitions: QA-F1 over normalised word tokens, ROUGE-L F1,
classification and retrieval by which labels or paragraph numbers an answer names, and code edit
similarity of the first code line; RULER's are string matches of every expected answer (all) or of
any (part). Every metric returns a value in [0, 1] for one prediction against its reference answers.
:func:`paired_bootstrap` puts a confidence interval on a difference between two cells.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def perplexity(nll: list[float]) -> float:
    """exp of the mean negative log-likelihood (natural log) per token."""
    if not nll:
        raise ValueError("perplexity of zero tokens is undefined")
    return math.exp(sum(nll) / len(nll))


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` negative log-likelihood of each target under ``logits`` ``[..., T, vocab]``."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || compressed) per position, in nats, over the last (vocabulary) dimension."""
    reference = F.log_softmax(reference_logits.float(), dim=-1)
    compressed = F.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - compressed)).sum(-1).clamp(min=0.0)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no English articles, single spaces (SQuAD-style)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_f1(prediction: str, answer: str) -> float:
    """Word-overlap F1 between normalised prediction and answer."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, answer: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words)."""
    from rouge_score import rouge_scorer

    if not prediction.strip() or not answer.strip():
        return 0.0
    return rouge_scorer.RougeScorer(["rougeL"]).score(answer, prediction)["rougeL"].fmeasure


def classification(prediction: str, answer: str, classes: list[str]) -> float:
    """1/k when the answer's class is among the k classes the prediction names, else 0.

    A named class that is only a substring of the right one (e.g. "location" in "other location")
    does not count against it.
    """
    named = [label for label in classes if label in prediction]
    named = [label for label in named if not (label in answer and label != answer)]
    return 1.0 / len(named) if answer in named else 0.0


def retrieval(prediction: str, answer: str) -> float:
    """Share of the numbers in the prediction that equal the answer's paragraph number."""
    wanted = re.findall(r"\d+", answer)
    numbers = re.findall(r"\d+", prediction)
    if not wanted or not numbers:
        return 0.0
    return sum(number == wanted[0] for number in numbers) / len(numbers)


def count(prediction: str, answer: str) -> float:
    """Share of the numbers in the prediction that equal the expected count."""
    numbers = re.findall(r"\d+", prediction)
    return sum(number == answer.strip() for number in numbers) / len(numbers) if numbers else 0.0


def code_similarity(prediction: str, answer: str) -> float:
    """Edit similarity (0-1) of the answer to the prediction's first line of code.

    Lines that open a code fence or are comments are skipped, since a model often starts with them.
    """
    from rapidfuzz import fuzz

    lines = [line for line in prediction.lstrip("\n").split("\n") if line.strip()]
    code = next((line for line in lines if not line.lstrip().startswith(("`", "#", "//"))), "")
    return fuzz.ratio(code, answer) / 100.0


def best_of(metric, prediction: str, answers: list[str], **kwargs) -> float:
    """A metric against the best-matching of several reference answers."""
    return max(metric(prediction, answer, **kwargs) for answer in answers)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER: the share of the expected answers that occur in the prediction (case-insensitive)."""
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """RULER's QA score: 1 when any of the accepted answers occurs in the prediction."""
    text = prediction.lower()
    return float(any(answer.lower() in text for answer in answers))


@dataclass(frozen=True)
class Interval:
    """A statistic's difference between two cells with its bootstrap confidence interval."""

    difference: float
    low: float
    high: float

    @property
    def decided(self) -> bool:
        """Whether the interval excludes zero (one cell is better at the chosen level)."""
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    weights: Sequence[float] | None = None,
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """``statistic(A) - statistic(B)`` over the same samples, with a percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are the two cells' values on sample ``i``; each resample draws the samples
    (not the cells) with replacement, so the interval reflects only how much the comparison depends
    on which samples were drawn. A cell's statistic is the ``weights``-weighted mean of its values,
    optionally mapped through ``statistic(mean_a, mean_b)`` (which then returns the difference to
    report, e.g. a relative change). A fixed ``seed`` makes a summary reproducible.
    """
    a_values, b_values = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_values.shape != b_values.shape or a_values.ndim != 1 or not len(a_values):
        raise ValueError(f"paired samples need two equal, non-empty lists (got {len(a)} and {len(b)})")
    w = np.ones_like(a_values) if weights is None else np.asarray(weights, dtype=float)
    compare = statistic or (lambda mean_a, mean_b: mean_a - mean_b)
    draws = np.random.default_rng(seed).integers(0, len(a_values), size=(resamples, len(a_values)))
    chosen = w[draws]
    totals = chosen.sum(1)
    replicated = compare(
        (a_values[draws] * chosen).sum(1) / totals, (b_values[draws] * chosen).sum(1) / totals
    )
    point = compare(np.array([(a_values * w).sum() / w.sum()]), np.array([(b_values * w).sum() / w.sum()]))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(replicated, [tail, 100 - tail])
    return Interval(float(point[0]), float(low), float(high))
