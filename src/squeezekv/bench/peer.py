"""A peer library's presses in ``squeezekv bench``: the request to its runner and its answers as
measurements, at the largest batch whose caches fit the same KV memory as every other path."""

from __future__ import annotations

from collections.abc import Callable

import torch

from squeezekv.bench.config import BenchConfig
from squeezekv.bench.measure import GIB, Measurement, reset_memory
from squeezekv.peers import press_settings, run_runner


def kvpress_kept_tokens(prompt_tokens: int, budget: float | int) -> int:
    """Prompt tokens a kvpress press keeps per layer at ``budget``, as kvpress counts them.

    The runner turns the budget into ``compression_ratio = 1 - budget`` (budgets in whole tokens:
    ``1 - min(1, budget / prompt_tokens)``) and kvpress keeps ``max(1, int(prompt_tokens * (1 -
    compression_ratio)))`` (``kvpress.utils.compute_n_kept``). The float round trip matters: for 40
    tokens at 0.2 it keeps 7, not 8.
    """
    kept = budget if isinstance(budget, float) else min(1.0, budget / prompt_tokens)
    return max(1, int(prompt_tokens * (1 - (1 - kept))))


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
    decoding). The model is the ``config.json`` in ``folder``; the runner draws the prompts as the
    bench does and checks their sum."""
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
    tokens in some layer than the batch was sized for. The runner times one decode loop after its
    own warm-up: one timed run."""
    path, kept = peer_path(config.peer, output), kvpress_kept_tokens(config.prompt_tokens, output["budget"])
    error = output.get("error")
    if error is None and set(output["kept"]) != {kept}:
        error = f"kept {sorted(set(output['kept']))} prompt tokens per layer, the batch was sized for {kept}"
    if error is not None:
        return Measurement(path=path, batch=output["batch"], error=error)
    return Measurement(
        path=path,
        batch=output["batch"],
        prefill_seconds=output["prefill_seconds"],
        decode_ms_per_step=output["decode_ms_per_step"],
        decode_ms_runs=[output["decode_ms_per_step"]],
        tokens_per_second=output["tokens_per_second"],
        kv_bytes=round(output["kv_gib"] * GIB),
        peak_gib=output["peak_gib"],
        extra={"kept_prompt_tokens": kept},
    )
