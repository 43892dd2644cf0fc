"""GGUF files: finding the one a path means, and checking the optional packages that read it.

transformers reads a GGUF (weights, tokenizer and chat template) only with the ``gguf`` and
``accelerate`` packages installed; they are the optional extra ``squeezekv[gguf]``, so a missing one
is a one-line error naming the file, the package and the command that installs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REQUIRED = ("gguf", "accelerate")
INSTALL = 'pip install "squeezekv[gguf]"'


def gguf_file(path: Path) -> Path | None:
    """The GGUF ``path`` names: the file itself, or the only ``*.gguf`` of a folder (``None``: no GGUF).

    A folder with a Hugging Face ``config.json`` is read as a Hugging Face folder even if it also holds
    GGUF files; a folder with several GGUFs and no ``config.json`` is ambiguous and refused.
    """
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {str(path)!r} is not a .gguf file; pass a .gguf or a model folder")
        return path
    if (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ValueError(f"model folder {str(path)!r} holds several .gguf files ({names}); pass one of them")
    return found[0] if found else None


def check_packages(file: Path) -> None:
    """Raises ImportError naming ``file``, the first missing package and the install command."""
    for package in REQUIRED:
        if importlib.util.find_spec(package) is None:
            raise ImportError(
                f"reading {str(file)!r} needs the {package!r} package, which is not installed; run: {INSTALL}"
            )


def unmark_quantized(model) -> None:
    """Lets ``save_pretrained`` write a model read from a GGUF.

    transformers dequantises a GGUF's weights to ordinary tensors but keeps a loader-only quantizer
    on the model, which refuses to serialise; without it the weights save as plain safetensors.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
