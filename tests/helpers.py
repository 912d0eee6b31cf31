"""Shared test helpers: devices and backends to cover, input builders, exactness and accuracy checks."""

from __future__ import annotations

import torch

import fused_residual
from fused_residual import _triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    if device == "cuda":
        return ["triton", "eager"]
    names = ["cpp", "eager"]
    if _triton.status()[0] and _triton.interpreting():
        names.insert(0, "triton")
    return names


def device_backend_params():
    """(device, backend) pairs this machine can run, for parametrize."""
    import pytest

    marks = {"cuda": [pytest.mark.cuda]}
    return [pytest.param(d, b, id=f"{d}-{b}", marks=marks.get(d, [])) for d in devices() for b in backends_for(d)]


def with_specials(t: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """``t`` with a random ``fraction`` of its elements replaced by NaN, +-Inf and +-0."""
    flat = t.reshape(-1)
    n = flat.numel()
    k = max(1, int(n * fraction)) if n else 0
    idx = torch.randperm(n, device=t.device)[:k]
    vals = torch.tensor(SPECIALS, dtype=t.dtype, device=t.device)
    flat[idx] = vals[torch.randint(len(SPECIALS), (k,), device=t.device)]
    return t


def layout(base: torch.Tensor, kind: str) -> torch.Tensor:
    """``base``'s values in the layout ``kind`` (same shape and values; only strides differ)."""
    if kind == "contiguous":
        return base.contiguous()
    if kind == "channels_last":
        return base.contiguous(memory_format=torch.channels_last) if base.dim() == 4 else base.contiguous()
    if kind == "transposed":  # a permuted dense tensor: last two dims swapped in memory
        if base.dim() < 2:
            return base.contiguous()
        return base.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":  # a non-dense view into a larger buffer
        big = torch.empty(*[s * 2 + 1 for s in base.shape], dtype=base.dtype, device=base.device)
        big.fill_(12345.0)
        view = big[tuple(slice(1, 1 + 2 * s, 2) for s in base.shape)]
        view.copy_(base)
        return view
    raise ValueError(kind)


LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.float32: torch.int32, torch.float16: torch.int16,
                                torch.bfloat16: torch.int16}[t.dtype])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same shape and dtype, NaN exactly where expected has NaN, and every other element bit for bit equal
    (so +0 and -0 differ). NaN payloads are not compared: PyTorch does not define them."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a_nan, e_nan = actual.isnan(), expected.isnan()
    nan_diff = (a_nan != e_nan).sum().item()
    assert nan_diff == 0, f"{what}: {nan_diff} elements differ in NaN-ness"
    diff = (bits(actual) != bits(expected)) & ~e_nan.contiguous()
    n = int(diff.sum())
    if n:
        i = diff.reshape(-1).nonzero()[0].item()
        raise AssertionError(f"{what}: {n} of {actual.numel()} elements differ in their bits; first at flat "
                             f"index {i}: {actual.reshape(-1)[i].item()!r} vs {expected.reshape(-1)[i].item()!r}")


# atol of the accuracy rule, per dtype (README "Numerics")
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_ref(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str = "") -> None:
    """``max|fused - ref64| <= 2 * max|eager - ref64| + atol * max(1, max|ref64|)``."""
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert not fused.isnan().any(), f"{what}: NaN in output"
    err = (fused.double() - ref64).abs().max().item() if fused.numel() else 0.0
    eager_err = (eager.double() - ref64).abs().max().item() if fused.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if fused.numel() else 1.0)
    bound = 2 * eager_err + ATOL[fused.dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (eager's error {eager_err:.3g})"


def poisoned():
    return fused_residual._alloc.poison_outputs()
