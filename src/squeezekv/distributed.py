"""squeezekv inside transformers' own multi-GPU layouts: tensor parallel and ``device_map``.

**Tensor parallel** (``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))``
under ``torchrun``): every rank runs the same squeezekv session on the key-value heads it holds.
The residual stream is replicated, so every rank measures the same importance; the budgets are
then planned once, on the group's first rank, and broadcast, so all ranks keep the same number of
tokens in every layer. Head-shared policies (window, streaming) rank tokens by position alone,
which every rank holds identically, so all ranks keep identical tokens. Per-head policies (H2O,
SnapKV) rank a head's tokens by that head's own attention mass, which exists on exactly one rank:
each head's decision is made once, by its rank, as a single GPU would make it.

**device_map** (accelerate): each layer's cache is built from that layer's keys and values, so it
lives on the layer's device; importance leaves each device as one number per layer and sequence,
never as a cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def tensor_parallel_size(model: nn.Module) -> int:
    """How many ranks share each layer's heads (1 without tensor parallelism)."""
    return int(getattr(model, "tp_size", None) or 1)


def tensor_parallel_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group of ``model``'s tensor-parallel ranks, or ``None`` on a single rank."""
    if tensor_parallel_size(model) == 1:
        return None
    return model._mesh_manager.get_mesh("tp").get_group()


def agree(tensor: torch.Tensor, group: dist.ProcessGroup | None, device: torch.device) -> torch.Tensor:
    """``tensor`` as the group's first rank holds it, on every rank (itself without a group).

    The broadcast goes through ``device`` (NCCL needs a GPU tensor); the result keeps the input's
    device and dtype.
    """
    if group is None:
        return tensor
    shared = tensor.to(device).contiguous()
    dist.broadcast(shared, src=dist.get_global_rank(group, 0), group=group)
    return shared.to(tensor.device)


def is_first_rank() -> bool:
    """Whether this process reports (the only process, or rank 0 of several)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def model_devices(model: nn.Module) -> list[torch.device]:
    """Every device holding a parameter of ``model``, in order of first appearance."""
    devices: dict[torch.device, None] = {}
    for parameter in model.parameters():
        devices.setdefault(parameter.device, None)
    return list(devices)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the weights this rank holds (its shards, under tensor parallelism)."""
    total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel() * local.element_size()
    return total


def synchronized(devices: torch.device | Iterable[torch.device]) -> float:
    """The time once every CUDA device among ``devices`` has finished its queued work."""
    for device in [devices] if isinstance(devices, torch.device) else devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter()
