"""LongBench-format tasks: ``context`` + ``input`` through a per-dataset template, scored on ``answers``.

Each record names its ``dataset``, which fixes the prompt template, the generation length and the
metric (QA-F1, ROUGE-L, classification, retrieval, counting or code similarity), as LongBench
defines them. Over-long prompts are cut in the middle, keeping the start and the end. XSum and
CNN/DailyMail files in the same format are scored with ROUGE-L.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from squeezekv.evaluation import metrics
from squeezekv.evaluation.data import read_jsonl
from squeezekv.evaluation.tasks.base import AnswerTask, Sample, model_context, register_task


@dataclass(frozen=True)
class Dataset:
    template: str
    new_tokens: int
    metric: str
    first_line: bool = False  # few-shot datasets: the answer is the first line of the output


STORY_QA = (
    "Read the story below, then answer the question in as few words as you can.\n\nStory: {context}\n\n"
    "Answer the question in as few words as you can, without explaining.\n\nQuestion: {input}\n\nAnswer:"
)
PAPER_QA = (
    "Read the scientific article below, then answer the question in a phrase or a sentence. If the "
    'article does not answer it, write "unanswerable"; for a yes/no question write "yes", "no" or '
    '"unanswerable".\n\nArticle: {context}\n\nQuestion: {input}\n\nAnswer:'
)
TEXT_QA = (
    "Read the text below.\n\n{context}\n\nUsing only the text above, answer briefly.\n\n"
    "Question: {input}\nAnswer:"
)
MULTI_HOP = (
    "Answer the question using the passages below. Give only the answer, nothing else.\n\n{context}\n\n"
    "Give only the answer, nothing else.\n\nQuestion: {input}\nAnswer:"
)
REPORT = "Below is a report. Write a summary of it of about one page.\n\nReport:\n{context}\n\nSummary:"
MEETING = (
    "Below is a meeting transcript and a query about it. Answer the query in a few sentences.\n\n"
    "Transcript:\n{context}\n\nQuery: {input}\nAnswer:"
)
NEWS = "Below are several news articles. Write one summary covering all of them.\n\n{context}\n\nSummary:"
FEW_SHOT_TYPE = (
    "Give the category of the last question, following the labelled examples.\n\n{context}\n{input}"
)
FEW_SHOT_QA = "Answer the last question in the same way as the examples.\n\n{context}\n\n{input}"
FEW_SHOT_DIALOGUE = "Summarise the last dialogue in the same way as the examples.\n\n{context}\n\n{input}"
COUNT = (
    "Below are several paragraphs, some of them repeated. How many different paragraphs are there?\n\n"
    "{context}\n\nReply with the number of different paragraphs only.\nThe answer is: "
)
RETRIEVE = (
    "Below are several numbered paragraphs and then an abstract. Which paragraph does the abstract "
    'summarise?\n\n{context}\n\nAbstract: {input}\n\nReply as "Paragraph N".\nThe answer is: '
)
CODE = "Complete the code below.\n{context}Next line of code:\n"
REPO_CODE = "Complete the code below.\n{context}{input}Next line of code:\n"
ONE_SENTENCE = "Summarise the article below in one sentence.\n\n{context}\n\nSummary:"
ARTICLE = "Summarise the news article below in a few sentences.\n\n{context}\n\nSummary:"

DATASETS = {
    "narrativeqa": Dataset(STORY_QA, 128, "qa_f1"),
    "qasper": Dataset(PAPER_QA, 128, "qa_f1"),
    "multifieldqa_en": Dataset(TEXT_QA, 64, "qa_f1"),
    "hotpotqa": Dataset(MULTI_HOP, 32, "qa_f1"),
    "2wikimqa": Dataset(MULTI_HOP, 32, "qa_f1"),
    "musique": Dataset(MULTI_HOP, 32, "qa_f1"),
    "gov_report": Dataset(REPORT, 512, "rouge_l"),
    "qmsum": Dataset(MEETING, 512, "rouge_l"),
    "multi_news": Dataset(NEWS, 512, "rouge_l"),
    "trec": Dataset(FEW_SHOT_TYPE, 64, "classification", first_line=True),
    "triviaqa": Dataset(FEW_SHOT_QA, 32, "qa_f1", first_line=True),
    "samsum": Dataset(FEW_SHOT_DIALOGUE, 128, "rouge_l", first_line=True),
    "passage_count": Dataset(COUNT, 32, "count"),
    "passage_retrieval_en": Dataset(RETRIEVE, 32, "retrieval"),
    "lcc": Dataset(CODE, 64, "code_similarity"),
    "repobench-p": Dataset(REPO_CODE, 64, "code_similarity"),
    "xsum": Dataset(ONE_SENTENCE, 64, "rouge_l"),
    "cnn_dailymail": Dataset(ARTICLE, 128, "rouge_l"),
}
METRICS = {
    "qa_f1": metrics.qa_f1,
    "rouge_l": metrics.rouge_l,
    "classification": metrics.classification,
    "retrieval": metrics.retrieval,
    "count": metrics.count,
    "code_similarity": metrics.code_similarity,
}
FIELDS = {"context": str, "input": str, "answers": list, "dataset": str}


def record_problem(record: dict) -> str | None:
    """What is wrong with a LongBench record beyond the field types, if anything."""
    name = record["dataset"]
    if name not in DATASETS:
        return f"field 'dataset': unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
    answers = record["answers"]
    if not answers or not all(isinstance(answer, str) for answer in answers):
        return "field 'answers' must be a non-empty list of strings"
    classes = record.get("all_classes")
    if DATASETS[name].metric == "classification" and not (
        isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
    ):
        return f"field 'all_classes' must list the labels of classification dataset {name!r}"
    return None


def middle_truncated(ids: list[int], limit: int) -> list[int]:
    """At most ``limit`` tokens, cutting from the middle: the instructions and the question survive."""
    if len(ids) <= limit:
        return ids
    half = limit // 2
    return ids[:half] + ids[len(ids) - (limit - half) :]


def score(dataset: str, prediction: str, answers: list[str], classes: list[str] | None) -> float:
    spec = DATASETS[dataset]
    if spec.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    extra = {"classes": classes} if spec.metric == "classification" else {}
    return metrics.best_of(METRICS[spec.metric], prediction, answers, **extra)


@register_task
class LongBench(AnswerTask):
    name = "longbench"
    metric = "score"
    higher_is_better = True
    peer_supported = True

    def samples(self, tokenizer, model):
        if self.options.data is None:
            raise ValueError("task 'longbench' needs --data FILE.jsonl (LongBench format)")
        records = read_jsonl(self.options.data, FIELDS, record_problem)
        context = self.options.context or model_context(model, 4096)
        samples = []
        for index, record in enumerate(records):
            spec = DATASETS[record["dataset"]]
            text = spec.template.format(context=record["context"], input=record["input"])
            ids = tokenizer(text).input_ids
            limit = context - spec.new_tokens
            if limit < 1:
                raise ValueError(f"--context {context} leaves no room for {record['dataset']!r} prompts")
            facts = {
                "dataset": record["dataset"],
                "answers": record["answers"],
                "classes": record.get("all_classes"),
                "new_tokens": spec.new_tokens,
            }
            samples.append(Sample(str(record.get("_id", index)), middle_truncated(ids, limit), facts))
        return samples

    def scored(self, tokenizer, sample: Sample, answer: list[int], kv_tokens: float) -> dict:
        text = tokenizer.decode(answer, skip_special_tokens=True)
        facts = sample.facts
        value = score(facts["dataset"], text, facts["answers"], facts["classes"])
        return {
            "metrics": {"score": value},
            "kv_tokens": kv_tokens,
            "dataset": facts["dataset"],
            "prediction": text,
        }

    def aggregate(self, results):
        """The mean over datasets of each dataset's mean score, plus every dataset's own mean."""
        by_dataset = defaultdict(list)
        for result in results:
            by_dataset[result["dataset"]].append(result["metrics"]["score"])
        means = {name: sum(values) / len(values) for name, values in sorted(by_dataset.items())}
        return {"score": sum(means.values()) / len(means), **means}

    def peer_job(self, sample):
        return {"kind": "generate", "prompt": sample.prompt, "new_tokens": sample.facts["new_tokens"]}

    def peer_result(self, tokenizer, sample, output):
        return self.scored(tokenizer, sample, output["tokens"], output["kv_tokens"])
