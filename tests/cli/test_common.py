import pytest
import torch

from squeezekv.cli import main
from squeezekv.cli.common import load_model, resolve_device
from squeezekv.reference import reference_model_path

CPU_ONLY = not torch.cuda.is_available()


def test_auto_and_cpu_resolve():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("device", ["foo", "gpu", "cuda:x", "cpu:0"])
def test_a_device_that_is_not_one_is_named_with_the_allowed_ones(device):
    with pytest.raises(
        ValueError, match=f"--device '{device}' is not a device; allowed: cpu, cuda, cuda:N or auto"
    ):
        resolve_device(device)


@pytest.mark.skipif(not CPU_ONLY, reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_says_so(device):
    with pytest.raises(ValueError, match=f"--device '{device}' needs a CUDA GPU and none is visible"):
        resolve_device(device)


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt-file", "data/sample_prompt.txt", "--budget", "0.2"],
        ["eval", "--task", "ppl", "--budgets", "0.2", "--out", "unused"],
        ["profile", "--stability"],
        ["bench", "--shape", "tiny"],
    ],
)
def test_every_command_refuses_a_bad_device_in_one_line(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(reference_model_path().parents[1])  # data/ is relative to the checkout
    assert main([*command, "--device", "foo"]) == 2
    err = capsys.readouterr().err
    assert err == "squeezekv: error: --device 'foo' is not a device; allowed: cpu, cuda, cuda:N or auto\n"
    if CPU_ONLY:
        assert main([*command, "--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("squeezekv: error: --device 'cuda' needs a CUDA GPU")
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize("name", ["gpt2", "squeezekv-tests/no-such-model"])
def test_a_hub_name_needs_a_downloaded_copy(name):
    with pytest.raises(FileNotFoundError, match="squeezekv downloads nothing: download it first"):
        load_model(name, "cpu", "auto")


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"), "cpu", "auto")


def test_the_default_model_is_the_bundled_one():
    tokenizer, model = load_model(None, "cpu", "auto")
    assert model.config.num_hidden_layers == 16 and model.dtype == torch.float32
    assert tokenizer.bos_token_id is not None
