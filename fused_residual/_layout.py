"""Layout helpers: dense layouts, when one flat pass over storage serves every operand, and otherwise the
coalesced iteration space of the strided kernels."""

from __future__ import annotations

from typing import Sequence

import torch


def is_dense_layout(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """``stride`` lays out ``shape`` without gaps or overlaps (in some dimension order)."""
    if len(shape) != len(stride):
        return False
    if any(size == 0 for size in shape):
        return True
    expected = 1
    for size, st in sorted(((s, st) for s, st in zip(shape, stride) if s != 1), key=lambda p: p[1]):
        if st != expected:
            return False
        expected *= size
    return True


def is_dense(t: torch.Tensor) -> bool:
    return is_dense_layout(t.shape, t.stride())


def same_dense_layout(ref: torch.Tensor, *others: torch.Tensor) -> bool:
    """Every tensor is dense and shares ``ref``'s strides (dims of size 1 aside), so storage element ``i``
    is element ``i`` of each: the flat kernels apply, whatever the memory format."""
    if ref.is_contiguous() and all(t.is_contiguous() for t in others):  # fast paths (C++ flags)
        return True
    if ref.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in (ref, *others)):
        return True
    if not is_dense(ref):
        return False
    for t in others:
        if not is_dense(t):
            return False
        for d in range(ref.dim()):
            if ref.shape[d] > 1 and ref.stride(d) != t.stride(d):
                return False
    return True


def iteration_space(ref: torch.Tensor, *others: torch.Tensor, max_dims: int = 4):
    """The shape's dims in ``ref``'s storage order (outermost first), size-1 dims dropped and dims that are
    contiguous in every tensor merged. Returns ``(sizes, [strides of ref, strides of each other])`` padded
    at the front to ``max_dims`` dims, or ``None`` if more than ``max_dims`` dims remain."""
    tensors = (ref,) + others
    dims = sorted((d for d in range(ref.dim()) if ref.shape[d] != 1), key=lambda d: -ref.stride(d))
    sizes: list[int] = []
    strides: list[list[int]] = [[] for _ in tensors]
    for d in dims:
        size = ref.shape[d]
        if sizes and all(st[-1] == t.stride(d) * size for st, t in zip(strides, tensors)):
            sizes[-1] *= size
            for st, t in zip(strides, tensors):
                st[-1] = t.stride(d)
        else:
            sizes.append(size)
            for st, t in zip(strides, tensors):
                st.append(t.stride(d))
    if len(sizes) > max_dims:
        return None
    pad = max_dims - len(sizes)
    return [1] * pad + sizes, [[0] * pad + st for st in strides]
