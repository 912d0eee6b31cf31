"""Eager PyTorch definitions of every fused op: the test oracle and the ``eager`` backend.

Nothing here is fused; each function is the formula the fused kernels must reproduce. For ``add_relu`` the
kernels must match these bit for bit; for the GEMM ops they must stay within the accuracy rule in the README.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._layout import is_dense

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def add_relu(z: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    return torch.relu(z + skip)


def relu_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """PyTorch's ReLU backward: ``grad`` where ``not (out <= 0)``, else 0."""
    return torch.ops.aten.threshold_backward(grad, out, 0)


def storage_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as a 1-D view in storage order."""
    if not is_dense(t):
        raise ValueError("storage_order needs a dense tensor")
    return t.as_strided((t.numel(),), (1,))


def pack_mask(out: torch.Tensor) -> torch.Tensor:
    """The ReLU gradient gate ``not (out <= 0)`` of a dense ``out``, 1 bit per element in storage order:
    bit ``i % 8`` of byte ``i // 8``. ``ceil(numel / 8)`` uint8 bytes."""
    keep = ~(storage_order(out) <= 0)
    pad = (-keep.numel()) % 8
    keep = torch.cat([keep, keep.new_zeros(pad)]) if pad else keep
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=out.device)
    return (keep.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``numel`` elements in storage order."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return ((mask[:, None] & weights) != 0).reshape(-1)[:numel]


def linear_add_relu(x, weight, residual, bias=None):
    return torch.relu(F.linear(x, weight, bias) + residual)


def dual_linear_add_relu(x, weight, shortcut, shortcut_weight, bias=None):
    return torch.relu(F.linear(x, weight, bias) + F.linear(shortcut, shortcut_weight))


def conv1x1_add_relu(x, weight, residual, bias=None, stride=1):
    return torch.relu(F.conv2d(x, weight, bias, stride=stride) + residual)


def dual_conv1x1_add_relu(x, weight, shortcut, shortcut_weight, bias=None, shortcut_stride=1):
    return torch.relu(F.conv2d(x, weight, bias) + F.conv2d(shortcut, shortcut_weight, stride=shortcut_stride))
