"""kvpress beside squeezekv in ``squeezekv bench``: plumbing through a stand-in kvpress whose presses keep
everything, plus a real kvpress run when ``SQUEEZEKV_KVPRESS_PYTHON`` names the Python of an environment
that has it."""

import json
import os

import pytest
import torch
import transformers

from squeezekv.bench import peer as bench_peer
from squeezekv.bench.config import BenchConfig
from squeezekv.bench.orchestrate import benchmark
from squeezekv.bench.peer import kvpress_kept_tokens
from squeezekv.bench.report import markdown
from squeezekv.bench.shapes import build_model
from squeezekv.cli import main
from squeezekv.engine import kv_bytes_per_token

PROMPT, NEW, REFERENCE = 40, 6, 2  # the reference batch's full cache: 2 x 46 tokens


def bench_args(python, out, budgets="1.0,0.25"):
    """A small, fast ``squeezekv bench`` run with kvpress beside it; without ``python``, no --peer-python."""
    args = ["bench", "--shape", "tiny", "--device", "cpu", "--prompt-tokens", str(PROMPT)]
    args += ["--new-tokens", str(NEW), "--reference-batch", str(REFERENCE), "--budgets", budgets]
    args += ["--policies", "window", "--allocators", "uniform", "--baselines", "full", "--out", str(out)]
    args += ["--repeats", "1"]
    return args + ["--peer", "kvpress"] + ([] if python is None else ["--peer-python", str(python)])


@pytest.fixture(scope="module")
def token_bytes():
    return kv_bytes_per_token(build_model("tiny", "cpu", PROMPT + NEW))


def peer_rows(report) -> dict[str, dict]:
    return {m["path"]: m for m in report["measurements"] if m["path"].startswith("kvpress ")}


def test_kvpress_keeps_its_own_count_of_prompt_tokens():
    assert kvpress_kept_tokens(40, 0.2) == 7  # 40 * (1 - 0.8) is a hair under 8
    assert kvpress_kept_tokens(8192, 0.2) == 1638
    assert kvpress_kept_tokens(48, 0.25) == 12
    assert kvpress_kept_tokens(40, 20) == 20  # whole tokens
    assert kvpress_kept_tokens(40, 512) == 40  # more than the prompt keeps it all
    assert kvpress_kept_tokens(40, 0.001) == 1


def test_peer_rows_come_last_at_the_batch_that_fits_the_same_memory(stand_in_python, tmp_path, token_bytes):
    assert main(bench_args(stand_in_python, tmp_path)) == 0
    (json_path,) = tmp_path.glob("tiny-*.json")
    report = json.loads(json_path.read_text())
    paths = [m["path"] for m in report["measurements"]]
    assert paths == ["full", "squeezekv window/uniform b=1.0", "squeezekv window/uniform b=0.25"] + [
        f"kvpress {press} b={budget}" for budget in (1.0, 0.25) for press in ("streaming", "snapkv")
    ]
    assert report["peer"] == {
        "library": "kvpress",
        "main_process_gib_allocated": None,  # on the CPU
        "kvpress": "0.0.0",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    rows = peer_rows(report)
    for press in ("streaming", "snapkv"):
        # budget 1.0 keeps the whole prompt plus every new token: the reference batch fits exactly
        whole = rows[f"kvpress {press} b=1.0"]
        assert whole["error"] is None and whole["batch"] == REFERENCE
        assert whole["extra"] == {"kept_prompt_tokens": PROMPT}
        assert whole["kv_bytes"] == REFERENCE * (PROMPT + NEW - 1) * token_bytes
        assert whole["prefill_seconds"] > 0 and whole["decode_ms_per_step"] > 0 and whole["roofline_ms"] > 0
        assert whole["tokens_per_second"] == pytest.approx(REFERENCE * 1000 / whole["decode_ms_per_step"])
        assert whole["peak_gib"] is None
        # budget 0.25 keeps 10 prompt tokens: 2 x 46 tokens of memory hold 5 sequences of 10 + 6; the
        # stand-in kept all 40, which the bench reports instead of numbers at another memory
        quarter = rows[f"kvpress {press} b=0.25"]
        assert quarter["batch"] == REFERENCE * (PROMPT + NEW) // (10 + NEW) == 5
        assert quarter["error"] == "kept [40] prompt tokens per layer, the batch was sized for 10"
    assert "kvpress 0.0.0 ran eagerly in its own environment (transformers" in markdown(report)


def test_a_failing_runner_fails_its_unfinished_jobs_only(monkeypatch):
    config = BenchConfig(shape="tiny", prompt_tokens=PROMPT, new_tokens=NEW, peer="kvpress", device="cpu")
    request = bench_peer.peer_request(config, "unused", 0, memory=3 * (7 + NEW) * 1000, token_bytes=1000)

    def runner(peer, python, request):
        yield {"versions": {"kvpress": "0.5.5"}}
        yield {**request["jobs"][0], "error": "out of memory: CUDA out of memory"}
        raise ValueError("the kvpress runner failed: Killed")

    monkeypatch.setattr(bench_peer, "run_runner", runner)
    recorded = []
    assert bench_peer.measure_peer(config, request, recorded.append) == {"kvpress": "0.5.5"}
    assert [(m.path, m.batch, m.error) for m in recorded] == [
        ("kvpress streaming b=0.2", 3, "out of memory: CUDA out of memory"),
        ("kvpress snapkv b=0.2", 3, "the kvpress runner failed: Killed"),
    ]


def test_bad_peer_settings_are_rejected(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown peer 'vllm'; choose one of"):
        BenchConfig(peer="vllm")
    with pytest.raises(ValueError, match=r"unknown kvpress presses \['pyramid'\]; the bench runs"):
        BenchConfig(peer="kvpress", peer_presses=("snapkv", "pyramid"))
    with pytest.raises(ValueError, match=r"unknown kvpress presses \[\]"):
        BenchConfig(peer="kvpress", peer_presses=())
    with pytest.raises(ValueError, match="peer kvpress runs on one device, not spread with tp 2"):
        BenchConfig(peer="kvpress", tp=2)
    with pytest.raises(ValueError, match="not spread with device_map 'balanced'"):
        BenchConfig(peer="kvpress", device_map="balanced", cuda_graphs=False)
    with pytest.raises(ValueError, match="kvpress snapkv needs prompts longer than 32 tokens, not 32"):
        BenchConfig(peer="kvpress", prompt_tokens=32)
    BenchConfig(shape="tiny", peer="kvpress", prompt_tokens=32, peer_presses=("streaming",))
    assert main(bench_args(None, tmp_path)) == 2
    assert "--peer kvpress needs --peer-python" in capsys.readouterr().err
    assert main(bench_args(tmp_path / "nope", tmp_path)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*bench_args(tmp_path / "nope", tmp_path), "--peer-presses", "magic"]) == 2
    assert "unknown kvpress presses ['magic']" in capsys.readouterr().err


@pytest.mark.skipif(
    not os.environ.get("SQUEEZEKV_KVPRESS_PYTHON"),
    reason="set SQUEEZEKV_KVPRESS_PYTHON to a Python with kvpress",
)
def test_real_kvpress_keeps_what_the_batch_was_sized_for(token_bytes):
    config = BenchConfig(
        shape="tiny", prompt_tokens=PROMPT, new_tokens=NEW, reference_batch=REFERENCE, budgets=(0.2,),
        policies=("window",), allocators=("uniform",), baselines=(), device="cpu", peer="kvpress", repeats=1,
        peer_python=os.environ["SQUEEZEKV_KVPRESS_PYTHON"],
    )  # fmt: skip
    report = benchmark(config)
    kept = kvpress_kept_tokens(PROMPT, 0.2)
    assert kept == 7 != int(PROMPT * 0.2)
    batch = REFERENCE * (PROMPT + NEW) // (kept + NEW)
    rows = peer_rows(report)
    assert list(rows) == ["kvpress streaming b=0.2", "kvpress snapkv b=0.2"]
    for row in rows.values():
        assert row["error"] is None and row["batch"] == batch == 7
        assert row["extra"] == {"kept_prompt_tokens": kept}  # every layer kept that many
        assert row["kv_bytes"] == batch * (kept + NEW - 1) * token_bytes
        assert row["tokens_per_second"] > 0
    assert report["peer"]["transformers"] != transformers.__version__  # its own environment
    assert report["peer"]["kvpress"]
