import pytest
import torch

from squeezekv.cli import main
from squeezekv.cli.common import specs
from squeezekv.loading import load_model
from squeezekv.reference import reference_model_path

CPU_ONLY = not torch.cuda.is_available()


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
    assert err == "squeezekv: error: device 'foo' is not a device; allowed: cpu, cuda, cuda:N or auto\n"
    if CPU_ONLY:
        assert main([*command, "--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("squeezekv: error: device 'cuda' needs a CUDA GPU")
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize("name", ["gpt2", "squeezekv-tests/no-such-model"])
def test_a_hub_name_needs_a_downloaded_copy(name):
    with pytest.raises(FileNotFoundError, match="needs a downloaded copy"):
        load_model(name, "cpu", "auto")


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"), "cpu", "auto")


def test_the_default_model_is_the_bundled_one():
    tokenizer, model = load_model(None, "cpu", "auto")
    assert model.config.num_hidden_layers == 16 and model.dtype == torch.float32
    assert tokenizer.bos_token_id is not None


def test_specs_keep_a_spec_with_several_settings_whole():
    assert specs("uniform, squeeze:p=0.5,groups=4,pyramid") == (
        "uniform",
        "squeeze:p=0.5,groups=4",
        "pyramid",
    )
    assert specs("snapkv:window=64") == ("snapkv:window=64",)


def test_every_setting_of_every_part_is_a_flag(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = capsys.readouterr().out
    for flag in ("--p", "--groups", "--sinks", "--recent-ratio", "--window", "--kernel", "--beta", "--share"):
        assert flag in shown


def test_kv_bits_and_equal_bytes_reach_the_config():
    import argparse

    from squeezekv.cli.common import add_compression_arguments, config_from

    parser = argparse.ArgumentParser()
    add_compression_arguments(parser)
    config = config_from(parser.parse_args(["--budget", "0.2", "--kv-bits", "4", "--equal-bytes"]))
    assert (config.kv_bits, config.equal_bytes) == (4, True)
    settings = ["--budget", "0.2", "--allocator", "squeeze-bits", "--low-bits", "8", "--high-bits", "16"]
    assert config_from(parser.parse_args(settings)).allocator.spec == "squeeze-bits:low_bits=8,high_bits=16"
    with pytest.raises(ValueError, match="kv_bits=12 is not supported; choose one of 16, 8, 4"):
        config_from(parser.parse_args(["--budget", "0.2", "--kv-bits", "12"]))
