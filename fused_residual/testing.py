"""The numerics policy as code, shared by ``fused-residual verify`` and the test suite.

* :func:`bitwise_mismatches`: the bit-exact rule (add+ReLU): NaN exactly where the reference has NaN, every
  other element bit for bit equal, so +0 and -0 differ. NaN payloads are not compared (PyTorch does not
  define them).
* :func:`accuracy`: the rule for fused GEMMs, ``max|fused - ref64| <= 2 * max|eager - ref64| +
  atol[dtype] * max(1, max|ref64|)``, with ``ref64`` the same computation in float64.
* input builders: fresh random values with NaN / +-Inf / +-0 sprinkled in, and the same values in other
  memory layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SPECIALS = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0)
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced")
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def bitwise_mismatches(actual: torch.Tensor, expected: torch.Tensor) -> tuple[int, str]:
    """(number of elements breaking the bit-exact rule, a description of the first one or "")."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return max(actual.numel(), 1), (f"shape/dtype {tuple(actual.shape)} {actual.dtype} != "
                                        f"{tuple(expected.shape)} {expected.dtype}")
    e_nan = expected.isnan()
    bad = (actual.isnan() != e_nan) | ((bits(actual) != bits(expected)) & ~e_nan.contiguous())
    n = int(bad.sum())
    if not n:
        return 0, ""
    i = bad.reshape(-1).nonzero()[0].item()
    return n, (f"first at flat index {i}: {actual.reshape(-1)[i].item()!r} vs "
               f"{expected.reshape(-1)[i].item()!r}")


@dataclass
class Accuracy:
    error: float  # max |fused - ref64|
    eager_error: float  # max |eager - ref64|
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # False for NaN errors too


def accuracy(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor) -> Accuracy:
    if fused.shape != ref64.shape:
        return Accuracy(float("inf"), 0.0, 0.0)
    if fused.numel() == 0:
        return Accuracy(0.0, 0.0, 0.0)
    err = (fused.double() - ref64).abs().max().item()
    if fused.isnan().any():
        err = float("nan")
    eager_err = (eager.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    return Accuracy(err, eager_err, 2 * eager_err + ATOL[fused.dtype] * scale)


def with_specials(t: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """``t`` with a random ``fraction`` of its elements replaced by NaN, +-Inf and +-0 (in place)."""
    flat = t.view(-1) if t.is_contiguous() else None
    if flat is None:
        raise ValueError("with_specials needs a contiguous tensor")
    n = flat.numel()
    k = max(1, int(n * fraction)) if n else 0
    idx = torch.randperm(n, device=t.device)[:k]
    vals = torch.tensor(SPECIALS, dtype=t.dtype, device=t.device)
    flat[idx] = vals[torch.randint(len(SPECIALS), (k,), device=t.device)]
    return t


def layout(base: torch.Tensor, kind: str) -> torch.Tensor:
    """``base``'s values in layout ``kind`` (same shape and values; only strides differ)."""
    if kind == "contiguous":
        return base.contiguous()
    if kind == "channels_last":
        return base.contiguous(memory_format=torch.channels_last) if base.dim() == 4 else base.contiguous()
    if kind == "transposed":  # a permuted dense tensor: last two dims swapped in memory
        return base.transpose(-1, -2).contiguous().transpose(-1, -2) if base.dim() >= 2 else base.contiguous()
    if kind == "sliced":  # a non-dense view into a larger buffer (every other element, offset by one)
        big = torch.full([s * 2 + 1 for s in base.shape], 12345.0, dtype=base.dtype, device=base.device)
        view = big[tuple(slice(1, 1 + 2 * s, 2) for s in base.shape)]
        view.copy_(base)
        return view
    raise ValueError(f"unknown layout {kind!r}; expected one of {LAYOUTS}")


def accuracy_l2(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, floor: float = 0.0) -> Accuracy:
    """:func:`accuracy` in the L2 norm, with twice the factor: ``||fused - ref64|| <= 4 ||eager - ref64|| +
    max(atol * max(1, ||ref64||), floor * ||ref64||)``. For gradients through half-precision ReLUs, whose
    gates flip with rounding for a fraction of the elements in any computation (eager's included) against
    float64: the worst element is chance there, the norms of two independent sets of flips differ by up to
    ~3x from draw to draw, and a draw where eager flips no gate at all leaves it an error near 0 (float16
    Bottleneck: a fused gradient with two flips then reads 100x eager's). ``floor``: the relative error
    eager itself reaches over many draws, below which the comparison says nothing."""
    if fused.shape != ref64.shape:
        return Accuracy(float("inf"), 0.0, 0.0)
    err = torch.linalg.vector_norm(fused.double() - ref64).item()
    eager_err = torch.linalg.vector_norm(eager.double() - ref64).item()
    norm = torch.linalg.vector_norm(ref64).item()
    return Accuracy(err, eager_err, 4 * eager_err + max(ATOL[fused.dtype] * max(1.0, norm), floor * norm))


def relu_margin(model: torch.nn.Module, *inputs) -> float:
    """The smallest ``|pre-activation| / max |pre-activation|`` over every call of every ``nn.ReLU`` in
    ``model`` (run on a copy, so running statistics stay as they are). A float32 computation and float64 may
    put an input closer to 0 than rounding on either side of the kink: its gradient then differs by the
    whole gradient there, in any reimplementation. Checks of float32 gradients through ReLUs draw inputs
    whose margin is clear of that."""
    import copy

    probe = copy.deepcopy(model)
    margins = []

    def hook(module, args):
        v = args[0].detach().abs()
        if v.numel():
            margins.append((v.min() / v.max().clamp_min(1e-300)).item())

    handles = [m.register_forward_pre_hook(hook) for m in probe.modules() if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        probe(*inputs)
    for h in handles:
        h.remove()
    return min(margins, default=1.0)


def draw_clear_of_relu_kinks(model: torch.nn.Module, draw, margin: float = 2e-6, tries: int = 20):
    """``draw()`` until :func:`relu_margin` of ``model`` (float64) on its result is at least ``margin``; the
    last draw after ``tries``."""
    for _ in range(tries):
        x = draw()
        if relu_margin(model, x.double()) >= margin:
            return x
    return x
