"""Test helpers: devices and backends to cover, and assertions over fused_residual.testing's rules."""

from __future__ import annotations

import pytest
import torch

import fused_residual
from fused_residual import _triton
from fused_residual.testing import ATOL, LAYOUTS, accuracy, bitwise_mismatches, layout, with_specials  # noqa: F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    if device == "cuda":
        return ["triton", "eager"]
    names = ["cpp", "eager"]
    if _triton.status()[0] and _triton.interpreting():
        names.insert(0, "triton")
    return names


def device_params():
    """The devices this machine has, for parametrize; the CUDA one carries the cuda mark."""
    return [pytest.param(d, id=d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in devices()]


def device_backend_params():
    """(device, backend) pairs this machine can run, for parametrize; CUDA ones carry the cuda mark."""
    marks = {"cuda": [pytest.mark.cuda]}
    return [pytest.param(d, b, id=f"{d}-{b}", marks=marks.get(d, [])) for d in devices() for b in backends_for(d)]


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    n, first = bitwise_mismatches(actual, expected)
    assert n == 0, f"{what}: {n} of {actual.numel()} elements break bit-exactness; {first}"


def assert_close_to_ref(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str = "") -> None:
    acc = accuracy(fused, eager, ref64)
    assert acc.ok, (f"{what}: max error {acc.error:.3g} > bound {acc.bound:.3g} "
                    f"(eager's error {acc.eager_error:.3g})")


def poisoned():
    return fused_residual._alloc.poison_outputs()
