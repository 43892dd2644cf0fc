import json

import pytest
import torch

from squeezekv import SqueezeConfig
from squeezekv.bench import measure
from squeezekv.bench.config import BenchConfig
from squeezekv.bench.orchestrate import MemoryLimitExceeded, benchmark, check_memory, full_kv_bytes
from squeezekv.bench.report import markdown, write_report
from squeezekv.bench.shapes import build_model
from squeezekv.cli import main
from squeezekv.engine import kv_bytes_per_sequence, largest_batch

from models import tiny_model

SMALL = ["--shape", "tiny", "--device", "cpu", "--prompt-tokens", "48", "--new-tokens", "6"]
SMALL += ["--reference-batch", "2", "--repeats", "1", "--budgets", "0.25"]


def test_kv_bytes_per_sequence_counts_each_layer_budget_plus_the_free_slot():
    model = tiny_model("llama")  # 6 layers, 2 kv heads of 16, float64
    config = SqueezeConfig(budget=0.25)
    assert kv_bytes_per_sequence(model, config, 40, 8) == 6 * (10 + 1) * 2 * 2 * 16 * 8
    assert largest_batch(model, config, 40, 8, 10 * 6 * 11 * 2 * 2 * 16 * 8 + 1) == 10


def test_bench_runs_every_path_within_the_kv_limit(tmp_path):
    config = BenchConfig(
        shape="tiny", prompt_tokens=48, new_tokens=6, reference_batch=2, budgets=(0.25,),
        policies=("window", "h2o"), allocators=("squeeze",), baselines=("hf_dynamic", "full"),
        device="cpu", repeats=2,
    )  # fmt: skip
    report = benchmark(config)
    rows = {m["path"]: m for m in report["measurements"]}
    assert list(rows) == [
        "hf_dynamic",
        "full",
        "squeezekv window/squeeze b=0.25",
        "squeezekv h2o/squeeze b=0.25",
    ]
    limit = report["kv_limit_bytes"]
    assert limit == full_kv_bytes(build_model("tiny", "cpu", 54), 2, 54)
    for m in rows.values():
        assert m["error"] is None and m["tokens_per_second"] > 0
        assert len(m["decode_ms_runs"]) == 2
        assert m["decode_ms_per_step"] == pytest.approx(sum(m["decode_ms_runs"]) / 2)  # median of two
        assert 0 < m["kv_bytes"] <= limit
    assert rows["full"]["kv_bytes"] == limit  # every token written, nothing more
    compressed = rows["squeezekv window/squeeze b=0.25"]
    assert compressed["batch"] > config.reference_batch  # compressed caches fit more sequences
    check_memory(report)
    assert (
        report["chunked_prefill_peak_kv"]["h2o"]["chunked_bytes"]
        < report["chunked_prefill_peak_kv"]["h2o"]["whole_bytes"]
    )
    assert set(report["fast_equals_simple"]) == {"keep-all", "window", "h2o"}
    assert all(c["tokens_equal"] and c["kept_equal"] for c in report["fast_equals_simple"].values())
    text = markdown(report)
    assert "equals the simple path on this device" in text
    assert "Ratios against `hf_dynamic`, the fastest transformers path here" in text
    json_path, markdown_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["config"]["shape"] == "tiny"
    assert markdown_path.read_text() == text
    assert not list(tmp_path.glob("*.tmp"))


def test_a_path_over_the_kv_limit_fails_the_run_and_names_itself(tmp_path, monkeypatch, capsys):
    # without the cut to the rows that really fit, squeeze's ragged per-row budgets overflow the limit
    monkeypatch.setattr(
        measure, "fitting_rows", lambda budget, token_bytes, limit, row_bytes: budget.shape[0]
    )
    argv = ["bench", *SMALL, "--policies", "window", "--allocators", "squeeze", "--baselines", ""]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    (json_path,) = tmp_path.glob("tiny-*.json")  # the table is kept
    report = json.loads(json_path.read_text())
    (row,) = report["measurements"]
    limit = report["kv_limit_bytes"]
    assert row["kv_bytes"] > limit
    assert "squeezekv window/squeeze b=0.25 (batch 8)" in error
    assert f"held {row['kv_bytes']} bytes" in error and f"limit of {limit} bytes" in error
    assert "OVER" in (tmp_path / json_path.name.replace(".json", ".md")).read_text()


def test_check_memory_passes_at_the_limit_and_fails_above_it():
    report = {
        "kv_limit_bytes": 100,
        "measurements": [
            {"path": "full", "batch": 2, "kv_bytes": 100},
            {"path": "broken", "batch": 1, "kv_bytes": None},
        ],
    }
    check_memory(report)
    report["measurements"].append({"path": "squeezekv h2o/squeeze b=0.1", "batch": 82, "kv_bytes": 121})
    with pytest.raises(
        MemoryLimitExceeded, match=r"limit of 100 bytes .*h2o/squeeze b=0.1 \(batch 82\) held 121"
    ):
        check_memory(report)


def test_bad_bench_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="shape 'gpt5'"):
        BenchConfig(shape="gpt5")
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="is not a model's config.json"):
        BenchConfig(shape=str(broken))
    with pytest.raises(ValueError, match="unknown baselines"):
        BenchConfig(baselines=("vllm",))
    with pytest.raises(ValueError, match="repeats 0"):
        BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="new_tokens 3 must be > 3"):
        BenchConfig(new_tokens=3)
    with pytest.raises(ValueError, match="tp 0"):
        BenchConfig(tp=0)
    with pytest.raises(ValueError, match="choose one"):
        BenchConfig(tp=2, device_map="balanced", cuda_graphs=False)
    with pytest.raises(ValueError, match="CUDA graphs"):
        BenchConfig(device_map="balanced")


def test_tensor_parallel_bench_needs_that_many_gpus(capsys):
    ranks = max(2, torch.cuda.device_count() + 1)
    assert main(["bench", "--shape", "tiny", "--tp", str(ranks), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert f"--tp {ranks} needs {ranks} GPUs" in err or "needs a CUDA GPU and none is visible" in err


def test_tensor_parallel_bench_reports_per_rank_numbers_from_rank_zero(tmp_path):
    argv = ["bench", "--shape", "tiny", "--tp", "2", "--device", "cpu", "--prompt-tokens", "32"]
    argv += ["--new-tokens", "4", "--reference-batch", "2", "--policies", "window", "--allocators", "squeeze"]
    argv += ["--baselines", "full", "--repeats", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    (json_path,) = tmp_path.glob("tiny-tp2-*.json")
    report = json.loads(json_path.read_text())
    assert report["config"]["tp"] == 2 and report["device"].startswith("2x ")
    assert all(m["error"] is None for m in report["measurements"])
    whole_model = build_model("tiny", "cpu", max_positions=36)
    # each rank holds half the heads, so half the full cache
    assert report["kv_limit_bytes"] == full_kv_bytes(whole_model, batch=2, tokens=36) / 2


def test_new_policies_are_benched_and_a_reconstructing_one_prefills_whole():
    config = BenchConfig(
        shape="tiny", prompt_tokens=48, new_tokens=4, reference_batch=2, budgets=(0.25,),
        policies=("chunkkv", "reconstruct", "adakv"), allocators=("uniform",), baselines=("full",),
        device="cpu", repeats=1,
    )  # fmt: skip
    report = benchmark(config)
    assert all(m["error"] is None and m["tokens_per_second"] > 0 for m in report["measurements"])
    assert all(c["tokens_equal"] and c["kept_equal"] for c in report["fast_equals_simple"].values())
    assert report["chunked_prefill_peak_kv"]["reconstruct"]["chunked_bytes"] is None
    assert set(report["prefill_overhead"]) == {"chunkkv", "reconstruct", "adakv"}
    assert "reconstruct: " in markdown(report) and "no chunks (it scores the whole prompt)" in markdown(
        report
    )
