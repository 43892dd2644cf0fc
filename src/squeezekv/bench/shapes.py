"""Real architectures' shapes with random weights: decode speed does not depend on weight values."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

SHAPES: dict[str, tuple[str, dict]] = {
    "llama2-7b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
    ),
    "mistral-7b": (
        "mistral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            sliding_window=None,
        ),
    ),
    "qwen2.5-7b": (
        "qwen2",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            use_sliding_window=False,
        ),
    ),
    "llama2-70b": (
        "llama",
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
    ),
    "tiny": (
        "llama",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
        ),
    ),
}


def shape_config(shape: str):
    """The transformers configuration of a ``SHAPES`` name or a ``config.json`` path; one clear error
    for anything else."""
    from transformers import AutoConfig

    if shape in SHAPES:
        model_type, kwargs = SHAPES[shape]
        return AutoConfig.for_model(model_type, **kwargs)
    if not Path(shape).is_file():
        raise ValueError(f"shape {shape!r} is neither one of {sorted(SHAPES)} nor a config.json file")
    try:
        return AutoConfig.from_pretrained(shape)
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"shape {shape!r} is not a model's config.json: {first}") from None


def weight_bytes(shape: str, device: str) -> int:
    """The bytes of a shape's weights as :func:`build_model` makes them (counted on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    return sum(p.numel() for p in model.parameters()) * (4 if device == "cpu" else 2)


def check_fits_in_memory(shape: str, device: str) -> None:
    """On a CPU, refuses a shape whose weights alone would not fit in this machine's memory."""
    if device != "cpu":
        return
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    needed = weight_bytes(shape, device)
    if needed > 0.8 * memory:
        raise ValueError(
            f"shape {shape!r} needs {needed / 2**30:.1f} GiB of float32 weights on the CPU, more than "
            f"this machine's {memory / 2**30:.1f} GiB allow; use --device cuda, or --shape tiny to try "
            "the bench here"
        )


def build_model(
    shape: str, device: str, max_positions: int, tp: int = 1, device_map: str | None = None
) -> nn.Module:
    """A causal LM of the named shape (or ``config.json`` path) with random weights (bf16 on a GPU).

    On one device it is built in place. Spread over GPUs, transformers loads it as a user would
    (``DistributedConfig(tp_size=tp)`` or ``device_map``) from a checkpoint that holds no weights,
    so every shard is initialised at random on its own device.
    """
    from transformers import AutoModelForCausalLM

    config = shape_config(shape)
    config.max_position_embeddings = max(config.max_position_embeddings, max_positions)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    if tp == 1 and device_map is None:
        config._attn_implementation = "sdpa"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        from safetensors.torch import save_file
        from transformers.distributed import DistributedConfig
        from transformers.utils import logging

        spread = {"device_map": device_map}
        if tp > 1:
            spread = {"distributed_config": DistributedConfig(tp_size=tp)}
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # every weight is missing on purpose: no report of them
        try:
            with tempfile.TemporaryDirectory() as weightless:
                config.save_pretrained(weightless)
                save_file({}, os.path.join(weightless, "model.safetensors"), metadata={"format": "pt"})
                model = AutoModelForCausalLM.from_pretrained(
                    weightless, dtype=dtype, attn_implementation="sdpa", **spread
                )
        finally:
            logging.set_verbosity(verbosity)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()
