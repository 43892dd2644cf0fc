"""Control for any layer signal: squeeze the layers a measured per-layer sensitivity says tolerate it.

``squeezekv profile --sensitivity FILE`` measures, on tuning documents, how much the held-out NLL
rises when only one layer is squeezed to ``p * b``. This allocator squeezes the least sensitive
layers, as many as ``squeeze`` would for the prompt (or ``squeezed`` of them), with squeeze's budget
rule, so the total stays ``L * b``. If even this does not beat ``uniform``, no layer signal can pay
on that model at that size of squeezed group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from squeezekv.allocators.base import register_allocator
from squeezekv.allocators.squeeze import Squeeze

SENSITIVITY_KIND = "squeezekv layer sensitivity"
IDENTITY_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
EMBEDDING_ROWS = 1024
NORM_TOLERANCE = 1e-3  # relative: float32, bfloat16 and float16 copies of one model agree far closer


def model_identity(model: nn.Module, name: str) -> dict:
    """What tells models apart in a sensitivity file: the text config's shape and the norm of the
    first ``EMBEDDING_ROWS`` input embeddings (two trainings of one architecture differ there; dtypes
    of one do not; a few rows cost nothing even for a large vocabulary)."""
    config = model.config.get_text_config()
    identity = {"name": name, **{field: getattr(config, field, None) for field in IDENTITY_FIELDS}}
    rows = model.get_input_embeddings().weight.detach()[:EMBEDDING_ROWS]
    identity["embedding_norm"] = float(rows.double().norm())
    return identity


def same_model(stored: dict, measured: dict) -> str | None:
    """``None`` when ``measured`` is the model ``stored`` describes, else what differs."""
    for field in IDENTITY_FIELDS:
        if stored.get(field) != measured[field]:
            return f"{field} {stored.get(field)!r} there, {measured[field]!r} here"
    norm, here = stored.get("embedding_norm"), measured["embedding_norm"]
    if not isinstance(norm, (int, float)) or abs(norm - here) > NORM_TOLERANCE * abs(here):
        return f"input embedding norm {norm!r} there, {here:.6g} here (other weights)"
    return None


def read_sensitivity(path: str | Path) -> dict:
    """A sensitivity file's contents, checked; a missing or malformed file is refused, named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sensitivity file {str(path)!r} does not exist; write it with `squeezekv profile --sensitivity`"
        )
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"sensitivity file {str(path)!r} is not readable JSON: {error}") from None
    if not isinstance(stored, dict) or stored.get("kind") != SENSITIVITY_KIND:
        raise ValueError(f'{str(path)!r} is not a sensitivity file (no "kind": {SENSITIVITY_KIND!r})')
    model, delta = stored.get("model"), stored.get("delta_nll")
    if not isinstance(model, dict) or not isinstance(model.get("num_hidden_layers"), int):
        raise ValueError(f"sensitivity file {str(path)!r}: missing the model's identity and layer count")
    if (
        not isinstance(delta, list)
        or len(delta) != model["num_hidden_layers"]
        or not all(isinstance(value, (int, float)) for value in delta)
    ):
        raise ValueError(
            f"sensitivity file {str(path)!r}: delta_nll must hold one number per layer "
            f"({model['num_hidden_layers']})"
        )
    return stored


@register_allocator
@dataclass(frozen=True)
class Oracle(Squeeze):
    """``profile``: a sensitivity JSON; ``squeezed``: how many layers to squeeze (0: as many as
    ``squeeze`` would for this prompt, a size-matched control). ``p`` and ``groups`` are squeeze's."""

    name = "oracle"
    profile: str = ""
    squeezed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(
            bool(self.profile), "profile", "a sensitivity JSON written by `squeezekv profile --sensitivity`"
        )
        stored = read_sensitivity(self.profile)
        layers = len(stored["delta_nll"])
        self.require(
            0 <= self.squeezed < layers, "squeezed", f"in [0, {layers}) for the {layers} layers profiled"
        )
        # least sensitive first; ties to the lower layer
        order = sorted(range(layers), key=lambda layer: (stored["delta_nll"][layer], layer))
        object.__setattr__(self, "_stored", stored)
        object.__setattr__(self, "_order", order)

    def check_model(self, model: nn.Module) -> None:
        stored = self._stored["model"]
        difference = same_model(stored, model_identity(model, ""))
        if difference is not None:
            raise ValueError(
                f"allocator 'oracle': {self.profile!r} was measured on another model "
                f"({stored.get('name')!r}): {difference}"
            )

    def squeezed_layers(self, similarity: torch.Tensor) -> torch.Tensor:
        layers = similarity.numel()
        if layers != len(self._order):
            raise ValueError(
                f"allocator 'oracle': {self.profile!r} holds {len(self._order)} layers, the model {layers}"
            )
        count = self.squeezed or int(super().squeezed_layers(similarity).sum())
        squeezed = torch.zeros(layers, dtype=torch.bool)
        squeezed[self._order[:count]] = True
        return squeezed
