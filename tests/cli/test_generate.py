import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from squeezekv.cli import main

from models import tiny_model

WORDS = [
    "the",
    "cache",
    "keeps",
    "only",
    "some",
    "tokens",
    "of",
    "every",
    "layer",
    "and",
    "the",
    "budget",
    "decides",
    "how",
    "many",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(path)
    model = tiny_model("llama")
    model.save_pretrained(path)
    return path


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(" ".join(WORDS * 4))
    return path


def generate(model_dir, prompt_file, *arguments) -> int:
    """``squeezekv generate`` on the tiny model, on the CPU, with the given extra options."""
    return main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompt-file",
            str(prompt_file),
            "--device",
            "cpu",
            *arguments,
        ]
    )


def test_generate_prints_continuation_and_report(model_dir, prompt_file, capsys):
    code = generate(model_dir, prompt_file, "--budget", "0.3", "--max-new-tokens", "4")
    out = capsys.readouterr().out
    assert code == 0
    assert "similarity" in out and "KV cache kept:" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 6  # one row per layer


def test_generate_json_has_the_same_facts(model_dir, prompt_file, capsys):
    code = generate(
        model_dir, prompt_file, "--budget", "12", "--policy", "snapkv", "--allocator", "pyramid",
        "--max-new-tokens", "3", "--json",
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["prompt_tokens"] == [60]
    assert sum(report["layer_budget"][0]) == 6 * 12
    assert report["kv_bytes_kept"] < report["kv_bytes_full"]
    assert report["config"]["policy"]["name"] == "snapkv"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--budget", "0"], "budget 0 must be >= 1"),
        (["--budget", "1.5"], "budget 1.5 is a fraction"),
        (["--budget", "0.3", "--p", "0"], "p=0.0 must be in (0, 1]"),
        (["--budget", "0.3", "--groups", "1"], "groups=1"),
        (["--budget", "0.3", "--allocator", "uniform", "--p", "0.5"], "no setting 'p'"),
        (["--budget", "4", "--policy", "streaming"], "sinks=4"),
        (["--budget", "0.3", "--policy", "lru"], "unknown policy 'lru'"),
        (["--budget", "0.3", "--allocator", "fair"], "unknown allocator 'fair'"),
    ],
)
def test_bad_options_exit_with_one_readable_line(model_dir, prompt_file, capsys, arguments, message):
    code = generate(model_dir, prompt_file, *arguments)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err


def test_missing_model_path_and_prompt_file(model_dir, prompt_file, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "nope"),
                "--prompt-file",
                str(prompt_file),
                "--budget",
                "0.3",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompt-file",
                str(tmp_path / "x.txt"),
                "--budget",
                "0.3",
            ]
        )
        == 2
    )
    assert "prompt file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty or only whitespace"),
        (b"  \n\t\n", "is empty or only whitespace"),
        (b"\xff\xfe\x00caf\xe9", "is not UTF-8 text"),
        (b"cache\x00\x01\x02keeps", "looks binary"),
    ],
)
def test_unusable_prompt_files_are_refused_by_name(model_dir, tmp_path, capsys, content, message):
    path = tmp_path / "prompt.txt"
    path.write_bytes(content)
    assert generate(model_dir, path, "--budget", "0.3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"prompt file {str(path)!r}" in err and message in err


def test_too_long_prompt(model_dir, tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text(" ".join(WORDS * 20))
    assert generate(model_dir, long, "--budget", "0.3") == 2
    assert "exceeds the model's maximum of 256 positions" in capsys.readouterr().err


def test_progress_goes_to_stderr_and_json_stays_clean(model_dir, prompt_file, capsys):
    assert generate(model_dir, prompt_file, "--budget", "0.3", "--max-new-tokens", "5", "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["decode_steps"] >= 1  # stdout is exactly one JSON object
    assert "5/5" in captured.err and "generating" in captured.err
    assert generate(model_dir, prompt_file, "--budget", "0.3", "--max-new-tokens", "5", "--no-progress") == 0
    assert capsys.readouterr().err == ""
