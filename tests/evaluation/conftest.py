"""A tiny model directory and small data files, shared by the evaluation tests."""

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from models import tiny_model

LINES = (
    "the cache keeps only some tokens of every layer and budget decides how many secret key is what",
    "in mind text below somewhere find it keep you will be asked for read answer question using",
    "above briefly paragraph abstract reply as summary code next line complete",
)
WORDS = [word for line in LINES for word in line.split()]
SYMBOLS = [str(digit) for digit in range(10)] + [".", ":", "?", ",", '"']


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-eval")
    words = list(dict.fromkeys(WORDS + SYMBOLS))
    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    assert len(vocabulary) <= 96
    core = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(path)
    tiny_model("llama").save_pretrained(path)
    return path


def documents(count: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"id": f"doc{i}", "text": " ".join(rng.choice(WORDS) for _ in range(words))} for i in range(count)
    ]


@pytest.fixture(scope="session")
def docs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps(doc) + "\n" for doc in documents(3, 200)))
    return path


@pytest.fixture
def eval_args(model_dir, docs_file, tmp_path):
    """Arguments of a small, fast ``squeezekv eval`` run on the tiny model; extend per test."""

    def build(
        task: str,
        out=None,
        grid=("--budgets", "0.5,500", "--policies", "h2o,window", "--allocators", "uniform,squeeze"),
    ):
        data = [] if task == "passkey" else ["--data", str(docs_file)]
        return [
            "eval",
            "--model",
            str(model_dir),
            "--task",
            task,
            "--out",
            str(out or tmp_path / task),
            "--device",
            "cpu",
            "--context",
            "48",
            "--score-tokens",
            "6",
            "--limit",
            "2",
            "--no-progress",
            *grid,
            *data,
        ]

    return build


def results(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines()]


def by_cell(directory) -> dict[str, dict[str, dict]]:
    """``{cell: {sample: result}}`` of a run directory."""
    table = {}
    for record in results(directory):
        table.setdefault(record["cell"], {})[record["sample"]] = record
    return table


@pytest.fixture(scope="session")
def reference():
    """The bundled reference model and tokenizer (25M parameters, held-out documents alongside)."""
    from squeezekv.loading import load_model

    return load_model(None, "cpu")
