"""What one ``squeezekv bench`` run measures, checked before anything is built."""

from __future__ import annotations

from dataclasses import dataclass

from squeezekv.bench.shapes import check_fits_in_memory, shape_config
from squeezekv.config import SqueezeConfig
from squeezekv.engine import WARM_STEPS
from squeezekv.loading import resolve_device
from squeezekv.peers import press_settings

BASELINES = ("hf_dynamic", "hf_static", "hf_static_gqa", "full")
# the bench sizes a press's batch from its kept tokens, the same in every layer for these (PyramidKV
# varies them per layer; observed attention needs eager attention, the whole score matrix per layer)
BENCH_PRESSES = {"kvpress": ("streaming", "snapkv")}


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. ``shape`` names an entry of ``SHAPES`` or a ``config.json`` path.

    Every path is warmed up with a run of the full length, then timed ``repeats`` times; the report
    gives the median and the spread. Each of ``kv_bits`` is a path of its own at the same KV memory
    (packed caches fit more sequences). ``peer`` adds a peer library's ``peer_presses``, run by the
    interpreter ``peer_python``.
    """

    shape: str = "llama2-7b"
    prompt_tokens: int = 8192
    new_tokens: int = 256
    reference_batch: int = 8
    budgets: tuple[float, ...] = (0.2,)
    policies: tuple[str, ...] = ("h2o", "window")
    allocators: tuple[str, ...] = ("squeeze", "uniform")
    kv_bits: tuple[int, ...] = (16,)
    baselines: tuple[str, ...] = BASELINES
    repeats: int = 3
    max_batch: int = 256
    device: str = "auto"
    seed: int = 0
    tp: int = 1
    device_map: str | None = None
    cuda_graphs: bool = True
    compile_layers: bool = True
    peer: str | None = None
    peer_python: str | None = None
    peer_presses: tuple[str, ...] = BENCH_PRESSES["kvpress"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", str(resolve_device(self.device)))  # frozen: resolved once, here
        shape_config(self.shape)  # a bad shape or config.json fails here, before any model is built
        if self.prompt_tokens < 1 or self.reference_batch < 1:
            raise ValueError("prompt_tokens and reference_batch must be >= 1")
        if self.new_tokens <= WARM_STEPS + 1:
            raise ValueError(
                f"new_tokens {self.new_tokens} must be > {WARM_STEPS + 1}: the fast engine's steps are "
                f"timed after its first {WARM_STEPS} (warm-up and CUDA-graph capture)"
            )
        if self.repeats < 1:
            raise ValueError(f"repeats {self.repeats} must be >= 1")
        if self.tp < 1:
            raise ValueError(f"tp {self.tp} must be >= 1")
        if self.tp > 1 and self.device_map is not None:
            raise ValueError("tp and device_map are two ways to spread a model: choose one")
        if self.device_map is not None and self.cuda_graphs:
            raise ValueError("a device_map decodes across devices, which CUDA graphs cannot capture")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {', '.join(BASELINES)}")
        for budget in self.budgets:
            for policy in self.policies:
                for allocator in self.allocators:
                    for bits in self.kv_bits:
                        SqueezeConfig(budget=budget, policy=policy, allocator=allocator, kv_bits=bits)
        if self.peer is not None:
            self.check_peer_settings()
        check_fits_in_memory(self.shape, self.device)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens

    def check_peer_settings(self) -> None:
        """Fails at once on a peer setting the bench cannot run, not after its own paths."""
        if self.peer not in BENCH_PRESSES:
            raise ValueError(f"unknown peer {self.peer!r}; choose one of {sorted(BENCH_PRESSES)}")
        offered = BENCH_PRESSES[self.peer]
        unknown = sorted(set(self.peer_presses) - set(offered))
        if unknown or not self.peer_presses:
            raise ValueError(
                f"unknown {self.peer} presses {unknown or list(self.peer_presses)}; the bench runs "
                f"{list(offered)} (presses that keep the same number of tokens in every layer)"
            )
        if self.tp > 1 or self.device_map is not None:
            spread = f"tp {self.tp}" if self.tp > 1 else f"device_map {self.device_map!r}"
            raise ValueError(f"peer {self.peer} runs on one device, not spread with {spread}")
        settings = press_settings()
        shortest = {"snapkv": settings["window"], "streaming": settings["sinks"]}
        for press in self.peer_presses:
            if self.prompt_tokens <= shortest[press]:
                raise ValueError(
                    f"{self.peer} {press} needs prompts longer than {shortest[press]} tokens, "
                    f"not {self.prompt_tokens}"
                )
