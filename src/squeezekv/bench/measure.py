"""Timing one path: a warm-up of the full length, then the median of ``repeats`` timed runs.

A short warm-up leaves the first timed run to pay for what only a long one touches (the static
cache's compiled decode at every length, allocator growth, clocks); a single timed run is as noisy
as the machine. So every path, transformers' and ours, first runs exactly as it is then timed, and
reports the median of its timed runs and their spread.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from squeezekv.bench.gqa import packed_gqa_under_compile
from squeezekv.config import SqueezeConfig
from squeezekv.distributed import model_devices, synchronized
from squeezekv.engine import FastGenerator

GIB = 2**30
HF_PATHS = {"hf_dynamic": False, "hf_static": True, "hf_static_gqa": True}  # path -> static cache


@dataclass
class Measurement:
    """One path's numbers. Times are medians of the timed runs, whose per-run values ``*_runs`` keeps;
    ``kv_bytes`` is what the path's key and value buffers really allocate."""

    path: str
    batch: int
    prefill_seconds: float | None = None
    decode_ms_per_step: float | None = None
    decode_ms_runs: list[float] = field(default_factory=list)
    tokens_per_second: float | None = None
    kv_bytes: int | None = None
    peak_gib: float | None = None
    roofline_ms: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def decode_spread(self) -> float | None:
        """(slowest - fastest) / median over the timed runs; ``None`` with fewer than two runs."""
        runs = self.decode_ms_runs
        return (max(runs) - min(runs)) / statistics.median(runs) if len(runs) > 1 else None


def timed_runs(prefills: list[float], steps: list[float], path: str, batch: int, **fields) -> Measurement:
    """A measurement from the per-run prefill seconds and decode seconds per step."""
    step = statistics.median(steps)
    return Measurement(
        path=path,
        batch=batch,
        prefill_seconds=statistics.median(prefills),
        decode_ms_per_step=1000 * step,
        decode_ms_runs=[1000 * s for s in steps],
        tokens_per_second=batch / step,
        **fields,
    )


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
    return 2 * size / statistics.median(times[1:])


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


def cache_bytes(cache) -> int:
    """Bytes a transformers cache's key and value tensors allocate (a static cache: its full length)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def measure_hf(
    model: nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int, path: str
) -> tuple[Measurement, torch.Tensor]:
    """``model.generate`` as ``path`` names it (:data:`HF_PATHS`); returns the measurement and the
    warm-up's greedy new tokens.

    Each timed run is two calls, 1 and ``new_tokens`` new tokens; a step is their difference over
    ``new_tokens - 1``. The static cache is sized for the longest call every time, so transformers
    compiles once, in the warm-up. ``hf_static_gqa`` runs inside :func:`packed_gqa_under_compile`.
    """
    kwargs: dict = dict(do_sample=False)
    if HF_PATHS[path]:
        kwargs.update(cache_implementation="static", max_cache_len=ids.shape[1] + new_tokens)
    devices = model_devices(model)
    patch = packed_gqa_under_compile() if path == "hf_static_gqa" else contextlib.nullcontext()
    with patch:
        warm = model.generate(ids, max_new_tokens=new_tokens, return_dict_in_generate=True, **kwargs)
        kv_bytes, tokens = cache_bytes(warm.cache), warm.sequences[:, ids.shape[1] :].cpu()
        del warm
        reset_memory(devices)
        prefills, steps = [], []
        for _ in range(repeats):
            started = synchronized(devices)
            model.generate(ids, max_new_tokens=1, **kwargs)
            prefill = synchronized(devices) - started
            started = synchronized(devices)
            model.generate(ids, max_new_tokens=new_tokens, **kwargs)
            total = synchronized(devices) - started
            prefills.append(prefill)
            steps.append((total - prefill) / (new_tokens - 1))
    measurement = timed_runs(
        prefills, steps, path, ids.shape[0], kv_bytes=kv_bytes, peak_gib=peak_gib(devices)
    )
    return measurement, tokens


def fitting_rows(layer_budget: torch.Tensor, layer_token_bytes: float, limit: int, row_bytes: int = 0) -> int:
    """The most leading rows whose fast-engine buffers fit ``limit`` bytes.

    A layer's buffer is as wide as the largest budget any row of the batch gives it, plus the free
    slot (``layer_budget``: ``[rows, layers]``), so ``n`` rows cost ``n * sum over layers of (max of
    their budgets + 1)`` token slots of ``layer_token_bytes`` each, plus ``n * row_bytes`` (what a
    row takes whatever its slots: a packed cache's residual windows and key-group tables).
    """
    widest = torch.cummax(layer_budget, dim=0).values.sum(-1) + layer_budget.shape[1]
    rows = torch.arange(1, layer_budget.shape[0] + 1)
    fits = rows.double() * (widest.double() * layer_token_bytes + row_bytes) <= limit
    return int(fits.sum())  # costs only grow with rows: the fitting ones lead


def measure_engine(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    config: SqueezeConfig,
    path: str,
    repeats: int,
    limit: int | None = None,
    cuda_graphs: bool = True,
    compile_layers: bool = True,
) -> Measurement:
    """The fast engine on ``ids``: a warm-up run, then ``repeats`` timed runs (each prefills anew;
    the step is the steady CUDA-graph replay).

    With ``limit`` (bytes), the batch is cut to the leading rows whose buffers, as the warm-up
    allocated them from every row's real per-layer budgets, fit it; the rows keep their budgets in
    any batch (each is prefilled alone), so the cut batch fits exactly. The batch is warmed up again
    when it was cut.
    """
    devices = model_devices(model)

    def once(rows: torch.Tensor):
        generator = FastGenerator(model, config, cuda_graphs, compile_layers)
        result = generator.generate(rows, max_new_tokens=new_tokens, prefill_batch=1)
        return result.stats, generator.steady_step_seconds, generator.cache.row_overhead_bytes()

    stats, _, row_bytes = once(ids)
    sized_from = ids.shape[0]
    if limit is not None:
        slots = int(stats.layer_budget.max(0).values.sum()) + stats.layer_budget.shape[1]
        slot_bytes = (stats.kv_bytes_kept - ids.shape[0] * row_bytes) / (ids.shape[0] * slots)
        rows = fitting_rows(stats.layer_budget, slot_bytes, limit, row_bytes)
        if rows < ids.shape[0]:
            ids = ids[:rows]
            reset_memory(devices)
            once(ids)
    reset_memory(devices)
    prefills, steps = [], []
    for _ in range(repeats):
        stats, step, _ = once(ids)
        prefills.append(stats.prefill_seconds)
        steps.append(step)
    extra = {"kv_fraction_kept": stats.kv_fraction_kept}
    if ids.shape[0] < sized_from:
        extra["cut_from_batch"] = sized_from  # what uniform per-row budgets would have fitted
    return timed_runs(
        prefills,
        steps,
        path,
        ids.shape[0],
        kv_bytes=stats.kv_bytes_kept,
        peak_gib=peak_gib(devices),
        extra=extra,
    )
