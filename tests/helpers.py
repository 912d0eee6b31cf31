"""Test helpers: assertions over fused_residual.testing's rules.

The cases to cover (dtypes, shapes, layouts, devices and backends) live in ``cases.py``; the names below are
re-exported from there so that ``from helpers import ...`` keeps working.
"""

from __future__ import annotations

import torch

import fused_residual
from cases import (DTYPES, LAYOUTS, backends_for, device_backend_params, device_params, devices,  # noqa: F401
                   layout)
from fused_residual.testing import ATOL, accuracy, bitwise_mismatches, with_specials  # noqa: F401


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    n, first = bitwise_mismatches(actual, expected)
    assert n == 0, f"{what}: {n} of {actual.numel()} elements break bit-exactness; {first}"


def assert_close_to_ref(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str = "") -> None:
    acc = accuracy(fused, eager, ref64)
    assert acc.ok, (f"{what}: max error {acc.error:.3g} > bound {acc.bound:.3g} "
                    f"(eager's error {acc.eager_error:.3g})")


def poisoned():
    return fused_residual._alloc.poison_outputs()


class NoOpFunctionMode(torch.overrides.TorchFunctionMode):
    """A TorchFunction mode that changes nothing: while one is active the public functions take the
    registered ops (``torch.ops.fused_residual.*``), not the eager fast paths."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
