import json

import pytest
import torch

from squeezekv import SqueezeConfig
from squeezekv.bench import GIB, BenchConfig, build_model, full_kv_bytes, markdown, run, write_report
from squeezekv.engine import kv_bytes_per_sequence, largest_batch

from models import tiny_model


def test_kv_bytes_per_sequence_counts_each_layer_budget_plus_the_free_slot():
    model = tiny_model("llama")  # 6 layers, 2 kv heads of 16, float64
    config = SqueezeConfig(budget=0.25)
    assert kv_bytes_per_sequence(model, config, 40, 8) == 6 * (10 + 1) * 2 * 2 * 16 * 8
    assert largest_batch(model, config, 40, 8, 10 * 6 * 11 * 2 * 2 * 16 * 8 + 1) == 10


def test_bench_runs_every_path_on_a_small_model(tmp_path):
    config = BenchConfig(
        shape="tiny", prompt_tokens=48, new_tokens=6, reference_batch=2, budgets=(0.25,),
        policies=("window", "h2o"), allocators=("squeeze",), baselines=("hf_dynamic", "full"), device="cpu",
    )  # fmt: skip
    report = run(config)
    paths = [m["path"] for m in report["measurements"]]
    assert paths == ["hf_dynamic", "full", "squeezekv window/squeeze b=0.25", "squeezekv h2o/squeeze b=0.25"]
    assert all(m["error"] is None and m["tokens_per_second"] > 0 for m in report["measurements"])
    compressed = report["measurements"][2]
    assert compressed["batch"] > config.reference_batch  # compressed caches fit more sequences
    assert (
        compressed["kv_gib"] < report["kv_memory_gib"] * 1.5
    )  # rows' budgets differ: buffers take the widest
    assert (
        report["chunked_prefill_peak_kv"]["h2o"]["chunked_bytes"]
        < report["chunked_prefill_peak_kv"]["h2o"]["whole_bytes"]
    )
    assert set(report["fast_equals_simple"]) == {"keep-all", "window", "h2o"}
    assert all(c["tokens_equal"] and c["kept_equal"] for c in report["fast_equals_simple"].values())
    assert "equals the simple path on this device" in markdown(report)
    json_path, markdown_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["config"]["shape"] == "tiny"
    assert markdown_path.read_text() == markdown(report)
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_bench_config_is_rejected():
    with pytest.raises(ValueError, match="shape 'gpt5'"):
        BenchConfig(shape="gpt5")
    with pytest.raises(ValueError, match="unknown baselines"):
        BenchConfig(baselines=("vllm",))
    with pytest.raises(ValueError, match="tp 0"):
        BenchConfig(tp=0)
    with pytest.raises(ValueError, match="choose one"):
        BenchConfig(tp=2, device_map="balanced", cuda_graphs=False)
    with pytest.raises(ValueError, match="CUDA graphs"):
        BenchConfig(device_map="balanced")


def test_tensor_parallel_bench_needs_that_many_gpus(capsys):
    from squeezekv.cli import main

    ranks = max(2, torch.cuda.device_count() + 1)
    assert main(["bench", "--shape", "tiny", "--tp", str(ranks)]) == 2
    assert f"--tp {ranks} needs {ranks} GPUs" in capsys.readouterr().err


def test_tensor_parallel_bench_reports_per_rank_numbers_from_rank_zero(tmp_path):
    from squeezekv.cli import main

    argv = ["bench", "--shape", "tiny", "--tp", "2", "--device", "cpu", "--prompt-tokens", "32"]
    argv += ["--new-tokens", "4", "--reference-batch", "2", "--policies", "window", "--allocators", "squeeze"]
    argv += ["--baselines", "full", "--out", str(tmp_path)]
    assert main(argv) == 0
    (json_path,) = tmp_path.glob("tiny-tp2-*.json")
    report = json.loads(json_path.read_text())
    assert report["config"]["tp"] == 2 and report["device"].startswith("2x ")
    assert all(m["error"] is None for m in report["measurements"])
    whole_model = build_model("tiny", "cpu", max_positions=36)
    # each rank holds half the heads, so half the full cache
    assert report["kv_memory_gib"] * GIB == full_kv_bytes(whole_model, batch=2, tokens=36) / 2
