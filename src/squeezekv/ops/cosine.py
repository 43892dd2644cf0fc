"""Layer importance's cosine: cos(residual, residual + attention output) per token, in float32. The
Triton kernel reads both once instead of materialising float32 copies."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from squeezekv.ops.common import tl, triton, use_triton

COSINE_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _residual_cosine(R, A, OUT, width, srr, srd, sar, sad, BD: tl.constexpr, BLOCKS: tl.constexpr):
        row = tl.program_id(0)
        rr = tl.zeros([BD], tl.float32)
        yy = tl.zeros([BD], tl.float32)
        ry = tl.zeros([BD], tl.float32)
        for block in range(0, BLOCKS):
            dims = block * BD + tl.arange(0, BD)
            inside = dims < width
            r = tl.load(R + row * srr + dims * srd, mask=inside, other=0.0).to(tl.float32)
            y = r + tl.load(A + row * sar + dims * sad, mask=inside, other=0.0).to(tl.float32)
            rr += r * r
            yy += y * y
            ry += r * y
        eps = 1e-8
        norms = tl.maximum(tl.sqrt(tl.sum(rr, 0)), eps) * tl.maximum(tl.sqrt(tl.sum(yy, 0)), eps)
        tl.store(OUT + row, tl.sum(ry, 0) / norms)


def residual_cosine(residual: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    """``[..., tokens]`` float32 cos(residual, residual + attention_output) over the last dimension,
    as ``torch.nn.functional.cosine_similarity`` computes it in float32 (eps 1e-8 on each norm)."""
    cosine = residual_cosine_triton if use_triton(attention_output) else residual_cosine_torch
    return cosine(residual, attention_output)


def residual_cosine_torch(residual: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    """The torch twin of :func:`residual_cosine_triton` (same arguments, same result)."""
    residual = residual.float()
    return F.cosine_similarity(residual, residual + attention_output.float(), dim=-1)


def residual_cosine_triton(residual: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    """The Triton kernel behind :func:`residual_cosine`."""
    width = residual.shape[-1]
    rows_r, rows_a = residual.reshape(-1, width), attention_output.reshape(-1, width)
    cosine = torch.empty(rows_r.shape[0], dtype=torch.float32, device=residual.device)
    _residual_cosine[(rows_r.shape[0],)](
        rows_r, rows_a, cosine, width, *rows_r.stride(), *rows_a.stride(),
        BD=COSINE_BLOCK, BLOCKS=triton.next_power_of_2(math.ceil(width / COSINE_BLOCK)),
    )  # fmt: skip
    return cosine.view(residual.shape[:-1])
