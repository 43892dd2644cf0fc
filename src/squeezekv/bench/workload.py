"""The serving benchmark: a seeded request trace served by each path at equal KV memory.

The trace has Poisson arrivals, prompts log-uniform in a token range and answers uniform in another
(random token ids; every answer runs to its ``max_tokens``). Each path serves the same trace from
an empty server, arrivals in real time: transformers' continuous batching with its full paged
cache (``hf_continuous``), squeezekv's serving engine with the full cache (``full``, budget 1.0)
and with each compressed setting. Each gets the same KV memory: transformers as the blocks of its
paged cache, squeezekv as its block pool. Measured per path: requests and output tokens per
second over the trace, time to first token and time per output token (p50 / p99), the KV bytes
the pool held at its peak and the requests in flight (admitted, mean and peak).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from squeezekv.config import SqueezeConfig
from squeezekv.engine import kv_bytes_per_token
from squeezekv.serving import Request, ServingEngine


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds after the trace starts
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """What ``squeezekv bench --workload poisson`` serves, and at what KV memory."""

    requests: int = 32
    rate: float = 1.0  # requests per second
    prompt_range: tuple[int, int] = (1024, 16384)
    answer_range: tuple[int, int] = (32, 512)
    kv_memory: int | None = None  # bytes; None: ``reference_batch`` full caches of the longest request
    block_size: int = 16
    prefill_chunk: int | None = None
    seed: int = 0
    cuda_graphs: bool = True  # each decode bucket captured once (off: --no-cuda-graphs)
    hf_compile_level: int = 0  # transformers' continuous batching: its default_compile_level (0: none)

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"--requests {self.requests} must be >= 1")
        if not self.rate > 0:
            raise ValueError(f"--rate {self.rate} must be > 0 requests per second")
        for name, (low, high) in (
            ("--prompt-range", self.prompt_range),
            ("--answer-range", self.answer_range),
        ):
            if not 1 <= low <= high:
                raise ValueError(f"{name} {low},{high} must be two token counts with 1 <= low <= high")
        if self.hf_compile_level not in (0, 1, 2, 3):
            raise ValueError(f"--hf-compile-level {self.hf_compile_level} must be 0, 1, 2 or 3")

    @property
    def longest(self) -> int:
        return self.prompt_range[1] + self.answer_range[1]


def poisson_trace(workload: Workload, vocabulary: int) -> list[TraceRequest]:
    """The seeded trace: exponential gaps at ``rate``, log-uniform prompts, uniform answers."""
    generator = torch.Generator().manual_seed(workload.seed)

    def uniform() -> float:
        return float(torch.rand((), generator=generator))

    (prompt_low, prompt_high), (answer_low, answer_high) = workload.prompt_range, workload.answer_range
    trace, arrival = [], 0.0
    for _ in range(workload.requests):
        length = round(math.exp(math.log(prompt_low) + uniform() * math.log(prompt_high / prompt_low)))
        answer = answer_low + min(int(uniform() * (answer_high - answer_low + 1)), answer_high - answer_low)
        prompt = torch.randint(3, vocabulary, (length,), generator=generator).tolist()
        trace.append(TraceRequest(arrival, prompt, answer))
        arrival += -math.log(1.0 - uniform()) / workload.rate
    return trace


@dataclass
class Timeline:
    """One request's arrival and token times (seconds on the trace's clock)."""

    arrival: float
    tokens: list[float]


@dataclass
class PathResult:
    path: str
    budget: float | int | None
    policy: str | None
    allocator: str | None
    completed: int
    seconds: float
    requests_per_second: float
    output_tokens_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    kv_limit_bytes: int
    kv_peak_bytes: int | None
    in_flight_mean: float
    in_flight_peak: int
    error: str | None = None


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))] if ordered else math.nan
    )


def summarise(
    name: str, config: SqueezeConfig | None, timelines: list[Timeline], seconds: float, limit: int,
    peak: int | None, in_flight: list[int],
) -> PathResult:  # fmt: skip
    done = [t for t in timelines if t.tokens]
    ttft = [1000 * (t.tokens[0] - t.arrival) for t in done]
    tpot = [1000 * (t.tokens[-1] - t.tokens[0]) / (len(t.tokens) - 1) for t in done if len(t.tokens) > 1]
    return PathResult(
        path=name,
        budget=config.budget if config else None,
        policy=config.policy.name if config else None,
        allocator=config.allocator.name if config else None,
        completed=len(done),
        seconds=round(seconds, 3),
        requests_per_second=round(len(done) / seconds, 4),
        output_tokens_per_second=round(sum(len(t.tokens) for t in done) / seconds, 2),
        ttft_p50_ms=round(percentile(ttft, 0.5), 2),
        ttft_p99_ms=round(percentile(ttft, 0.99), 2),
        tpot_p50_ms=round(percentile(tpot, 0.5), 2),
        tpot_p99_ms=round(percentile(tpot, 0.99), 2),
        kv_limit_bytes=limit,
        kv_peak_bytes=peak,
        in_flight_mean=round(sum(in_flight) / max(1, len(in_flight)), 2),
        in_flight_peak=max(in_flight, default=0),
    )


def serve_engine(
    model: nn.Module, config: SqueezeConfig, trace: list[TraceRequest], workload: Workload, limit: int
):
    """Serves ``trace`` through squeezekv's engine in real time; returns the path's result."""
    engine = ServingEngine(
        model,
        config,
        limit,
        workload.block_size,
        max_waiting=len(trace),
        prefill_chunk=workload.prefill_chunk,
        cuda_graphs=workload.cuda_graphs,
    )
    timelines = [Timeline(item.arrival, []) for item in trace]
    requests = []
    for item, timeline in zip(trace, timelines, strict=True):

        def listen(kind, value, timeline=timeline):
            if kind == "token":
                timeline.tokens.append(time.perf_counter() - start)
            elif kind == "error":
                raise RuntimeError(f"a request failed: {value}")

        requests.append(Request(item.prompt, item.max_tokens, config, listen))
    peak, in_flight, submitted = 0, [], 0
    start = time.perf_counter()
    while submitted < len(trace) or any(not request.finished for request in requests):
        now = time.perf_counter() - start
        while submitted < len(trace) and trace[submitted].arrival <= now:
            engine.submit(requests[submitted])
            submitted += 1
        if not engine.step() and submitted < len(trace):
            time.sleep(min(0.01, max(0.0, trace[submitted].arrival - now)))
        peak = max(peak, engine.kv_bytes_in_use)
        in_flight.append(engine.in_flight)
    seconds = time.perf_counter() - start
    name = "full" if config.keeps_everything else f"{config.policy.name}/{config.allocator.name}"
    return summarise(name, config, timelines, seconds, limit, peak, in_flight)


def serve_hf(
    model: nn.Module, trace: list[TraceRequest], limit: int, page_tokens: int, compile_level: int = 0
) -> PathResult:
    """Serves ``trace`` through transformers' continuous batching, its paged cache ``limit`` bytes in
    pages of ``page_tokens`` (squeezekv's block size, so that both round alike), compiled at its
    ``default_compile_level`` ``compile_level`` (0: not compiled)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    blocks = limit // (page_tokens * kv_bytes_per_token(model))
    if blocks < 1:
        raise ValueError(
            f"KV memory {limit} bytes is less than one of transformers' {page_tokens}-token blocks"
        )
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=max(t.max_tokens for t in trace), eos_token_id=None
    )
    batching = ContinuousBatchingConfig(
        num_blocks=blocks, page_size=page_tokens, max_queue_size=0, default_compile_level=compile_level
    )
    manager = model.init_continuous_batching(
        generation_config=generation, continuous_batching_config=batching
    )
    manager.start()
    try:
        start = time.perf_counter()
        ids = {}
        for index, item in enumerate(trace):
            delay = item.arrival - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            ids[manager.add_request(item.prompt, max_new_tokens=item.max_tokens, record_timestamps=True)] = (
                index
            )
        outputs = {}
        while len(outputs) < len(trace):
            output = manager.get_result(timeout=600)
            if output is None:
                raise RuntimeError("transformers' continuous batching stopped before answering every request")
            if output.error:
                raise RuntimeError(f"transformers' continuous batching failed a request: {output.error}")
            if output.is_finished():
                outputs[ids[output.request_id]] = output
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
        model.destroy_cached_continuous_batching_manager()
    timelines = [
        Timeline(item.arrival, [s - start for s in outputs[i].timestamps]) for i, item in enumerate(trace)
    ]
    spans = [(outputs[i].lifespan[0] - start, outputs[i].lifespan[1] - start) for i in range(len(trace))]
    samples = [seconds * k / 200 for k in range(200)]
    in_flight = [sum(begin <= moment < end for begin, end in spans) for moment in samples]
    return summarise(hf_path(compile_level), None, timelines, seconds, limit, None, in_flight)


def hf_path(compile_level: int) -> str:
    """The report's name for transformers' continuous batching at ``compile_level``."""
    return "hf_continuous" if compile_level == 0 else f"hf_continuous compile={compile_level}"


def serving_benchmark(
    model: nn.Module,
    configs: list[SqueezeConfig],
    workload: Workload,
    reference_batch: int,
    hf: bool,
    on_path: Callable[[dict], None] | None = None,
    full: bool = True,
) -> dict:
    """Every path over the same trace; a JSON-ready report, also handed to ``on_path`` after each
    path (so that a run stopped midway keeps the paths it finished). ``hf`` and ``full``: whether
    transformers' continuous batching and our engine's full cache run too. A failing transformers
    path is reported with its error (it is not ours to fix), a failing squeezekv path raises."""
    limit = workload.kv_memory or reference_batch * workload.longest * kv_bytes_per_token(model)
    trace = poisson_trace(workload, model.config.get_text_config().vocab_size)
    warm = [TraceRequest(0.0, trace[0].prompt[:64], 4)]
    results = []

    def report() -> dict:
        return {
            "workload": {**asdict(workload), "kv_memory": limit, "reference_batch": reference_batch},
            "trace": {
                "prompt_tokens": [len(t.prompt) for t in trace],
                "max_tokens": [t.max_tokens for t in trace],
                "arrivals": [round(t.arrival, 4) for t in trace],
            },
            "results": [asdict(result) for result in results],
        }

    def finished(result: PathResult) -> None:
        results.append(result)
        if on_path is not None:
            on_path(report())

    if hf:
        try:
            level = workload.hf_compile_level
            serve_hf(model, warm, limit, workload.block_size, level)
            finished(serve_hf(model, trace, limit, workload.block_size, level))
        except Exception as error:  # reported, named, in the results
            failed = PathResult(
                hf_path(level), None, None, None, 0, 0.0, *[math.nan] * 6, limit, None, 0.0, 0
            )
            failed.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            finished(failed)
    full_cache = [SqueezeConfig(budget=1.0, policy=configs[0].policy)] if full else []
    for config in [*full_cache, *configs]:
        serve_engine(model, config, warm, workload, limit)
        finished(serve_engine(model, config, trace, workload, limit))
    return report()


def check_workload_memory(report: dict) -> None:
    """Raises naming every path whose pool held more KV bytes than the limit (equal memory broken)."""
    over = [
        r
        for r in report["results"]
        if r["kv_peak_bytes"] is not None and r["kv_peak_bytes"] > r["kv_limit_bytes"]
    ]
    if over:
        raise ValueError(
            "over the KV memory limit: "
            + "; ".join(f"{r['path']} held {r['kv_peak_bytes']} of {r['kv_limit_bytes']} bytes" for r in over)
        )


def workload_markdown(report: dict) -> str:
    """The side-by-side table of a serving benchmark."""
    workload = report["workload"]
    lines = [
        f"Serving benchmark: {workload['requests']} requests, Poisson at {workload['rate']}/s, prompts "
        f"{workload['prompt_range'][0]}-{workload['prompt_range'][1]} tokens (log-uniform), answers "
        f"{workload['answer_range'][0]}-{workload['answer_range'][1]}, seed {workload['seed']}, KV memory "
        f"{workload['kv_memory'] / 2**30:.3f} GiB for every path",
        "",
        "| path | budget | done | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | KV peak GiB "
        "| in flight mean / peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if r["error"]:
            lines.append(f"| {r['path']} | | failed: {r['error']} | | | | | | |")
            continue
        peak = (
            f"{r['kv_peak_bytes'] / 2**30:.3f}"
            if r["kv_peak_bytes"] is not None
            else "(its blocks: the limit)"
        )
        lines.append(
            f"| {r['path']} | {r['budget'] if r['budget'] is not None else 1.0} | {r['completed']} | "
            f"{r['requests_per_second']:.3f} | {r['output_tokens_per_second']:.1f} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
            f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | "
            f"{peak} | {r['in_flight_mean']:.1f} / {r['in_flight_peak']} |"
        )
    return "\n".join(lines)
