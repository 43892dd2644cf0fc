"""Helpers every command shares: parsing values, the compression flags, devices, models and prompts."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

BUDGET_HELP = "a fraction of the prompt in (0, 1] (e.g. 0.2), or whole tokens per layer (e.g. 512)"
DEVICES = "cpu, cuda, cuda:N or auto"


def parse_budget(text: str) -> float | int:
    """``"0.2"`` is a fraction, ``"512"`` a token count (an integer literal means tokens)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a number: {BUDGET_HELP}") from None


def names(text: str) -> tuple[str, ...]:
    """The items of a comma-separated list, stripped, empty ones dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def budgets(text: str) -> tuple[float | int, ...]:
    """Comma-separated budgets: fractions like 0.2, or whole tokens per layer like 512."""
    try:
        return tuple(parse_budget(part) for part in names(text))
    except argparse.ArgumentTypeError as error:
        raise ValueError(str(error)) from None


def numbers(text: str | None, kind: type) -> tuple | None:
    """Comma-separated numbers of one ``kind``, or None when the option was not given."""
    if text is None:
        return None
    try:
        return tuple(kind(part) for part in names(text))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None


def parse_list(kind):
    """An argparse ``type`` for a comma-separated list of ``kind``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(item) for item in text.split(",") if item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}"
            ) from None

    return parse


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that ``config_from`` turns into a ``SqueezeConfig`` (the one place that does)."""
    from squeezekv import ALLOCATORS, POLICIES

    parser.add_argument("--budget", type=parse_budget, required=True, help=BUDGET_HELP)
    parser.add_argument("--policy", default="h2o", help=f"one of {', '.join(sorted(POLICIES))} (default h2o)")
    parser.add_argument(
        "--allocator", default="squeeze", help=f"one of {', '.join(sorted(ALLOCATORS))} (default squeeze)"
    )
    parser.add_argument(
        "--p", type=float, default=0.35, help="squeezed group's share of the budget (default 0.35)"
    )
    parser.add_argument("--groups", type=int, default=3, help="similarity clusters (default 3)")
    parser.add_argument("--sinks", type=int, default=4, help="streaming policy's sink tokens (default 4)")
    parser.add_argument("--recent-ratio", type=float, default=0.5, help="h2o's recent share of a budget")


def from_arguments(cls, args: argparse.Namespace):
    """Builds a configuration dataclass from the parsed options that share its field names."""
    return cls(
        **{field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)}
    )


def config_from(args: argparse.Namespace):
    """The ``SqueezeConfig`` of the flags ``add_compression_arguments`` added."""
    from squeezekv import SqueezeConfig

    return from_arguments(SqueezeConfig, args)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="a local model directory, or the name of a hub model already downloaded "
        "(default: the bundled reference model)",
    )
    parser.add_argument("--device", default="auto", help=f"{DEVICES} (default auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def resolve_device(text: str) -> str:
    """``auto`` becomes ``cuda`` or ``cpu``; a device this machine lacks is refused in one line."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"--device {text!r} is not a device; allowed: {DEVICES}")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise ValueError(f"--device {text!r} needs a CUDA GPU and none is visible; use --device cpu or auto")
    if match.group(1) is not None and int(match.group(1)) >= visible:
        raise ValueError(f"--device {text!r}: only cuda:0 to cuda:{visible - 1} are visible")
    return text


def model_name(name: str | None) -> str:
    """``--model``, or the bundled reference model's folder when it was not given."""
    if name is not None:
        return name
    from squeezekv.reference import reference_model_path

    return str(reference_model_path())


def load_model(name: str | None, device: str, dtype: str):
    """Tokenizer and model from a local folder or an already downloaded hub model; never downloads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    name = model_name(name)
    device = resolve_device(device)
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"model path {name!r} does not exist")
    if dtype == "auto" and device == "cpu":
        dtype = "float32"  # bf16 weights run far slower than float32 on a CPU
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch_dtype, attn_implementation="sdpa", local_files_only=True
        )
    except OSError as error:
        if Path(name).expanduser().is_dir():
            raise FileNotFoundError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
        raise FileNotFoundError(
            f"model {name!r} is not a local directory nor a downloaded hub model; squeezekv downloads "
            f"nothing: download it first (e.g. `hf download {name} --local-dir DIR`) and pass --model DIR"
        ) from None
    return tokenizer, model.to(device).eval()


def read_prompt(path: str | Path) -> str:
    """A prompt file's text; a missing, binary, non-UTF-8 or empty file is refused, named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"prompt file {str(path)!r} is not UTF-8 text (byte {error.start} cannot be decoded)"
        ) from None
    if "\x00" in text:
        raise ValueError(f"prompt file {str(path)!r} looks binary (it holds NUL bytes), not text")
    if not text.strip():
        raise ValueError(
            f"prompt file {str(path)!r} is empty or only whitespace: an empty prompt has nothing to continue"
        )
    return text
