"""Loading a model the way users have it: the bundled reference model, a Hugging Face folder or a GGUF.

A GGUF is dequantised on every load (about 90 s of CPU for a 135M model), so :func:`convert` writes
it once as a safetensors folder (weights, tokenizer, chat template, configuration and generation
configuration) that later loads read in seconds.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch

from squeezekv.gguf import check_packages, gguf_file, unmark_quantized

DEVICES = "cpu, cuda, cuda:N or auto"
DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(text: str | torch.device) -> torch.device:
    """``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device; a
    device this machine lacks is refused in one line."""
    text = str(text)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"device {text!r} is not a device; allowed: {DEVICES}")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise ValueError(f"device {text!r} needs a CUDA GPU and none is visible; use cpu or auto")
    if match.group(1) is not None and int(match.group(1)) >= visible:
        raise ValueError(f"device {text!r}: only cuda:0 to cuda:{visible - 1} are visible")
    return torch.device(text)


def _torch_dtype(dtype: str, device: torch.device):
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        # a GGUF is dequantised to float32 anyway, and bf16 weights run far slower on a CPU
        return torch.float32 if device.type == "cpu" else "auto"
    return getattr(torch, dtype)


def locate(name: str | None) -> tuple[Path, Path | None]:
    """The model folder ``name`` means and, for a GGUF, the file inside it."""
    if name is None:
        from squeezekv.reference import reference_model_path

        return reference_model_path(), None
    path = Path(name).expanduser()
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1:
            raise FileNotFoundError(f"model path {name!r} does not exist")
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")  # a hub model downloaded earlier
        if not isinstance(cached, str):
            raise FileNotFoundError(
                f"model {name!r} is not on disk; squeezekv downloads nothing, so a hub name needs a "
                f"downloaded copy: `hf download {name} --local-dir DIR`, then pass DIR"
            )
        path = Path(cached).parent
    file = gguf_file(path)
    if file is None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {name!r} holds neither a config.json nor a .gguf file")
    return (file.parent if file else path), file


def load_model(name: str | None, device: str = "auto", dtype: str = "auto"):
    """``(tokenizer, model)`` in eval mode on ``device``; ``name=None`` is the bundled reference model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    target = resolve_device(device)
    torch_dtype = _torch_dtype(dtype, target)
    folder, file = locate(name)
    extra = {}
    if file is not None:
        check_packages(file)
        extra = {"gguf_file": file.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, attn_implementation="sdpa", **extra
        )
    except OSError as error:
        raise FileNotFoundError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    return tokenizer, model.to(target).eval()


def convert(source: str | None, out_folder: str | Path, dtype: str = "auto") -> Path:
    """Writes the model ``source`` names (see :func:`load_model`) as a safetensors folder; returns it."""
    refuse_existing(out_folder)
    return save_folder(*load_model(source, "cpu", dtype), out_folder)


def refuse_existing(out_folder: str | Path) -> None:
    out = Path(out_folder).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {str(out)!r} already exists and is not an empty folder")


def save_folder(tokenizer, model, out_folder: str | Path) -> Path:
    """Saves weights, configuration, generation configuration, tokenizer and chat template at ``out_folder``.

    The folder is written next to its destination under a temporary name and renamed when complete,
    so an interrupted conversion leaves nothing behind that looks like a model.
    """
    refuse_existing(out_folder)
    out = Path(out_folder).expanduser()
    unmark_quantized(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        staging.chmod(0o755)  # mkdtemp made it private; a model folder is read like any other
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
