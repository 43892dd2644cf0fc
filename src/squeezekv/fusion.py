"""One matrix product where a layer runs several over the same input: the fast engine's decode.

A decode step's matrix products read every weight once for a few dozen rows, so their speed is how
fast they stream weights. On the H200, Mistral-7B's key and value projections (8 MB each) streamed
at 1.0 TB/s against 3.1 TB/s for the three projections as one product, and the gated MLP's gate and
up projections at 3.7 against 4.0 TB/s as one: the 32 layers' products took 4.63 ms a step
separately and 4.01 ms fused (batch 36, CUDA graphs; Llama-2-7B 4.46 against 3.87 ms;
``benchmarks/projections.py``).

:func:`fused_projections` concatenates each group's weights into one tensor and makes the members'
parameters views of it, so the model holds no second copy; on exit every parameter gets storage of
its own again (copies, one group at a time), so the model is left as it was found.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from squeezekv.architectures import Architecture, decoder_layers


class SharedProduct:
    """The product of one input with several linear layers' weights, concatenated.

    The first member computes it whenever it is called (the attention calls its query projection
    before the key and value projections); the others take their part of it when they are called
    with the same input tensor, and compute it themselves otherwise.
    """

    def __init__(self, members: list[nn.Linear]) -> None:
        self.sizes = [member.out_features for member in members]
        self.weight = _concatenated(members, "weight")
        self.bias = _concatenated(members, "bias")
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()

    def part(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        if index == 0 or hidden is not self.input:
            self.input = hidden
            self.parts = F.linear(hidden, self.weight, self.bias).split(self.sizes, dim=-1)
        return self.parts[index]


def fusible(members: list[nn.Module]) -> bool:
    """Whether ``members`` are plain linear layers (no subclass, no hooks of torch's or accelerate's)
    over one input width, in one dtype on one device that holds their weights, all with biases or none."""
    first = members[0]
    return all(
        type(member) is nn.Linear
        and not (member._forward_hooks or member._forward_pre_hooks or hasattr(member, "_hf_hook"))
        and member.weight.device.type != "meta"
        and member.in_features == first.in_features
        and member.weight.dtype == first.weight.dtype
        and member.weight.device == first.weight.device
        and (member.bias is None) == (first.bias is None)
        for member in members
    )


@contextmanager
def fused_projections(model: nn.Module, architecture: Architecture) -> Iterator[None]:
    """Inside the block, each layer's ``architecture.projections`` (inside its attention) run as one
    product, and a ``gated_mlp`` as one product for its gate and up projections; groups that are not
    :func:`fusible` (quantized layers, hooks) run as before."""
    with ExitStack() as stack:
        for layer in decoder_layers(model, architecture):
            attention = getattr(layer, architecture.attention)
            members = [getattr(attention, name) for name in architecture.projections]
            if members and fusible(members):
                stack.callback(_separate, members)  # registered first: whatever was joined comes apart
                shared = SharedProduct(members)
                for index, member in enumerate(members):
                    stack.enter_context(replaced_forward(member, _member_forward(shared, index)))
            mlp = getattr(layer, "mlp", None) if architecture.gated_mlp else None
            if mlp is not None and fusible([mlp.gate_proj, mlp.up_proj]):
                stack.enter_context(_fused_gated_mlp(mlp))
        yield


def _member_forward(shared: SharedProduct, index: int):
    return lambda hidden: shared.part(index, hidden)


@contextmanager
def _fused_gated_mlp(mlp: nn.Module) -> Iterator[None]:
    """The MLP's gate and up weights joined into non-persistent buffers of the MLP, read by a
    forward method, so that every layer's MLP compiles to one graph (buffers are graph inputs)."""
    members = [mlp.gate_proj, mlp.up_proj]
    try:
        mlp.register_buffer("gate_up_weight", _concatenated(members, "weight"), persistent=False)
        mlp.register_buffer("gate_up_bias", _concatenated(members, "bias"), persistent=False)
        with replaced_forward(mlp, types.MethodType(gated_mlp_forward, mlp)):
            yield
    finally:
        mlp._buffers.pop("gate_up_weight", None)
        mlp._buffers.pop("gate_up_bias", None)
        _separate(members)


def gated_mlp_forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with gate and up as one product."""
    gate, up = F.linear(hidden, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def _concatenated(members: list[nn.Linear], name: str) -> torch.Tensor | None:
    """The members' ``name`` parameters as one tensor, each parameter turned into a view of it."""
    parameters = [getattr(member, name) for member in members]
    if parameters[0] is None:
        return None
    with _plain_tensors():
        joined = torch.cat([parameter.data for parameter in parameters])
        start = 0
        for parameter in parameters:
            parameter.data = joined[start : start + parameter.shape[0]]
            start += parameter.shape[0]
    return joined


def _separate(members: list[nn.Linear]) -> None:
    with _plain_tensors():
        for member in members:
            for parameter in (member.weight, member.bias):
                if parameter is not None:
                    parameter.data = parameter.data.clone()


@contextmanager
def _plain_tensors() -> Iterator[None]:
    """Outside inference mode, so that parameters made inside ``generate`` stay usable for autograd
    afterwards."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextmanager
def replaced_forward(module: nn.Module, forward) -> Iterator[None]:
    """``module.forward`` replaced inside the block; whatever it was before comes back."""
    before = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if before is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = before
