"""``squeezekv bench``: throughput and memory against the full cache and plain transformers.

Models are built from a real architecture's shape with random weights (speed does not depend on
weight values). Every path decodes the same prompts in the same process, so ratios are measured
side by side:

- ``hf_dynamic``: ``model.generate`` with its default dynamic cache, at the reference batch;
- ``hf_static``: ``model.generate(cache_implementation="static")``, which transformers compiles;
- ``full``: squeezekv's fast engine keeping every token, at the reference batch;
- ``squeezekv``: the fast engine at each budget / policy / allocator, at the largest batch whose
  compressed caches fit the memory the full cache needs for the reference batch;
- ``kvpress`` (with ``peer``): its presses at each budget, in its own Python environment (it pins an
  older transformers), at the largest batch that fits the same memory; last, once this process has
  let go of its model.

Across GPUs the model is spread by transformers itself: ``tp`` > 1 shards heads over that many
ranks (run under ``torchrun``; every number is one rank's, the report comes from rank 0), and
``device_map`` places layers on the visible GPUs (accelerate), decoding without CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from squeezekv.config import SqueezeConfig
from squeezekv.distributed import is_first_rank, local_parameter_bytes, model_devices, synchronized
from squeezekv.engine import FastGenerator, kv_bytes_per_token, largest_batch
from squeezekv.evaluation.peer import BENCH_PRESSES, check_peer, press_settings, run_runner

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
GIB = 2**30


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. ``shape`` names an entry of ``SHAPES`` or a ``config.json`` path.

    ``peer`` adds a peer library's ``peer_presses``, run by the interpreter ``peer_python``.
    """

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
    tp: int = 1
    device_map: str | None = None
    cuda_graphs: bool = True
    compile_layers: bool = True
    peer: str | None = None
    peer_python: str | None = None
    peer_presses: tuple[str, ...] = BENCH_PRESSES["kvpress"]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES and not Path(self.shape).is_file():
            raise ValueError(
                f"shape {self.shape!r} is neither one of {sorted(SHAPES)} nor a config.json file"
            )
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.reference_batch < 1:
            raise ValueError("prompt_tokens and reference_batch must be >= 1 and new_tokens >= 2")
        if self.tp < 1:
            raise ValueError(f"tp {self.tp} must be >= 1")
        if self.tp > 1 and self.device_map is not None:
            raise ValueError("tp and device_map are two ways to spread a model: choose one")
        if self.device_map is not None and self.cuda_graphs:
            raise ValueError("a device_map decodes across devices, which CUDA graphs cannot capture")
        unknown = set(self.baselines) - {"hf_dynamic", "hf_static", "full"}
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; choose from hf_dynamic, hf_static, full")
        for budget in self.budgets:
            for policy in self.policies:
                for allocator in self.allocators:
                    SqueezeConfig(budget=budget, policy=policy, allocator=allocator)
        if self.peer is not None:
            self.check_peer_settings()

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


def build_model(
    shape: str, device: str, max_positions: int, tp: int = 1, device_map: str | None = None
) -> nn.Module:
    """A causal LM of the named shape with random weights (bf16 on a GPU).

    On one device it is built in place. Spread over GPUs, transformers loads it as a user would
    (``DistributedConfig(tp_size=tp)`` or ``device_map``) from a checkpoint that holds no weights,
    so every shard is initialised at random on its own device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape in SHAPES:
        model_type, kwargs = SHAPES[shape]
        config = AutoConfig.for_model(model_type, **kwargs)
    else:
        config = AutoConfig.from_pretrained(shape)
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


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer, median of 5)."""
    size = 2**26 if device.type == "cpu" else GIB
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        started = synchronized(source.device)
        target.copy_(source)
        times.append(synchronized(source.device) - started)
    return 2 * size / sorted(times[1:])[2]


def full_kv_bytes(model: nn.Module, batch: int, tokens: int) -> int:
    return batch * tokens * kv_bytes_per_token(model)


def kvpress_kept_tokens(prompt_tokens: int, budget: float | int) -> int:
    """Prompt tokens a kvpress press keeps per layer at ``budget``, as kvpress counts them.

    The runner turns the budget into ``compression_ratio = 1 - budget`` (budgets in whole tokens:
    ``1 - min(1, budget / prompt_tokens)``) and kvpress keeps ``max(1, int(prompt_tokens * (1 -
    compression_ratio)))`` (``kvpress.utils.compute_n_kept``). The float round trip matters: for 40
    tokens at 0.2 it keeps 7, not 8.
    """
    kept = budget if isinstance(budget, float) else min(1.0, budget / prompt_tokens)
    return max(1, int(prompt_tokens * (1 - (1 - kept))))


def reset_memory(devices: list[torch.device]) -> None:
    gc.collect()
    for device in devices:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def peak_gib(devices: list[torch.device]) -> float | None:
    """The most memory allocated at once, summed over ``devices`` (``None`` on the CPU)."""
    gpus = [device for device in devices if device.type == "cuda"]
    return sum(torch.cuda.max_memory_allocated(device) for device in gpus) / GIB if gpus else None


def measure_hf(model: nn.Module, ids: torch.Tensor, new_tokens: int, static: bool) -> Measurement:
    """Decode time from two timed ``generate`` calls (1 token and ``new_tokens``), after a warm-up.

    The static cache is sized for the longest call every time, so transformers compiles once.
    """
    kwargs = dict(do_sample=False)
    if static:
        kwargs.update(cache_implementation="static", max_cache_len=ids.shape[1] + new_tokens)
    devices = model_devices(model)
    model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up (and compilation for the static cache)
    reset_memory(devices)
    started = synchronized(devices)
    model.generate(ids, max_new_tokens=1, **kwargs)
    prefill = synchronized(devices) - started
    started = synchronized(devices)
    model.generate(ids, max_new_tokens=new_tokens, **kwargs)
    total = synchronized(devices) - started
    step = (total - prefill) / (new_tokens - 1)
    return Measurement(
        path="hf_static" if static else "hf_dynamic",
        batch=ids.shape[0],
        prefill_seconds=prefill,
        decode_ms_per_step=1000 * step,
        tokens_per_second=ids.shape[0] / step,
        kv_gib=full_kv_bytes(model, ids.shape[0], ids.shape[1] + new_tokens) / GIB,
        peak_gib=peak_gib(devices),
    )


def measure_engine(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    config: SqueezeConfig,
    path: str,
    cuda_graphs: bool = True,
    compile_layers: bool = True,
) -> Measurement:
    generator = FastGenerator(model, config, cuda_graphs, compile_layers)
    reset_memory(generator.devices)
    result = generator.generate(ids, max_new_tokens=new_tokens, prefill_batch=1)
    step = generator.steady_step_seconds
    return Measurement(
        path=path,
        batch=ids.shape[0],
        prefill_seconds=result.stats.prefill_seconds,
        decode_ms_per_step=1000 * step,
        tokens_per_second=ids.shape[0] / step,
        kv_gib=result.stats.kv_bytes_kept / GIB,
        peak_gib=peak_gib(generator.devices),
        extra={"kv_fraction_kept": result.stats.kv_fraction_kept},
    )


def agreement(
    device: torch.device, policies: tuple[str, ...], cuda_graphs: bool, compile_layers: bool
) -> dict[str, dict]:
    """Whether the fast engine, decoding as benchmarked (CUDA graphs or not, compiled layers or
    not), keeps the simple path's tokens and outputs on this device: keep-everything and every
    benchmarked policy.

    Checked on the ``tiny`` shape in float64 (random weights; greedy ties cannot flip between
    paths), with a ragged, left-padded batch prefilled in two micro-batches.
    """
    from squeezekv.generation import generate

    model = build_model("tiny", "cpu", 128).to(device, torch.float64)
    generator = torch.Generator().manual_seed(0)
    lengths = (60, 41, 52)
    ids = torch.randint(3, model.config.vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, -length:] = 1
    ids, mask = (ids * mask).to(device), mask.to(device)
    checks = {"keep-all": SqueezeConfig(budget=1.0, policy="window", allocator="uniform")}
    for policy in policies:
        short = {"streaming": "streaming:sinks=2", "snapkv": "snapkv:window=8"}.get(policy, policy)
        checks[policy] = SqueezeConfig(budget=0.3, policy=short)
    results = {}
    for name, config in checks.items():
        simple = generate(model, ids, config, attention_mask=mask, max_new_tokens=24, do_sample=False)
        graphs = cuda_graphs and device.type == "cuda"
        fast = FastGenerator(model, config, graphs, compile_layers).generate(
            ids, mask, max_new_tokens=24, prefill_batch=2
        )
        results[name] = {
            "tokens_equal": torch.equal(simple.sequences, fast.sequences),
            "kept_equal": torch.equal(simple.stats.layer_tokens_held, fast.stats.layer_tokens_held),
        }
    return results


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


def run(config: BenchConfig) -> dict:
    """Runs every path; returns a JSON-ready report."""
    if config.peer is not None:
        check_peer(config.peer, config.peer_python)  # before the long part, not after it
    torch.manual_seed(config.seed)
    total_tokens = config.prompt_tokens + config.new_tokens
    model = build_model(config.shape, config.device, total_tokens, config.tp, config.device_map)
    devices = model_devices(model)
    bandwidth = copy_bandwidth(devices[0])
    weights = local_parameter_bytes(model)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(config.seed)
    prompts = torch.randint(3, vocab, (config.max_batch, config.prompt_tokens), generator=generator)
    memory = full_kv_bytes(model, config.reference_batch, total_tokens)
    measurements: list[Measurement] = []

    def record(measurement: Measurement) -> None:
        if measurement.kv_gib is not None and measurement.decode_ms_per_step is not None:
            measurement.roofline_ms = 1000 * (weights + measurement.kv_gib * GIB) / bandwidth
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

    checks = agreement(devices[0], config.policies, config.cuda_graphs, config.compile_layers)
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
        "kv_memory_gib": memory / GIB,
        "measurements": [dataclasses.asdict(m) for m in measurements],
        "prefill_overhead": overhead,
        "chunked_prefill_peak_kv": chunked_memory,
        "fast_equals_simple": checks,
        "peer": peer,
    }


def measure_own(
    config: BenchConfig,
    model: nn.Module,
    prompts: torch.Tensor,
    memory: int,
    attempt: Callable[[str, int, Callable[[], Measurement]], None],
) -> tuple[dict, dict]:
    """Every path of this process, passed to ``attempt``; returns the prefill overhead and the
    chunked prefill's peak KV memory per policy."""
    devices = model_devices(model)
    total_tokens = config.prompt_tokens + config.new_tokens
    reference = prompts[: config.reference_batch].to(devices[0])
    engine = (config.cuda_graphs, config.compile_layers)
    with torch.inference_mode():
        if "hf_dynamic" in config.baselines:
            attempt(
                "hf_dynamic",
                config.reference_batch,
                lambda: measure_hf(model, reference, config.new_tokens, False),
            )
        if "full" in config.baselines:
            keep_all = SqueezeConfig(budget=total_tokens, policy="window", allocator="uniform")
            attempt(
                "full",
                config.reference_batch,
                lambda: measure_engine(model, reference, config.new_tokens, keep_all, "full", *engine),
            )
        for budget in config.budgets:
            for policy in config.policies:
                for allocator in config.allocators:
                    squeeze = SqueezeConfig(budget=budget, policy=policy, allocator=allocator)
                    batch = min(
                        config.max_batch,
                        largest_batch(model, squeeze, config.prompt_tokens, config.new_tokens, memory),
                    )
                    ids = prompts[:batch].to(devices[0])
                    name = f"squeezekv {policy}/{allocator} b={budget}"
                    attempt(
                        name,
                        batch,
                        lambda s=squeeze, i=ids, n=name: measure_engine(
                            model, i, config.new_tokens, s, n, *engine
                        ),
                    )
        if "hf_static" in config.baselines:
            attempt(
                "hf_static",
                config.reference_batch,
                lambda: measure_hf(model, reference, config.new_tokens, True),
            )
        chunk = max(1, config.prompt_tokens // 8)
        chunked_memory = {}
        for policy in config.policies:
            squeeze = SqueezeConfig(budget=config.budgets[0], policy=policy)
            whole = prefill_peak_kv(model, reference[:1], squeeze, None)
            chunked = prefill_peak_kv(model, reference[:1], squeeze, chunk)
            chunked_memory[policy] = {"chunk_tokens": chunk, "whole_bytes": whole, "chunked_bytes": chunked}
        overhead = {}
        for policy in config.policies:
            squeeze = SqueezeConfig(budget=config.budgets[0], policy=policy)
            overhead[policy] = prefill_overhead(model, reference[:1], squeeze)
    return overhead, chunked_memory


def release(devices: list[torch.device]) -> float | None:
    """Hands this process's GPU memory back, compiled graphs' pools included, so that the peer's
    process can load its model; returns the GiB still allocated (``None`` on the CPU)."""
    torch._dynamo.reset()  # transformers' compiled static-cache decode keeps CUDA-graph pools
    reset_memory(devices)
    gpus = [device for device in devices if device.type == "cuda"]
    return sum(torch.cuda.memory_allocated(device) for device in gpus) / GIB if gpus else None


def peer_request(config: BenchConfig, folder: str, prompt_sum: int, memory: int, token_bytes: int) -> dict:
    """The runner's bench request: one job per budget and press, at the largest batch whose caches fit
    ``memory`` (kvpress keeps its compressed prompt plus every new token: it never evicts while
    decoding). The model is the ``config.json`` in ``folder``; the runner draws the prompts as
    :func:`run` does and checks their sum."""
    jobs = []
    for budget in config.budgets:
        tokens = kvpress_kept_tokens(config.prompt_tokens, budget) + config.new_tokens
        batch = min(config.max_batch, memory // (token_bytes * tokens))
        jobs += [{"press": press, "budget": budget, "batch": batch} for press in config.peer_presses]
    return {
        "mode": "bench",
        "config": folder,
        "device": config.device,
        "seed": config.seed,
        "max_batch": config.max_batch,
        "prompt_tokens": config.prompt_tokens,
        "prompt_sum": prompt_sum,
        "new_tokens": config.new_tokens,
        "settings": press_settings(),
        "jobs": jobs,
    }


def measure_peer(config: BenchConfig, request: dict, record: Callable[[Measurement], None]) -> dict:
    """Runs the request's jobs in the peer's environment, passing one measurement per job to
    ``record``; returns the versions the peer ran with. A job the runner could not finish (it ran
    out of memory, or the runner failed) is a measurement with an error."""
    versions: dict = {}
    unfinished = {peer_path(config.peer, job): job for job in request["jobs"]}
    try:
        for output in run_runner(config.peer, config.peer_python, request):
            if "versions" in output:
                versions = output["versions"]
                continue
            measurement = peer_measurement(config, output)
            unfinished.pop(measurement.path, None)
            record(measurement)
    except ValueError as error:
        for path, job in unfinished.items():
            record(Measurement(path=path, batch=job["batch"], error=str(error)))
    return versions


def peer_path(peer: str, job: dict) -> str:
    return f"{peer} {job['press']} b={job['budget']}"


def peer_measurement(config: BenchConfig, output: dict) -> Measurement:
    """A runner's output line as a measurement; an error if the press kept another number of prompt
    tokens in some layer than the batch was sized for."""
    path, kept = peer_path(config.peer, output), kvpress_kept_tokens(config.prompt_tokens, output["budget"])
    error = output.get("error")
    if error is None and set(output["kept"]) != {kept}:
        error = f"kept {sorted(set(output['kept']))} prompt tokens per layer, the batch was sized for {kept}"
    if error is not None:
        return Measurement(path=path, batch=output["batch"], error=error)
    fields = ("prefill_seconds", "decode_ms_per_step", "tokens_per_second", "kv_gib", "peak_gib")
    return Measurement(
        path=path,
        batch=output["batch"],
        **{name: output[name] for name in fields},
        extra={"kept_prompt_tokens": kept},
    )


def device_name(device: torch.device, count: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return f"{count}x {name}" if count > 1 else name


def markdown(report: dict) -> str:
    """The report as a markdown table, with ratios against the static-cache path and our full cache."""
    rows = {m["path"]: m for m in report["measurements"]}
    static = rows.get("hf_static", {}).get("tokens_per_second")
    full = rows.get("full", {}).get("tokens_per_second")
    config = report["config"]
    spread = ""
    if config.get("tp", 1) > 1:
        spread = f", tensor parallel over {config['tp']} ranks (memory and bytes per rank)"
    elif config.get("device_map"):
        spread = f", device_map={config['device_map']!r} (memory summed over GPUs)"
    decode = "CUDA graphs" if config.get("cuda_graphs", True) else "eager"
    if config.get("cuda_graphs", True) and config.get("compile_layers", False):
        decode += ", norms, MLPs and rotary embeddings compiled"
    lines = [
        f"{config['shape']}, prompt {config['prompt_tokens']} tokens, {config['new_tokens']} new tokens, "
        f"{report['device']}{spread}, squeezekv decode: {decode}, torch {report['torch']}, {report['date']}",
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
    peer = report.get("peer")
    if peer:
        library = peer["library"]
        held = peer["main_process_gib_allocated"]
        lines += [
            "",
            f"{library} {peer.get(library, '?')} ran eagerly in its own environment (transformers "
            f"{peer.get('transformers', '?')}, torch {peer.get('torch', '?')}), after this process let go "
            f"of its model{'' if held is None else f' ({held:.2f} GiB still allocated here)'}: each "
            "prompt prefilled alone under the press, then the batch decoded in a Python loop as its "
            "pipeline does, at the largest batch whose caches fit the same KV memory.",
        ]
    checks = report.get("fast_equals_simple", {})
    if checks:
        verdicts = [
            f"{name} {'yes' if c['tokens_equal'] and c['kept_equal'] else 'NO'}" for name, c in checks.items()
        ]
        lines += [
            "",
            "Fast engine as benchmarked equals the simple path on this device (tokens and kept tokens, "
            "tiny float64 model): " + ", ".join(verdicts),
        ]
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
    config = report["config"]
    spread = f"-tp{config['tp']}" if config.get("tp", 1) > 1 else ""
    spread += "-device-map" if config.get("device_map") else ""
    stem = f"{config['shape']}{spread}-{device}-{report['date'][:10]}"
    paths = (directory / f"{stem}.json", directory / f"{stem}.md")
    for path, text in zip(paths, (json.dumps(report, indent=2) + "\n", markdown(report)), strict=True):
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    return paths
