"""The public fused functions. Each checks its arguments and calls the ``torch.ops.fused_residual`` op."""

from __future__ import annotations

import torch

from . import _checks
from . import ops as _ops  # noqa: F401  (registers torch.ops.fused_residual.*)
from .ops.add_relu import AddReLUInplace

SAVE_MODES = ("output", "mask")


def add_relu(z: torch.Tensor, skip: torch.Tensor, *, save: str = "output") -> torch.Tensor:
    """``relu(z + skip)`` as a new tensor with z's shape, dtype and memory format, bit-identical to eager.

    ``save`` picks what autograd keeps for the backward: ``"output"`` (the result, as eager does) or
    ``"mask"`` (the ReLU gate packed 1 bit per element, ``ceil(numel / 8)`` bytes; identical gradients).
    z and skip must have the same shape (no broadcasting), dtype (float32, float16 or bfloat16) and device.
    """
    _checks.tensors("add_relu", z=z, skip=skip)
    if save not in SAVE_MODES:
        raise ValueError(f"add_relu: save must be one of {SAVE_MODES}, got {save!r}")
    if save == "mask" and torch.is_grad_enabled() and (z.requires_grad or skip.requires_grad):
        return torch.ops.fused_residual.add_relu_with_mask(z, skip)[0]
    return torch.ops.fused_residual.add_relu(z, skip)


def add_relu_(z: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``z = relu(z + skip)`` in place; returns z.

    Autograd works when z is not a leaf (as for eager in-place ops, a leaf that requires grad is rejected).
    Nothing is written into z when an argument is rejected.
    """
    _checks.tensors("add_relu_", z=z, skip=skip)
    if torch.is_grad_enabled() and (z.requires_grad or skip.requires_grad):
        if z.is_leaf and z.requires_grad:
            raise RuntimeError("add_relu_: a leaf Variable that requires grad is being used in an in-place "
                               "operation")
        if z._base is not None and z._base.is_leaf and z._base.requires_grad:
            raise RuntimeError("add_relu_: a view of a leaf Variable that requires grad is being used in an "
                               "in-place operation")
        return AddReLUInplace.apply(z, skip)
    torch.ops.fused_residual.add_relu_(z, skip)
    return z
