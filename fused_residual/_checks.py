"""Argument checks shared by the public functions and the ops' real and fake implementations.

Errors name the op, the argument and the offending value: TypeError for non-tensors and unsupported or
mismatched dtypes, ValueError for shapes, devices and options.
"""

from __future__ import annotations

import torch

from ._layout import is_dense

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The short names the CLI, verify and the benchmarks use for them.
DTYPES_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = "float32, float16, bfloat16"


def tensors(op: str, **named) -> None:
    """Each named argument is a tensor."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def optional_tensors(op: str, **named) -> None:
    tensors(op, **{k: v for k, v in named.items() if v is not None})


def floating(op: str, **named) -> None:
    """Tensors share one supported floating dtype and one device."""
    _floating(op, True, named)


def floating_mixed(op: str, **named) -> None:
    """Tensors have supported floating dtypes, not necessarily one (autocast), and share one device."""
    _floating(op, False, named)


def _floating(op: str, same_dtype: bool, named: dict) -> None:
    items = [(k, v) for k, v in named.items() if v is not None]
    for name, t in items:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported dtypes are {_DTYPE_NAMES}")
    first_name, first = items[0]
    for name, t in items[1:] if same_dtype else ():
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: dtypes differ: {first_name} is {first.dtype}, {name} is {t.dtype}")
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: devices differ: {first_name} is on {first.device}, {name} is on {t.device}")


def same_shape(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{op}: shapes differ: {a_name} is {tuple(a.shape)}, {b_name} is {tuple(b.shape)} "
                         "(no broadcasting)")


def shape(op: str, name: str, t: torch.Tensor, expected: tuple, why: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(expected)} ({why})")


def writable_destination(op: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst`` can be written element by element while ``src`` is read (the in-place ops' contract)."""
    if torch._debug_has_internal_overlap(dst) == 1:
        raise ValueError(f"{op}: z has overlapping elements (stride {tuple(dst.stride())}), so it cannot be "
                         "written in place")
    if dst.numel() == 0 or src.numel() == 0 or dst.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
        return
    if dst.storage_offset() == src.storage_offset() and dst.stride() == src.stride():
        return  # the same view: each element is read before it is written, by the same program
    if not (is_dense(dst) and is_dense(src)):
        return  # interleaved strided views are left to the user, as eager PyTorch does

    def extent(t):
        lo = t.storage_offset()
        return lo, lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1

    (a0, a1), (b0, b1) = extent(dst), extent(src)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{op}: skip partially overlaps z in memory; writing z in place would change skip "
                         "while it is read")
