"""The evaluation grid: which cells a run holds and the configuration it is recorded under."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

from squeezekv import SqueezeConfig
from squeezekv.allocators import resolve_allocator
from squeezekv.allocators.precision import PrecisionAllocator
from squeezekv.engine import check_fast_engine
from squeezekv.evaluation.decoding import QuantizedFullCache
from squeezekv.evaluation.tasks import TaskOptions
from squeezekv.ops.quantize import KEY_GROUP_TOKENS

FULL = "full"
OWN = "squeezekv"
QUANTIZED = "transformers-quantized"  # transformers' QuantizedCache: every token, fewer bits


@dataclass(frozen=True)
class Cell:
    """One column of results: the full cache, a squeezekv setting, a peer library's press, or
    transformers' ``QuantizedCache`` at ``kv_bits`` (like the full cache, the same at every budget).

    ``kv_bits`` below 16 marks a quantized squeezekv cell (its key and row say so; 16 reads as before).
    """

    method: str
    policy: str = ""
    allocator: str = ""
    budget: float | int | None = None
    kv_bits: int = 16

    @property
    def key(self) -> str:
        if self.method == FULL:
            return FULL
        if self.method == OWN:
            bits = f"/{self.kv_bits}bit" if self.kv_bits != 16 else ""
            return f"{self.policy}/{self.allocator}/{self.budget}{bits}"
        if self.method == QUANTIZED:
            return f"{QUANTIZED}/{self.kv_bits}bit"
        return f"{self.method}:{self.policy}/{self.budget}"

    @property
    def row(self) -> str:
        """The summary row the cell belongs to (budgets are the columns)."""
        if self.method == FULL:
            return "full cache"
        if self.method == OWN:
            bits = f" × {self.kv_bits}-bit" if self.kv_bits != 16 else ""
            return f"{self.policy} × {self.allocator}{bits}"
        if self.method == QUANTIZED:
            return f"transformers QuantizedCache × {self.kv_bits}-bit"
        return f"{self.method} {self.policy}"


def plans_bits(allocator: str) -> bool:
    """Whether ``allocator`` decides each layer's bits itself: its cells sit at kv_bits 16 only."""
    return isinstance(resolve_allocator(allocator), PrecisionAllocator)


@dataclass(frozen=True)
class EvalConfig:
    """A run's configuration, stored as ``config.json``.

    ``limit``, ``device``, ``batch_size`` and ``peer_python`` say how much of a run to do, where and
    how fast, not what a result means, so a resumed run may change them (a larger ``limit`` extends
    a run). The grid's axes (``AXES``) may grow at their end: the stored cells keep their results
    and only the new ones run. Every other field must match.

    ``kv_bits`` is a grid axis (every policy × allocator × budget at each precision; an allocator
    that plans bits itself, such as ``squeeze-bits``, gets one cell per budget). With
    ``equal_bytes`` every budget counts 16-bit tokens' bytes, so quantized cells keep more tokens
    (:class:`~squeezekv.SqueezeConfig`); ``kv_group`` is every quantized cell's key group (and
    residual window). ``quantized_cache``: the bits of transformers' ``QuantizedCache`` cells, the
    peer of ``kv_bits`` (every token kept at 2 or 4 bits).
    """

    task: str
    model: str
    budgets: tuple[float | int, ...]
    policies: tuple[str, ...]
    allocators: tuple[str, ...]
    limit: int | None = None
    dtype: str = "auto"
    options: TaskOptions = field(default_factory=TaskOptions)
    peer: str | None = None
    peer_presses: tuple[str, ...] = ()
    device: str = "auto"
    batch_size: int = 4
    peer_python: str | None = None
    kv_bits: tuple[int, ...] = (16,)
    equal_bytes: bool = False
    kv_group: int = KEY_GROUP_TOKENS
    quantized_cache: tuple[int, ...] = ()

    RUNTIME: ClassVar[tuple[str, ...]] = ("limit", "device", "batch_size", "peer_python")
    AXES: ClassVar[tuple[str, ...]] = ("budgets", "policies", "allocators", "peer_presses", "quantized_cache")

    def __post_init__(self) -> None:
        if not self.budgets or not self.policies or not self.allocators or not self.kv_bits:
            raise ValueError("--budgets, --policies, --allocators and --kv-bits each need at least one value")
        for cell in self.cells():  # every own and quantized cell's settings checked before anything runs
            if cell.method in (OWN, QUANTIZED):
                setting = self.cache_setting(cell)
                if self.options.engine == "fast" and isinstance(setting, SqueezeConfig):
                    check_fast_engine(setting)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be >= 1")

    def cells(self) -> list[Cell]:
        own = [
            Cell(OWN, policy, allocator, budget, bits)
            for bits in self.kv_bits
            for policy in self.policies
            for allocator in self.allocators
            if bits == 16 or not plans_bits(allocator)
            for budget in self.budgets
        ]
        peers = [Cell(self.peer, press, "", budget) for press in self.peer_presses for budget in self.budgets]
        quantized = [Cell(QUANTIZED, kv_bits=bits) for bits in self.quantized_cache]
        return [Cell(FULL), *quantized, *own, *peers]

    def cache_setting(self, cell: Cell) -> SqueezeConfig | QuantizedFullCache | None:
        """What a cell runs with: ``None`` (the full cache), transformers' ``QuantizedCache`` or a
        squeezekv configuration (a peer's press runs in the peer's own process)."""
        if cell.method == FULL:
            return None
        if cell.method == QUANTIZED:
            return QuantizedFullCache(cell.kv_bits)
        return self.own_config(cell.budget, cell.policy, cell.allocator, cell.kv_bits)

    def own_config(
        self, budget: float | int, policy: str, allocator: str, kv_bits: int = 16
    ) -> SqueezeConfig:
        """``policy`` and ``allocator`` are names or specs (``squeeze:p=0.5``)."""
        return SqueezeConfig(
            budget=budget, policy=policy, allocator=allocator, kv_bits=kv_bits, equal_bytes=self.equal_bytes,
            kv_group=self.kv_group,
        )  # fmt: skip

    def identity(self) -> dict:
        """The fields that decide what a run measures (JSON-shaped, for comparing with a stored run)."""
        record = to_json(self)
        return {name: value for name, value in record.items() if name not in self.RUNTIME}


def to_json(config: EvalConfig) -> dict:
    """``config`` as plain JSON types (tuples become lists); the precision fields and
    ``quantized_cache`` only when not at their defaults, so that a run recorded before they existed
    still resumes."""
    record = json.loads(json.dumps(dataclasses.asdict(config)))
    if record["kv_bits"] == [16]:
        del record["kv_bits"]
    if not record["equal_bytes"]:
        del record["equal_bytes"]
    if record["kv_group"] == KEY_GROUP_TOKENS:
        del record["kv_group"]
    if not record["quantized_cache"]:
        del record["quantized_cache"]
    return record
