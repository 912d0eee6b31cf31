"""Triton launchers of the four BatchNorm primitives (kernels in ``kernels/batch_norm.py``).

The contract is ``fused_residual.ops.batch_norm``'s (its module docstring and the ``_eager_*`` primitives):
dense activations of one dtype sharing one storage layout, viewed as ``[outer, C, inner]``; float32
contiguous per-channel vectors; masks of ceil(numel / 8) bytes in storage order. Each function writes its
outputs in place, returns None and does nothing for an empty tensor; the caller has checked everything.

Launch shapes depend only on (numel, C, inner), never on the device, so a given input reduces in the same
order on every GPU: the reductions are deterministic, run to run and machine to machine.
"""

from __future__ import annotations

import torch

from .. import _triton
from ._registry import device_guard
from .add_relu import relu_uses_hw_max

# Programs a reduction aims for (channel blocks x splits): several per SM of a large GPU (132 on H100), so
# that the first stage fills the machine while the second stage walks a short list of partials.
TARGET_PROGRAMS = 1024


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _index64(numel: int, slack: int) -> bool:
    """int64 element offsets where they (plus the last program's overhang) can pass 2**31."""
    return numel + slack >= 2**31


def _reduce_plan(bn_kernels, numel: int, C: int, inner: int) -> dict:
    """Tile shape and split of a reduction over [outer, C, inner] (see kernels/batch_norm.py)."""
    outer = numel // (C * inner)
    if inner == 1:  # channels_last / 2-D: a run of channels is contiguous
        block_c, block_j = min(_next_pow2(C), bn_kernels.MAX_BLOCK_C), 1
    else:  # NCHW: a run of one plane is contiguous
        block_c, block_j = 1, min(_next_pow2(inner), bn_kernels.TILE)
    block_o = max(1, min(bn_kernels.TILE // (block_c * block_j), _next_pow2(outer)))
    jb = -(-inner // block_j)
    tiles = -(-outer // block_o) * jb
    cblocks = -(-C // block_c)
    splits = max(1, min(tiles, -(-TARGET_PROGRAMS // cblocks)))
    per_split = -(-tiles // splits)
    splits = -(-tiles // per_split)  # no empty splits
    return dict(outer=outer, row_stride=C * inner, JB=jb, tiles=tiles, tiles_per_split=per_split,
                grid=(cblocks, splits), splits=splits, BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_J=block_j,
                INDEX64=_index64(numel, block_o * C * inner))


def stats(x: torch.Tensor, C: int, inner: int, mean: torch.Tensor, var: torch.Tensor) -> None:
    """mean[c], var[c] (biased) of x's channels, float32, merged as (count, mean, M2) relative to each
    channel's first element."""
    numel = x.numel()
    if numel == 0:
        return
    bn_kernels = _triton.kernels("batch_norm")
    p = _reduce_plan(bn_kernels, numel, C, inner)
    with device_guard(x):
        part = torch.empty((p["splits"], 3, C), dtype=torch.float32, device=x.device)
        bn_kernels.bn_stats_partial_kernel[p["grid"]](
            x, part, p["outer"], C, inner, p["row_stride"], p["JB"], p["tiles"], p["tiles_per_split"],
            BLOCK_O=p["BLOCK_O"], BLOCK_C=p["BLOCK_C"], BLOCK_J=p["BLOCK_J"], INDEX64=p["INDEX64"],
            num_warps=bn_kernels.REDUCE_WARPS)
        bn_kernels.bn_stats_finish_kernel[(_triton.cdiv(C, bn_kernels.FINISH_BLOCK_C),)](
            x, part, mean, var, C, inner, p["splits"], BLOCK_C=bn_kernels.FINISH_BLOCK_C, INDEX64=p["INDEX64"],
            num_warps=bn_kernels.FINISH_WARPS)


def apply(x: torch.Tensor, skip: torch.Tensor | None, mean: torch.Tensor, scale: torch.Tensor,
          shift: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None, C: int, inner: int) -> None:
    """out = relu((x - mean) * scale + shift [+ skip]); mask (if given) = the packed gate of out."""
    numel = out.numel()
    if numel == 0:
        return
    bn_kernels = _triton.kernels("batch_norm")
    with device_guard(out):
        bn_kernels.bn_apply_kernel[(_triton.cdiv(numel, bn_kernels.APPLY_BLOCK),)](
            x, skip if skip is not None else x, mean, scale, shift, out, mask if mask is not None else out,
            numel, C, inner, HAS_SKIP=skip is not None, SAVE_MASK=mask is not None,
            RELU_HW_MAX=relu_uses_hw_max(out.device), INTERPRET=_triton.interpreting(), BLOCK=bn_kernels.APPLY_BLOCK,
            INDEX64=_index64(numel, bn_kernels.APPLY_BLOCK), num_warps=bn_kernels.APPLY_WARPS)


def bwd_reduce(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None, mask: torch.Tensor | None,
               mean: torch.Tensor, C: int, inner: int, sum_g: torch.Tensor, sum_gx: torch.Tensor) -> None:
    """sum_g[c] = sum of g, sum_gx[c] = sum of g * (x - mean[c]), g = dy gated by mask (or by out)."""
    numel = x.numel()
    if numel == 0:
        return
    assert out is not None or mask is not None
    bn_kernels = _triton.kernels("batch_norm")
    p = _reduce_plan(bn_kernels, numel, C, inner)
    with device_guard(x):
        part = torch.empty((p["splits"], 2, C), dtype=torch.float32, device=x.device)
        bn_kernels.bn_bwd_reduce_partial_kernel[p["grid"]](
            dy, x, out if out is not None else x, mask if mask is not None else x, mean, part, p["outer"], C,
            inner, p["row_stride"], p["JB"], p["tiles"], p["tiles_per_split"], FROM_MASK=mask is not None,
            BLOCK_O=p["BLOCK_O"], BLOCK_C=p["BLOCK_C"], BLOCK_J=p["BLOCK_J"], INDEX64=p["INDEX64"],
            num_warps=bn_kernels.REDUCE_WARPS)
        bn_kernels.bn_bwd_reduce_finish_kernel[(_triton.cdiv(C, bn_kernels.FINISH_BLOCK_C),)](
            part, sum_g, sum_gx, C, p["splits"], BLOCK_C=bn_kernels.FINISH_BLOCK_C, num_warps=bn_kernels.FINISH_WARPS)


def bwd_apply(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None, mask: torch.Tensor | None,
              mean: torch.Tensor, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, dx: torch.Tensor,
              dskip: torch.Tensor | None, C: int, inner: int) -> None:
    """dskip = g (if given); dx = (g - b - (x - mean) * d) * a, g = dy gated by mask (or by out)."""
    numel = dx.numel()
    if numel == 0:
        return
    assert out is not None or mask is not None
    bn_kernels = _triton.kernels("batch_norm")
    with device_guard(dx):
        bn_kernels.bn_bwd_apply_kernel[(_triton.cdiv(numel, bn_kernels.APPLY_BLOCK),)](
            dy, x, out if out is not None else x, mask if mask is not None else x, mean, a, b, d, dx,
            dskip if dskip is not None else dx, numel, C, inner, FROM_MASK=mask is not None,
            HAS_DSKIP=dskip is not None, INTERPRET=_triton.interpreting(), BLOCK=bn_kernels.APPLY_BLOCK,
            INDEX64=_index64(numel, bn_kernels.APPLY_BLOCK), num_warps=bn_kernels.APPLY_WARPS)
