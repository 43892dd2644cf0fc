"""``squeezekv bench``: throughput and memory against the full cache and plain transformers.

Models are built from a real architecture's shape with random weights (speed does not depend on
weight values). Every path decodes the same prompts in the same process, so ratios are measured
side by side:

- ``hf_dynamic``: ``model.generate`` with its default dynamic cache, at the reference batch;
- ``hf_static``: ``model.generate(cache_implementation="static")``, which transformers compiles;
- ``full``: squeezekv's fast engine keeping every token, at the reference batch;
- ``squeezekv``: the fast engine at each budget / policy / allocator, at the largest batch whose
  compressed caches fit the memory the full cache needs for the reference batch.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from squeezekv.config import SqueezeConfig
from squeezekv.engine import FastGenerator, largest_batch, synchronized

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
GIB = 2**30


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. ``shape`` names an entry of ``SHAPES`` or a ``config.json`` path."""

    shape: str = "llama2-7b"
    prompt_tokens: int = 8192
    new_tokens: int = 256
    reference_batch: int = 8
    budgets: tuple[float, ...] = (0.2,)
    policies: tuple[str, ...] = ("h2o", "window")
    allocators: tuple[str, ...] = ("squeeze", "uniform")
    baselines: tuple[str, ...] = ("hf_dynamic", "hf_static", "full")
    max_batch: int = 256
    device: str = "cuda"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES and not Path(self.shape).is_file():
            raise ValueError(
                f"shape {self.shape!r} is neither one of {sorted(SHAPES)} nor a config.json file"
            )
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.reference_batch < 1:
            raise ValueError("prompt_tokens and reference_batch must be >= 1 and new_tokens >= 2")
        unknown = set(self.baselines) - {"hf_dynamic", "hf_static", "full"}
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; choose from hf_dynamic, hf_static, full")
        for budget in self.budgets:
            for policy in self.policies:
                for allocator in self.allocators:
                    SqueezeConfig(budget=budget, policy=policy, allocator=allocator)


@dataclass
class Measurement:
    path: str
    batch: int
    prefill_seconds: float | None = None
    decode_ms_per_step: float | None = None
    tokens_per_second: float | None = None
    kv_gib: float | None = None
    peak_gib: float | None = None
    roofline_ms: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def build_model(shape: str, device: str, max_positions: int) -> nn.Module:
    """A causal LM of the named shape with random bf16 weights, built directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape in SHAPES:
        model_type, kwargs = SHAPES[shape]
        config = AutoConfig.for_model(model_type, **kwargs)
    else:
        config = AutoConfig.from_pretrained(shape)
    config.max_position_embeddings = max(config.max_position_embeddings, max_positions)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer, median of 5)."""
    size = 2**26 if device == "cpu" else GIB
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        started = synchronized(source.device)
        target.copy_(source)
        times.append(synchronized(source.device) - started)
    return 2 * size / sorted(times[1:])[2]


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def full_kv_bytes(model: nn.Module, batch: int, tokens: int) -> int:
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * batch * tokens * kv_heads * head_dim * element


def reset_memory(device: str) -> None:
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device != "cpu" else None


def measure_hf(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, static: bool, device: str
) -> Measurement:
    """Decode time from two timed ``generate`` calls (1 token and ``new_tokens``), after a warm-up.

    The static cache is sized for the longest call every time, so transformers compiles once.
    """
    kwargs = dict(do_sample=False)
    if static:
        kwargs.update(cache_implementation="static", max_cache_len=ids.shape[1] + new_tokens)
    model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up (and compilation for the static cache)
    reset_memory(device)
    started = synchronized(ids.device)
    model.generate(ids, max_new_tokens=1, **kwargs)
    prefill = synchronized(ids.device) - started
    started = synchronized(ids.device)
    model.generate(ids, max_new_tokens=new_tokens, **kwargs)
    total = synchronized(ids.device) - started
    step = (total - prefill) / (new_tokens - 1)
    return Measurement(
        path="hf_static" if static else "hf_dynamic",
        batch=ids.shape[0],
        prefill_seconds=prefill,
        decode_ms_per_step=1000 * step,
        tokens_per_second=ids.shape[0] / step,
        kv_gib=full_kv_bytes(model, ids.shape[0], ids.shape[1] + new_tokens) / GIB,
        peak_gib=peak_gib(device),
    )


def measure_engine(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, config: SqueezeConfig, path: str, device: str
) -> Measurement:
    generator = FastGenerator(model, config)
    reset_memory(device)
    result = generator.generate(ids, max_new_tokens=new_tokens, prefill_batch=1)
    step = generator.steady_step_seconds
    return Measurement(
        path=path,
        batch=ids.shape[0],
        prefill_seconds=result.stats.prefill_seconds,
        decode_ms_per_step=1000 * step,
        tokens_per_second=ids.shape[0] / step,
        kv_gib=result.stats.kv_bytes_kept / GIB,
        peak_gib=peak_gib(device),
        extra={"kv_fraction_kept": result.stats.kv_fraction_kept},
    )


def prefill_overhead(model: nn.Module, ids: torch.Tensor, config: SqueezeConfig, device: str) -> dict:
    """Prefill of one sequence: plain forward vs squeezekv's (importance, planning, eviction)."""
    from squeezekv.session import compress

    def timed(run) -> float:
        run()
        times = []
        for _ in range(3):
            started = synchronized(ids.device)
            run()
            times.append(synchronized(ids.device) - started)
        return sorted(times)[1]

    with torch.inference_mode():
        plain = timed(lambda: model(ids, logits_to_keep=1))

        def compressed() -> None:
            with compress(model, config):
                model(ids, logits_to_keep=1)

        squeezed = timed(compressed)
    return {"plain_seconds": plain, "squeezekv_seconds": squeezed, "overhead": squeezed / plain - 1}


def prefill_peak_kv(model: nn.Module, ids: torch.Tensor, config: SqueezeConfig, chunk: int | None) -> int:
    """The most KV bytes any moment of the prefill holds (every layer appended, none evicted yet)."""
    from squeezekv.architectures import architecture_of, decoder_layers
    from squeezekv.session import compress

    peak = 0

    def record(*_) -> None:
        nonlocal peak
        peak = max(peak, session.cache.kv_bytes_kept())

    last = decoder_layers(model, architecture_of(model))[-1]
    with compress(model, config) as session:
        handle = last.register_forward_hook(record)
        try:
            session.prefill(ids, chunk_tokens=chunk)
        finally:
            handle.remove()
    return peak


def run(config: BenchConfig) -> dict:
    """Runs every path; returns a JSON-ready report."""
    torch.manual_seed(config.seed)
    total_tokens = config.prompt_tokens + config.new_tokens
    model = build_model(config.shape, config.device, total_tokens)
    bandwidth = copy_bandwidth(config.device)
    weights = weight_bytes(model)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(config.seed)
    prompts = torch.randint(3, vocab, (config.max_batch, config.prompt_tokens), generator=generator)
    memory = full_kv_bytes(model, config.reference_batch, total_tokens)
    measurements: list[Measurement] = []

    def attempt(path: str, batch: int, measure) -> None:
        try:
            measurement = measure()
        except torch.OutOfMemoryError as error:
            measurement = Measurement(
                path=path, batch=batch, error=f"out of memory: {str(error).splitlines()[0]}"
            )
        except Exception as error:  # a failing path is reported, the others still run
            measurement = Measurement(path=path, batch=batch, error=f"{type(error).__name__}: {error}")
        if measurement.kv_gib is not None and measurement.decode_ms_per_step is not None:
            measurement.roofline_ms = 1000 * (weights + measurement.kv_gib * GIB) / bandwidth
        measurements.append(measurement)
        print(json.dumps(dataclasses.asdict(measurement)), flush=True)

    reference = prompts[: config.reference_batch].to(config.device)
    with torch.inference_mode():
        if "hf_dynamic" in config.baselines:
            attempt(
                "hf_dynamic",
                config.reference_batch,
                lambda: measure_hf(model, reference, config.new_tokens, False, config.device),
            )
        if "full" in config.baselines:
            keep_all = SqueezeConfig(budget=total_tokens, policy="window", allocator="uniform")
            attempt(
                "full",
                config.reference_batch,
                lambda: measure_engine(model, reference, config.new_tokens, keep_all, "full", config.device),
            )
        for budget in config.budgets:
            for policy in config.policies:
                for allocator in config.allocators:
                    squeeze = SqueezeConfig(budget=budget, policy=policy, allocator=allocator)
                    batch = min(
                        config.max_batch,
                        largest_batch(model, squeeze, config.prompt_tokens, config.new_tokens, memory),
                    )
                    ids = prompts[:batch].to(config.device)
                    name = f"squeezekv {policy}/{allocator} b={budget}"
                    attempt(
                        name,
                        batch,
                        lambda s=squeeze, i=ids, n=name: measure_engine(
                            model, i, config.new_tokens, s, n, config.device
                        ),
                    )
        if "hf_static" in config.baselines:
            attempt(
                "hf_static",
                config.reference_batch,
                lambda: measure_hf(model, reference, config.new_tokens, True, config.device),
            )
        chunk = max(1, config.prompt_tokens // 8)
        chunked_memory = {}
        for policy in config.policies:
            squeeze = SqueezeConfig(budget=config.budgets[0], policy=policy)
            whole = prefill_peak_kv(model, reference[:1], squeeze, None)
            chunked = prefill_peak_kv(model, reference[:1], squeeze, chunk)
            chunked_memory[policy] = {"chunk_tokens": chunk, "whole_bytes": whole, "chunked_bytes": chunked}
        overhead = {
            policy: prefill_overhead(
                model, reference[:1], SqueezeConfig(budget=config.budgets[0], policy=policy), config.device
            )
            for policy in config.policies
        }
    return {
        "config": dataclasses.asdict(config),
        "device": torch.cuda.get_device_name() if config.device != "cpu" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "weight_gib": weights / GIB,
        "kv_memory_gib": memory / GIB,
        "measurements": [dataclasses.asdict(m) for m in measurements],
        "prefill_overhead": overhead,
        "chunked_prefill_peak_kv": chunked_memory,
    }


def markdown(report: dict) -> str:
    """The report as a markdown table, with ratios against the static-cache path and our full cache."""
    rows = {m["path"]: m for m in report["measurements"]}
    static = rows.get("hf_static", {}).get("tokens_per_second")
    full = rows.get("full", {}).get("tokens_per_second")
    config = report["config"]
    lines = [
        f"{config['shape']}, prompt {config['prompt_tokens']} tokens, {config['new_tokens']} new tokens, "
        f"{report['device']}, torch {report['torch']}, {report['date']}",
        f"KV memory budget: {report['kv_memory_gib']:.1f} GiB (the full cache for "
        f"{config['reference_batch']} sequences); weights {report['weight_gib']:.1f} GiB; "
        f"copy bandwidth {report['copy_bandwidth_gbps']:.0f} GB/s",
        "",
        "| path | batch | prefill s | decode ms/step | tokens/s | vs hf_static | vs full | KV GiB | peak GiB "
        "| step / roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value, digits=1) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    def ratio(value, base) -> str:
        return f"{value / base:.2f}x" if value and base else ""

    for m in report["measurements"]:
        if m["error"]:
            lines.append(f"| {m['path']} | {m['batch']} | {m['error']} | | | | | | | |")
            continue
        tps = m["tokens_per_second"]
        cells = [
            m["path"],
            str(m["batch"]),
            number(m["prefill_seconds"], 2),
            number(m["decode_ms_per_step"]),
            f"{tps:.0f}",
            ratio(tps, static),
            ratio(tps, full),
            number(m["kv_gib"]),
            number(m["peak_gib"]),
            ratio(m["decode_ms_per_step"], m["roofline_ms"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Prefill of one prompt, plain forward vs squeezekv (importance, planning, eviction):", ""]
    for policy, o in report["prefill_overhead"].items():
        lines.append(
            f"- {policy}: {o['plain_seconds']:.3f} s plain, {o['squeezekv_seconds']:.3f} s squeezekv "
            f"({100 * o['overhead']:+.1f}%)"
        )
    lines += ["", "Peak KV memory during the prefill of one prompt, whole vs in chunks:", ""]
    for policy, m in report["chunked_prefill_peak_kv"].items():
        lines.append(
            f"- {policy}: {m['whole_bytes'] / GIB:.2f} GiB whole, {m['chunked_bytes'] / GIB:.2f} GiB "
            f"in chunks of {m['chunk_tokens']} ({m['chunked_bytes'] / m['whole_bytes']:.2f}x)"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, directory: Path) -> tuple[Path, Path]:
    """Writes ``<stem>.json`` and ``<stem>.md`` atomically; the stem names shape, device and date."""
    directory.mkdir(parents=True, exist_ok=True)
    device = report["device"].replace(" ", "-")
    stem = f"{report['config']['shape']}-{device}-{report['date'][:10]}"
    paths = (directory / f"{stem}.json", directory / f"{stem}.md")
    for path, text in zip(paths, (json.dumps(report, indent=2) + "\n", markdown(report)), strict=True):
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    return paths
