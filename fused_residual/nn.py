"""Modules: the add+ReLU tail and the MLP residual block."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._checks import SUPPORTED_DTYPES
from . import functional
from .functional import SAVE_MODES, add_relu, dual_linear_add_relu, linear_add_relu

for _name in functional.__all__:  # FX: one call node each (see functional.py)
    if _name in globals():
        torch.fx.wrap(_name)
del _name


class AddReLU(nn.Module):
    """``relu(z + skip)``, the module form of :func:`fused_residual.add_relu`."""

    def __init__(self, save: str = "output"):
        super().__init__()
        if save not in SAVE_MODES:
            raise ValueError(f"AddReLU: save must be one of {SAVE_MODES}, got {save!r}")
        self.save = save

    def forward(self, z: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript: the eager expression (the fused function is Python)
            return torch.relu(z + skip)
        if isinstance(z, torch.Tensor) and z.dtype not in SUPPORTED_DTYPES:  # float64: as eager (FX: a proxy)
            return torch.relu(z + skip)
        return self._fused(z, skip)

    @torch.jit.unused
    def _fused(self, z: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return add_relu(z, skip, save=self.save)

    def extra_repr(self) -> str:
        return f"save={self.save!r}"


class ResidualBlock(nn.Module):
    """The MLP residual block ``out = relu(fc2(relu(fc1(a))) + shortcut(a))``.

    ``shortcut`` is the identity when ``in_features == out_features``, else a bias-free ``nn.Linear`` (the
    projection W_s). The tail runs as one kernel: ``linear_add_relu`` (identity shortcut) or
    ``dual_linear_add_relu`` (projection: fc2 and W_s accumulate into one product before bias and ReLU).
    ``hidden_features`` defaults to ``out_features``.
    """

    def __init__(self, in_features: int, out_features: int | None = None, hidden_features: int | None = None,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or out_features
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.hidden_features = in_features, out_features, hidden_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)
        self.shortcut = (nn.Identity() if in_features == out_features
                         else nn.Linear(in_features, out_features, bias=False, **factory))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(a))
        if torch.jit.is_scripting():  # TorchScript: the eager expression (the fused functions are Python)
            return F.relu(self.fc2(h) + self.shortcut(a))
        if isinstance(a, torch.Tensor) and a.dtype not in SUPPORTED_DTYPES:  # float64: as eager (FX: a proxy)
            return F.relu(self.fc2(h) + self.shortcut(a))
        return self._tail(h, a)

    @torch.jit.unused
    def _tail(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if isinstance(self.shortcut, nn.Identity):
            return linear_add_relu(h, self.fc2.weight, a, self.fc2.bias)
        return dual_linear_add_relu(h, self.fc2.weight, a, self.shortcut.weight, self.fc2.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden_features={self.hidden_features}, " \
               f"out_features={self.out_features}"
