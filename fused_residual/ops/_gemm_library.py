"""The GEMM ops' products on the vendor libraries, with our add + ReLU pass after them.

* CUDA: where a single product's arithmetic intensity is high (:func:`gemm_path`), cuBLAS / cuDNN compute
  it (the bias in their epilogue) and the add_relu kernel adds the residual and applies ReLU in place.
* CPU (the ``cpp`` backend): BLAS computes the product with the residual as addmm's beta*C term, in row
  blocks that stay in L2 cache, and the C++ kernels apply bias + ReLU in place; 1x1 convolutions run on
  oneDNN (``F.conv2d``) with the add_relu kernel after them.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from .. import _cpp
from ._gemm_layout import TRITON_MAX_ROWS, Operand, output_dims


# Arithmetic intensity (FLOP per byte the fused op must move) from which a single product runs on cuBLAS /
# cuDNN and the add+ReLU as a second in-place pass: there the product dominates, and the vendor GEMM beats
# ours by more than the extra pass costs. Measured on an H200 (benchmarks/results, bf16): at 397 FLOP/B
# (M=12544, N=2048, K=1024) the library path takes 0.117 ms against the Triton kernel's 0.158; at 204-224
# (the ResNet-50 layer-3/4 shortcuts and conv3) the Triton kernel wins, 0.241 against 0.304 ms.
# Dual products always take the Triton kernel: the library path would write and re-read a second M x N
# product (dual M=200704, N=512, K=128+256: 0.251 ms Triton against 0.322 ms library).
LIBRARY_MIN_INTENSITY = 350.0
GEMM_PATHS = ("auto", "triton", "library")
_gemm_path: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_residual_gemm_path", default=None)


@contextlib.contextmanager
def use_gemm_path(name: str):
    """Force the CUDA GEMM ops onto one path: "triton" (the fused kernel), "library" (vendor product + fused
    add+ReLU pass) or "auto" (by arithmetic intensity). Also ``$FUSED_RESIDUAL_GEMM_PATH``."""
    if name not in GEMM_PATHS:
        raise ValueError(f"unknown GEMM path {name!r}; expected one of {GEMM_PATHS}")
    token = _gemm_path.set(name)
    try:
        yield
    finally:
        _gemm_path.reset(token)


def intensity(operands: list[Operand], residual, out) -> float:
    M, N, _, _ = output_dims(out)
    flops = 2.0 * M * N * sum(op.k for op in operands)
    elements = sum(M * op.k + N * op.k for op in operands) + M * N * (2 if residual is not None else 1)
    return flops / max(1, elements * out.element_size())


def gemm_path(operands: list[Operand], residual, out) -> str:
    name = _gemm_path.get() or os.environ.get("FUSED_RESIDUAL_GEMM_PATH", "auto")
    if name not in GEMM_PATHS:
        raise ValueError(f"unknown GEMM path {name!r} (FUSED_RESIDUAL_GEMM_PATH); expected one of {GEMM_PATHS}")
    if name != "auto":
        return name
    if output_dims(out)[0] > TRITON_MAX_ROWS:
        return "library"
    if len(operands) > 1:
        return "triton"
    return "library" if intensity(operands, residual, out) >= LIBRARY_MIN_INTENSITY else "triton"


def library_gemm(operands: list[Operand], bias, residual, new_out, add_relu_inplace) -> torch.Tensor:
    """res = first product + bias by the vendor library; then relu(res + residual or second product) in place
    by ``add_relu_inplace(res, skip)``."""
    first, rest = operands[0], operands[1:]

    def product(op, b=None):
        if op.x.dim() == 2:
            return torch.nn.functional.linear(op.x, op.weight, b)
        return torch.nn.functional.conv2d(op.x, op.weight, b, stride=op.stride)

    res = product(first, bias)
    add_relu_inplace(res, residual if residual is not None else product(rest[0]))
    if res.stride() == new_out(meta=True).stride():
        return res
    return new_out().copy_(res)  # the library chose another memory format than the op promises


# The CPU path runs in row blocks of about this many output bytes: BLAS writes a block (residual included)
# and the bias + ReLU pass rewrites it while it is still in the core's L2 cache, instead of streaming the
# whole output through DRAM a second time. Measured on a 2-core EPYC VM (1 MiB L2 per core), M=4096,
# N=K=512 fp32: 11.5 ms with 1024-row (2 MiB) blocks, 12.3 ms unblocked, 12.5 ms eager; 256-row blocks
# lose the gain to BLAS call overhead (12.1 ms).
CPU_BLOCK_BYTES = 2 << 20


def cpp_gemm(operands: list[Operand], bias, residual, new_out) -> torch.Tensor:
    cpu_kernels = _cpp.module()
    first, rest = operands[0], operands[1:]
    if first.x.dim() != 2:  # 1x1 convolutions: mkldnn, then the add_relu kernel in place
        return library_gemm(operands, bias, residual, new_out, lambda r, s: cpu_kernels.add_relu_fwd(r, s, r, None))
    out = new_out()
    M, N = out.shape
    rows = max(64, CPU_BLOCK_BYTES // max(1, N * out.element_size()))

    # float16 with a bias: the bias goes first, as in eager (x @ W^T + residual may overflow float16's
    # range where x @ W^T + bias + residual does not); the residual then comes with the ReLU pass.
    bias_first = bias is not None and out.dtype == torch.float16

    def block(o, res, xs):
        if bias_first:
            torch.addmm(bias, xs[0], first.weight.t(), out=o)
        elif res is not None:  # the residual rides in addmm's beta*C term: BLAS writes the block once
            torch.addmm(res, xs[0], first.weight.t(), out=o)
        else:
            torch.mm(xs[0], first.weight.t(), out=o)
        for x, op in zip(xs[1:], rest):
            o.addmm_(x, op.weight.t())
        if bias_first and res is not None:
            cpu_kernels.add_relu_fwd(o, res, o, None)
        else:
            cpu_kernels.bias_relu_rows_(o, None if bias_first else bias)

    if M <= rows:
        block(out, residual, [op.x for op in operands])
        return out
    for lo in range(0, M, rows):
        hi = min(M, lo + rows)
        block(out[lo:hi], residual[lo:hi] if residual is not None else None, [op.x[lo:hi] for op in operands])
    return out
