"""The serving benchmark: a reproducible trace, every path served, equal memory checked."""

import json

import pytest

from squeezekv.bench.workload import Workload, check_workload_memory, poisson_trace
from squeezekv.cli import main


def test_the_trace_is_seeded_and_within_its_ranges():
    workload = Workload(requests=200, rate=4.0, prompt_range=(1024, 16384), answer_range=(32, 512), seed=3)
    trace = poisson_trace(workload, vocabulary=100)
    assert trace == poisson_trace(workload, vocabulary=100)
    lengths = [len(item.prompt) for item in trace]
    assert min(lengths) >= 1024 and max(lengths) <= 16384
    assert sum(length < 4096 for length in lengths) > 80  # log-uniform: half below the geometric middle
    assert all(32 <= item.max_tokens <= 512 for item in trace)
    gaps = [later.arrival - earlier.arrival for earlier, later in zip(trace, trace[1:], strict=False)]
    assert all(gap >= 0 for gap in gaps) and 0.15 < sum(gaps) / len(gaps) < 0.35  # mean 1 / rate
    with pytest.raises(ValueError, match="--answer-range 9,3"):
        Workload(answer_range=(9, 3))
    with pytest.raises(ValueError, match="--hf-compile-level 4 must be 0, 1, 2 or 3"):
        Workload(hf_compile_level=4)


def tiny_trace(requests: int, prompts: str, answers: str) -> list[str]:
    """``bench --workload`` on the tiny shape, on the CPU, at the memory of 2 full caches."""
    arguments = ["bench", "--workload", "poisson", "--shape", "tiny", "--device", "cpu", "--rate", "50"]
    arguments += ["--requests", str(requests), "--prompt-range", prompts, "--answer-range", answers]
    return [*arguments, "--reference-batch", "2"]


def test_the_workload_bench_serves_every_path_at_equal_memory(tmp_path, capsys):
    arguments = tiny_trace(3, "16,64", "3,6")
    arguments += ["--budgets", "0.5", "--policies", "h2o", "--allocators", "squeeze", "--out", str(tmp_path)]
    assert main(arguments) == 0
    (report_path,) = tmp_path.glob("tiny-serving-*.json")
    report = json.loads(report_path.read_text())
    paths = {result["path"]: result for result in report["results"]}
    assert set(paths) == {"hf_continuous", "full", "h2o/squeeze"}
    for name, result in paths.items():
        assert result["error"] is None and result["completed"] == 3, name
        assert result["ttft_p50_ms"] > 0 and result["tpot_p99_ms"] >= result["tpot_p50_ms"] > 0
    assert (
        paths["h2o/squeeze"]["kv_peak_bytes"]
        < paths["full"]["kv_peak_bytes"]
        <= report["workload"]["kv_memory"]
    )
    out, err = capsys.readouterr()
    assert "| h2o/squeeze | 0.5 | 3 |" in out
    # the files are rewritten after every path, so a run stopped midway keeps the paths it finished
    done = [line.split(" (")[0] for line in err.splitlines() if " done, " in line]
    assert done == ["hf_continuous", "full", "h2o/squeeze"]
    report["results"][1]["kv_peak_bytes"] = report["workload"]["kv_memory"] + 1
    with pytest.raises(ValueError, match="over the KV memory limit: full held"):
        check_workload_memory(report)


def test_the_workload_bench_runs_only_the_baselines_asked_for(tmp_path):
    arguments = tiny_trace(2, "16,32", "2,4")
    arguments += ["--baselines", "hf_static", "--budgets", "0.5", "--policies", "window"]
    arguments += ["--allocators", "uniform"]
    assert main([*arguments, "--out", str(tmp_path)]) == 0
    (report_path,) = tmp_path.glob("tiny-serving-*.json")
    assert [r["path"] for r in json.loads(report_path.read_text())["results"]] == [
        "hf_continuous",
        "window/uniform",
    ]
