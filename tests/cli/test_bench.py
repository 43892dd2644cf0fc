import json

import pytest
import torch

from squeezekv.bench import orchestrate
from squeezekv.bench.config import BenchConfig
from squeezekv.bench.shapes import build_model
from squeezekv.cli import main

FAST = ["--device", "cpu", "--prompt-tokens", "32", "--new-tokens", "5", "--reference-batch", "1"]
FAST += ["--budgets", "0.25", "--policies", "window", "--allocators", "uniform", "--baselines", "full"]
FAST += ["--repeats", "1"]


def never_run(config):
    raise AssertionError("the bench ran before its options were checked")


def test_a_config_json_shape_writes_the_report_where_asked(tmp_path, monkeypatch):
    model_folder = tmp_path / "models" / "my-llama"
    build_model("tiny", "cpu", 64).config.save_pretrained(model_folder)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    shape = "../models/my-llama/config.json"  # relative, with a folder
    assert main(["bench", "--shape", shape, *FAST, "--out", "results/today"]) == 0
    (json_path,) = (work / "results" / "today").glob("my-llama-*.json")
    assert json.loads(json_path.read_text())["config"]["shape"] == shape
    assert sorted(p.name for p in model_folder.iterdir()) == ["config.json"]  # nothing beside the config


def test_the_default_out_is_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--shape", "tiny", *FAST]) == 0
    assert len(list(tmp_path.glob("tiny-*.json"))) == 1 and len(list(tmp_path.glob("tiny-*.md"))) == 1


def test_a_bad_out_or_shape_fails_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(orchestrate, "benchmark", never_run)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["bench", "--shape", "tiny", *FAST, "--out", str(blocker / "results")]) == 2
    assert f"--out {str(blocker / 'results')!r} cannot be created as a folder" in capsys.readouterr().err
    assert main(["bench", "--shape", str(tmp_path / "missing.json"), *FAST, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing.json' is neither one of" in err and err.count("\n") == 1


def test_the_device_defaults_to_auto_and_a_bad_one_is_one_clear_error(tmp_path, monkeypatch, capsys):
    assert BenchConfig(shape="tiny").device == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(orchestrate, "benchmark", never_run)
    assert main(["bench", "--shape", "tiny", "--device", "foo", "--out", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "squeezekv: error: device 'foo' is not a device; allowed: cpu, cuda, cuda:N or auto\n"
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU and none is visible"):
            BenchConfig(shape="tiny", device="cuda")


def test_a_shape_too_large_for_this_cpu_is_refused_before_it_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(orchestrate, "benchmark", never_run)
    assert main(["bench", "--device", "cpu", "--shape", "llama2-70b", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "shape 'llama2-70b' needs 257.0 GiB of float32 weights on the CPU" in err and "--shape tiny" in err
