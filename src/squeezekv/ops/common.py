"""The one rule that picks a Triton kernel over its torch twin, and what the kernels share.

Every op in this package is one function that calls its Triton kernel when :func:`use_triton`
holds and its torch twin otherwise; both are public (``*_triton``, ``*_torch``) so that tests run
each pair on the same inputs (on the CPU, the Triton side runs in Triton's interpreter).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no Triton; the torch twins serve it
    triton = tl = None


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels serve ``tensor``: Triton is installed and ``tensor`` is on a GPU."""
    return triton is not None and tensor.is_cuda


if triton is not None:

    @triton.jit
    def dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` accumulated in float32; ``IEEE``: exact float32 products (for float32 inputs,
        where the default would round them to TF32)."""
        if IEEE:  # noqa: SIM108  (a constexpr branch: only one of the two is compiled)
            product = tl.dot(a, b, input_precision="ieee")
        else:
            product = tl.dot(a, b)
        return product
