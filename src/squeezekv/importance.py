"""Layer importance: how much a layer's attention changes the residual stream during prefill.

For every layer and sequence, the mean over the real prompt tokens of
cos(residual entering the layer, residual + attention output). A high similarity means the
attention barely moved the stream, so the layer can live with a smaller cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from squeezekv.ops import residual_cosine


def summed_similarity(
    residual: torch.Tensor, attention_output: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch]`` sums over valid tokens of cos(residual, residual + attention_output), and counts."""
    residual = residual.to(attention_output.device)  # a device_map may move the layer
    cosine = residual_cosine(residual, attention_output)
    weight = valid.to(cosine.device, torch.float32)
    return (cosine * weight).sum(-1), weight.sum(-1)


class ImportanceRecorder:
    """Hooks that measure ``similarity`` (``[batch, layers]``) during prefill forwards.

    ``active`` says whether the current forward is part of the prefill; ``valid`` gives its tokens'
    validity. A prefill in chunks gives the mean over all its tokens so far.
    """

    def __init__(
        self, num_layers: int, active: Callable[[], bool], valid: Callable[[], torch.Tensor]
    ) -> None:
        self.num_layers = num_layers
        self.active, self.valid = active, valid
        self.residuals: dict[int, torch.Tensor] = {}
        self.sums: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def reset(self) -> None:
        self.residuals.clear()
        self.sums = [None] * self.num_layers

    def similarity(self) -> torch.Tensor:
        missing = [index for index, sums in enumerate(self.sums) if sums is None]
        if missing:
            raise RuntimeError(f"no layer similarity was recorded for layers {missing} during prefill")
        device = self.sums[0][0].device  # under a device_map, layers' sums sit on several devices
        totals, counts = (torch.stack([sums[part].to(device) for sums in self.sums], 1) for part in (0, 1))
        return (totals / counts.clamp(min=1.0)).cpu()  # one division and one copy to the host for all layers

    def attach(self, layers: list[nn.Module], output_modules: list[nn.Module]) -> list[RemovableHandle]:
        handles = []
        for index, (layer, output_module) in enumerate(zip(layers, output_modules, strict=True)):
            handles.append(layer.register_forward_pre_hook(self._keep_residual(index), with_kwargs=True))
            handles.append(output_module.register_forward_hook(self._measure(index)))
        return handles

    def _keep_residual(self, index: int):
        def hook(module, args, kwargs):
            if self.active():
                self.residuals[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _measure(self, index: int):
        def hook(module, args, output):
            if index in self.residuals:
                attention_output = output[0] if isinstance(output, tuple) else output
                total, count = summed_similarity(self.residuals.pop(index), attention_output, self.valid())
                if self.sums[index] is not None:
                    total, count = total + self.sums[index][0], count + self.sums[index][1]
                self.sums[index] = (total, count)

        return hook
