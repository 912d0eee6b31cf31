"""Allocation of op outputs, in one place for every backend.

* CPU outputs of 4 MiB or more get transparent huge pages advised before their first write (through the
  C++ extension, when built): first-touch page faults otherwise dominate a memory-bound op on CPU.
* ``poison_outputs()`` fills every new output with the byte 0x55 (a finite, unusual value in all three
  float dtypes) so that tests see any element a kernel forgot to write.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

POISON_BYTE = 0x55
_HUGE_PAGE_MIN_BYTES = 4 << 20
_poison = contextvars.ContextVar("fused_residual_poison", default=False)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill op outputs with 0x55 bytes on allocation (a test aid; costs one extra write per output)."""
    token = _poison.set(enabled)
    try:
        yield
    finally:
        _poison.reset(token)


def _prepare(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu" and t.numel() * t.element_size() >= _HUGE_PAGE_MIN_BYTES:
        from . import _cpp

        if _cpp.status()[0]:
            _cpp.module().advise_huge_pages(t)
    if _poison.get() and t.numel():
        t.untyped_storage().fill_(POISON_BYTE)
    return t


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor like ``t`` (its layout when ``t`` is dense, else its suggested memory format)."""
    return _prepare(torch.empty_like(t))


def empty_strided(shape, stride, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _prepare(torch.empty_strided(shape, stride, dtype=dtype or like.dtype, device=like.device))


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None,
          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    return _prepare(torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format))
