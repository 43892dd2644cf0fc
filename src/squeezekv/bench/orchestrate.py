"""One bench run: every path side by side in this process, then the peer's, into one report."""

from __future__ import annotations

import dataclasses
import datetime
import json
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from squeezekv.bench.agreement import agreement
from squeezekv.bench.config import BenchConfig
from squeezekv.bench.measure import (
    GIB,
    Measurement,
    copy_bandwidth,
    measure_engine,
    measure_hf,
)
from squeezekv.bench.peer import measure_peer, peer_request, release
from squeezekv.bench.report import device_name
from squeezekv.bench.shapes import build_model
from squeezekv.config import SqueezeConfig
from squeezekv.distributed import is_first_rank, local_parameter_bytes, model_devices, synchronized
from squeezekv.engine import kv_bytes_per_token, largest_batch
from squeezekv.peers import check_peer


class MemoryLimitExceeded(ValueError):
    """A path held more KV memory than every path may use: its numbers are not at equal memory."""


def full_kv_bytes(model: nn.Module, batch: int, tokens: int) -> int:
    return batch * tokens * kv_bytes_per_token(model)


def benchmark(config: BenchConfig) -> dict:
    """Runs every path; returns a JSON-ready report (:func:`check_memory` says whether every path
    kept to the KV memory limit)."""
    if config.peer is not None:
        check_peer(config.peer, config.peer_python)  # before the long part, not after it
    torch.manual_seed(config.seed)
    model = build_model(config.shape, config.device, config.total_tokens, config.tp, config.device_map)
    devices = model_devices(model)
    bandwidth = copy_bandwidth(devices[0])
    weights = local_parameter_bytes(model)
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.max_batch, config.prompt_tokens)
    prompts = torch.randint(3, model.config.vocab_size, shape, generator=generator)
    memory = full_kv_bytes(model, config.reference_batch, config.total_tokens)
    measurements: list[Measurement] = []

    def record(measurement: Measurement) -> None:
        if measurement.kv_bytes is not None and measurement.decode_ms_per_step is not None:
            measurement.roofline_ms = 1000 * (weights + measurement.kv_bytes) / bandwidth
        measurements.append(measurement)
        if is_first_rank():
            print(json.dumps(dataclasses.asdict(measurement)), flush=True)

    def attempt(path: str, batch: int, measure: Callable[[], Measurement]) -> None:
        try:
            measurement = measure()
        except torch.OutOfMemoryError as error:
            measurement = Measurement(
                path=path, batch=batch, error=f"out of memory: {str(error).splitlines()[0]}"
            )
        except Exception as error:  # a failing path is reported, the others still run
            measurement = Measurement(path=path, batch=batch, error=f"{type(error).__name__}: {error}")
        record(measurement)

    checks = agreement(devices[0], config.policies, config.cuda_graphs, config.compile_layers, config.kv_bits)
    overhead, chunked_memory = measure_own(config, model, prompts, memory, attempt)
    peer = None
    if config.peer is not None:
        with tempfile.TemporaryDirectory(prefix="squeezekv-bench-") as folder:
            model.config.save_pretrained(folder)
            request = peer_request(config, folder, int(prompts.sum()), memory, kv_bytes_per_token(model))
            del model  # the peer builds its own: one GPU holds one model at a time
            peer = {"library": config.peer, "main_process_gib_allocated": release(devices)}
            peer.update(measure_peer(config, request, record))
    gpus = len(devices) if config.tp == 1 else config.tp
    return {
        "config": dataclasses.asdict(config),
        "device": device_name(devices[0], gpus),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "weight_gib": weights / GIB,
        "kv_limit_bytes": memory,
        "measurements": [dataclasses.asdict(m) for m in measurements],
        "prefill_overhead": overhead,
        "chunked_prefill_peak_kv": chunked_memory,
        "fast_equals_simple": checks,
        "peer": peer,
    }


def check_memory(report: dict) -> None:
    """Raises :class:`MemoryLimitExceeded` naming every path that held more KV bytes than the limit."""
    limit = report["kv_limit_bytes"]
    over = [m for m in report["measurements"] if m["kv_bytes"] is not None and m["kv_bytes"] > limit]
    if over:
        paths = "; ".join(
            f"{m['path']} (batch {m['batch']}) held {m['kv_bytes']} bytes ({m['kv_bytes'] / GIB:.3f} GiB)"
            for m in over
        )
        raise MemoryLimitExceeded(
            f"over the KV memory limit of {limit} bytes ({limit / GIB:.3f} GiB, the full cache of the "
            f"reference batch): {paths}"
        )


def measure_own(
    config: BenchConfig,
    model: nn.Module,
    prompts: torch.Tensor,
    memory: int,
    attempt: Callable[[str, int, Callable[[], Measurement]], None],
) -> tuple[dict, dict]:
    """Every path of this process, passed to ``attempt``; returns the prefill overhead and the
    chunked prefill's peak KV memory per policy.

    The static-cache paths run last: their compiled graphs are dropped between the stock and the
    patched one (:func:`~squeezekv.bench.gqa.packed_gqa_under_compile`), whose tokens are compared
    with the stock path's.
    """
    devices = model_devices(model)
    reference = prompts[: config.reference_batch].to(devices[0])
    engine = {"cuda_graphs": config.cuda_graphs, "compile_layers": config.compile_layers}
    hf_tokens: dict[str, torch.Tensor] = {}

    def hf(path: str) -> Measurement:
        measurement, tokens = measure_hf(model, reference, config.new_tokens, config.repeats, path)
        hf_tokens[path] = tokens
        if path == "hf_static_gqa" and "hf_static" in hf_tokens:
            same = (tokens == hf_tokens["hf_static"]).double().mean().item()
            measurement.extra["same_tokens_as_hf_static"] = same
        return measurement

    with torch.inference_mode():
        if "hf_dynamic" in config.baselines:
            attempt("hf_dynamic", config.reference_batch, lambda: hf("hf_dynamic"))
        if "full" in config.baselines:
            # every token the run writes: the prompt and each new token but the last, never fed back
            keep_all = SqueezeConfig(budget=config.total_tokens - 1, policy="window", allocator="uniform")
            attempt(
                "full",
                config.reference_batch,
                lambda: measure_engine(
                    model, reference, config.new_tokens, keep_all, "full", config.repeats, **engine
                ),
            )
        for budget in config.budgets:
            for policy in config.policies:
                for allocator in config.allocators:
                    for bits in config.kv_bits:
                        squeeze = SqueezeConfig(budget, policy, allocator, kv_bits=bits)
                        # a first guess, as if every row had the same per-layer budgets; the warm-up
                        # measures the real ones and cuts the batch to what fits
                        batch = min(
                            config.max_batch,
                            largest_batch(model, squeeze, config.prompt_tokens, config.new_tokens, memory),
                        )
                        ids = prompts[:batch].to(devices[0])
                        precision = f" {bits}-bit" if bits < 16 else ""
                        name = f"squeezekv {policy}/{allocator} b={budget}{precision}"
                        attempt(
                            name,
                            batch,
                            lambda s=squeeze, i=ids, n=name: measure_engine(
                                model, i, config.new_tokens, s, n, config.repeats, memory, **engine
                            ),
                        )
        for path in ("hf_static", "hf_static_gqa"):
            if path in config.baselines:
                attempt(path, config.reference_batch, lambda p=path: hf(p))
        chunk = max(1, config.prompt_tokens // 8)
        chunked_memory = {}
        for policy in config.policies:
            squeeze = SqueezeConfig(budget=config.budgets[0], policy=policy)
            whole = prefill_peak_kv(model, reference[:1], squeeze, None)
            # a policy that scores in a second pass over the whole prompt cannot prefill in chunks
            chunked = (
                None if squeeze.policy.reconstructs else prefill_peak_kv(model, reference[:1], squeeze, chunk)
            )
            chunked_memory[policy] = {"chunk_tokens": chunk, "whole_bytes": whole, "chunked_bytes": chunked}
        overhead = {}
        for policy in config.policies:
            squeeze = SqueezeConfig(budget=config.budgets[0], policy=policy)
            overhead[policy] = prefill_overhead(model, reference[:1], squeeze)
    return overhead, chunked_memory


def prefill_overhead(model: nn.Module, ids: torch.Tensor, config: SqueezeConfig, rounds: int = 7) -> dict:
    """Prefill of one sequence: plain forward vs squeezekv's (importance, planning, eviction).

    The two alternate for ``rounds`` rounds after a warm-up of each, so that clock and thermal drift
    fall on both alike; each time is the median of its rounds.
    """
    from squeezekv.session import compress

    devices = model_devices(model)

    def plain() -> None:
        model(ids, logits_to_keep=1)

    def compressed() -> None:
        with compress(model, config):
            model(ids, logits_to_keep=1)

    times: dict = {plain: [], compressed: []}
    with torch.inference_mode():
        for run in (plain, compressed):
            run()
        for _ in range(rounds):
            for run in (plain, compressed):
                started = synchronized(devices)
                run()
                times[run].append(synchronized(devices) - started)
    base, squeezed = (sorted(t)[len(t) // 2] for t in times.values())
    return {"plain_seconds": base, "squeezekv_seconds": squeezed, "overhead": squeezed / base - 1}


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
