"""Helpers every command shares: parsing values, the compression flags, devices, models and prompts."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from squeezekv.loading import DEVICES
from squeezekv.ops.quantize import KEY_GROUP_TOKENS

BUDGET_HELP = "a fraction of the prompt in (0, 1] (e.g. 0.2), or whole tokens per layer (e.g. 512)"
KV_BITS_HELP = (
    "key-value precision: 16 (the model's dtype, default), 8 or 4 (packed codes; the simple path only)"
)
KV_GROUP_HELP = (
    "tokens sharing a key scale when quantized, also the residual window's unquantized columns: 16, "
    "32, 64 (default) or 128; a smaller group costs more scale bytes and a cheaper window"
)
EQUAL_BYTES_HELP = (
    "the budget counts 16-bit tokens' bytes: a quantized cache keeps as many tokens as fit in them "
    "(scales counted; docs/quantization.md)"
)


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


def specs(text: str) -> tuple[str, ...]:
    """Comma-separated policy or allocator specs: ``uniform,squeeze:p=0.5,groups=4`` is two, since a
    ``setting=value`` item continues the spec before it."""
    found: list[str] = []
    for part in names(text):
        if "=" in part and ":" not in part and found:
            found[-1] += "," + part
        else:
            found.append(part)
    return tuple(found)


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


def setting_flags() -> dict[str, tuple[type, list[str]]]:
    """Every policy's and allocator's setting, with its type and the parts that have it, from the
    dataclass fields: a new policy or allocator brings its flags along."""
    from squeezekv.allocators import ALLOCATORS
    from squeezekv.components import setting_types
    from squeezekv.policies import POLICIES

    flags: dict[str, tuple[type, list[str]]] = {}
    for registry in (POLICIES, ALLOCATORS):
        for name, cls in sorted(registry.items()):
            for setting, kind in setting_types(cls).items():
                flags.setdefault(setting, (kind, []))[1].append(name)
    return flags


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that ``config_from`` turns into a ``SqueezeConfig`` (the one place that does)."""
    from squeezekv import ALLOCATORS, POLICIES

    parser.add_argument("--budget", type=parse_budget, required=True, help=BUDGET_HELP)
    parser.add_argument(
        "--policy",
        default="h2o",
        help=f"one of {', '.join(sorted(POLICIES))}, or a spec like snapkv:window=64",
    )
    parser.add_argument(
        "--allocator",
        default="squeeze",
        help=f"one of {', '.join(sorted(ALLOCATORS))}, or a spec like squeeze:p=0.5 (default squeeze)",
    )
    parser.add_argument("--kv-bits", type=int, default=16, help=KV_BITS_HELP)
    parser.add_argument("--equal-bytes", action="store_true", help=EQUAL_BYTES_HELP)
    parser.add_argument("--kv-group", type=int, default=KEY_GROUP_TOKENS, help=KV_GROUP_HELP)
    for setting, (kind, owners) in setting_flags().items():
        parser.add_argument(
            f"--{setting.replace('_', '-')}", dest=setting, type=kind, help=f"setting of {', '.join(owners)}"
        )


def from_arguments(cls, args: argparse.Namespace):
    """Builds a configuration dataclass from the parsed options that share its field names."""
    return cls(
        **{field.name: getattr(args, field.name) for field in fields(cls) if hasattr(args, field.name)}
    )


def config_from(args: argparse.Namespace):
    """The ``SqueezeConfig`` of the flags ``add_compression_arguments`` added; a setting flag goes to
    the chosen policy or allocator that has it (one that neither has is refused, named)."""
    from squeezekv import SqueezeConfig

    settings = {
        name: getattr(args, name) for name in setting_flags() if getattr(args, name, None) is not None
    }
    return SqueezeConfig.build(
        budget=args.budget,
        policy=args.policy,
        allocator=args.allocator,
        kv_bits=args.kv_bits,
        equal_bytes=args.equal_bytes,
        kv_group=args.kv_group,
        **settings,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="a local model folder, a .gguf file or a folder holding one, or the name of a hub model already "
        "downloaded (default: the bundled reference model)",
    )
    parser.add_argument("--device", default="auto", help=f"{DEVICES} (default auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def model_name(name: str | None) -> str:
    """``--model``, or the bundled reference model's folder when it was not given."""
    if name is not None:
        return name
    from squeezekv.reference import reference_model_path

    return str(reference_model_path())


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
