"""GEMM + bias + residual + ReLU: launchers, torch.library registration, fake impls and autograd.

Ops (namespace ``fused_residual``):

* ``linear_add_relu(x, weight, residual, bias?)``          relu(x @ weight.T + bias + residual)
* ``dual_linear_add_relu(x, weight, shortcut, shortcut_weight, bias?)``
                                                            relu(x @ weight.T + shortcut @ shortcut_weight.T + bias)
* ``conv1x1_add_relu(x, weight, residual, bias?, stride)``  relu(conv2d(x, weight, bias, stride) + residual)
* ``dual_conv1x1_add_relu(x, weight, shortcut, shortcut_weight, bias?, shortcut_stride)``
                                  relu(conv2d(x, weight, bias) + conv2d(shortcut, shortcut_weight, stride))
* ``relu_grad_colsum(grad, out, with_colsum) -> (grad_masked, colsum)``   the fused part of the backward

All four forward ops share one Triton kernel (``kernels/gemm_add_relu.py``) and one backward: the ReLU mask
is applied once, by ``relu_grad_colsum``, which also yields the residual gradient and the two-stage,
deterministic bias gradient; the input and weight gradients are GEMMs on that masked gradient, run by cuBLAS
/ cuDNN (``torch.mm``, ``aten.convolution_backward``) rather than Triton: the benchmark in
``benchmarks/bench_linear.py`` measures our Triton GEMM against ``torch.mm`` and cuBLAS wins or ties on the
shapes we target, and it is the library users already trust for dgrad/wgrad.

CPU (``cpp``): BLAS does the product with the residual as addmm's beta*C term (or mkldnn's convolution),
and the C++ kernels apply bias + ReLU (or add the residual + ReLU) in place: one extra pass instead of
eager's three.

This module holds the checks, the op specs, the backward and autocast; the rest lives by concern:
``_gemm_layout`` (operands, strides, memory formats, TF32 policy), ``_gemm_triton`` (launch, autotuning,
TMA) and ``_gemm_library`` (the vendor-library path on CUDA and the CPU path).
"""

from __future__ import annotations

from typing import Optional  # custom-op signatures: Optional, which every torch's infer_schema knows

import torch

from .. import _alloc, _checks, _cpp, _triton, reference
from ._gemm_layout import (TRITON_MAX_ROWS, Operand, as_rows, conv_out_size, output_dims, output_memory_format,
                           rows_of)
from ._gemm_library import cpp_gemm, gemm_path, library_gemm
from ._gemm_triton import triton_gemm, triton_relu_grad_colsum
from ._registry import AUTOCAST_KEYS, OpSpec, dispatch, register
from .add_relu import FORWARD as ADD_RELU_FORWARD


# ---------------------------------------------------------------------------------------------------------
# Backend dispatch


def _triton_run(operands: list[Operand], bias, residual, new_out, eager) -> torch.Tensor:
    if gemm_path(operands, residual, new_out(meta=True)) == "library":
        add_relu_inplace = ADD_RELU_FORWARD["triton"]
        return library_gemm(operands, bias, residual, new_out, lambda r, s: add_relu_inplace(r, s, r, None))
    out = new_out()
    triton_gemm(operands, bias, residual, out)
    return out


RUN = {"triton": _triton_run,
       "cpp": lambda operands, bias, residual, new_out, eager: cpp_gemm(operands, bias, residual, new_out),
       "eager": lambda operands, bias, residual, new_out, eager: new_out().copy_(eager())}


def _run(new_out, operands: list[Operand], bias, residual, eager) -> torch.Tensor:
    """The op's result on the backend in effect. ``new_out(meta=False)`` allocates the output in the layout
    the op promises (its fake impl's); ``eager()`` is the reference formula for the eager backend."""
    return dispatch(RUN, operands[0].x.device)(operands, bias, residual, new_out, eager)


# ---------------------------------------------------------------------------------------------------------
# Checks


def _check_weight(op: str, name: str, weight: torch.Tensor, k: int, k_from: str, conv: bool) -> int:
    if conv:
        if weight.dim() != 4 or weight.shape[2:] != (1, 1):
            raise ValueError(f"{op}: {name} must be a 1x1 convolution weight [Cout, Cin, 1, 1], got shape "
                             f"{tuple(weight.shape)}")
    elif weight.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if weight.shape[1] != k:
        raise ValueError(f"{op}: {k_from} has K={k} but {name} {tuple(weight.shape)} has K={weight.shape[1]}")
    if conv and k == 0:  # F.conv2d returns a wrongly shaped result for that, so no backend can match eager
        raise ValueError(f"{op}: {k_from} has no input channels; a 1x1 convolution needs at least one")
    return weight.shape[0]


def _check_bias(op: str, bias, n: int) -> None:
    if bias is not None:
        _checks.shape(op, "bias", bias, (n,), "one value per output feature")


def check_stride(op: str, name: str, stride) -> None:
    """A positive int; under torch.compile a symbolic one too (dynamo makes an int argument dynamic once
    its value changes between calls)."""
    if isinstance(stride, torch.SymInt):
        torch._check(stride >= 1, lambda: f"{op}: {name} must be a positive int, got {stride}")
    elif not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {stride!r}")


def _check_linear(op, x, weight, residual, bias) -> int:
    _checks.floating(op, x=x, weight=weight, residual=residual, bias=bias)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim [..., K], got a 0-dim tensor")
    n = _check_weight(op, "weight", weight, x.shape[-1], f"x {tuple(x.shape)}", conv=False)
    if residual is not None:
        _checks.shape(op, "residual", residual, (*x.shape[:-1], n), f"x's leading dims and weight's N={n}")
    _check_bias(op, bias, n)
    return n


def _check_dual_linear(op, x, weight, shortcut, shortcut_weight, bias) -> int:
    _checks.floating(op, x=x, weight=weight, shortcut=shortcut, shortcut_weight=shortcut_weight, bias=bias)
    n = _check_linear(op, x, weight, None, bias)
    if shortcut.dim() < 1 or shortcut.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: shortcut {tuple(shortcut.shape)} must have x's leading dims "
                         f"{tuple(x.shape[:-1])}")
    n2 = _check_weight(op, "shortcut_weight", shortcut_weight, shortcut.shape[-1],
                       f"shortcut {tuple(shortcut.shape)}", conv=False)
    if n2 != n:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} and shortcut_weight {tuple(shortcut_weight.shape)} "
                         "must have the same number of outputs N")
    return n


def _check_conv(op, x, weight, residual, bias, stride) -> tuple[int, int, int, int]:
    _checks.floating(op, x=x, weight=weight, residual=residual, bias=bias)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [B, Cin, H, W], got shape {tuple(x.shape)}")
    check_stride(op, "stride", stride)
    n = _check_weight(op, "weight", weight, x.shape[1], f"x {tuple(x.shape)}", conv=True)
    out_shape = (x.shape[0], n, conv_out_size(x.shape[2], stride), conv_out_size(x.shape[3], stride))
    if residual is not None:
        _checks.shape(op, "residual", residual, out_shape,
                      f"the output of a stride-{stride} 1x1 convolution of x {tuple(x.shape)}")
    _check_bias(op, bias, n)
    return out_shape


def _check_dual_conv(op, x, weight, shortcut, shortcut_weight, bias, shortcut_stride):
    _checks.floating(op, x=x, weight=weight, shortcut=shortcut, shortcut_weight=shortcut_weight, bias=bias)
    out_shape = _check_conv(op, x, weight, None, bias, 1)
    if shortcut.dim() != 4:
        raise ValueError(f"{op}: shortcut must be 4-D [B, C, H, W], got shape {tuple(shortcut.shape)}")
    check_stride(op, "shortcut_stride", shortcut_stride)
    n2 = _check_weight(op, "shortcut_weight", shortcut_weight, shortcut.shape[1],
                       f"shortcut {tuple(shortcut.shape)}", conv=True)
    short_out = (shortcut.shape[0], n2, conv_out_size(shortcut.shape[2], shortcut_stride),
                 conv_out_size(shortcut.shape[3], shortcut_stride))
    if short_out != out_shape:
        raise ValueError(f"{op}: the shortcut's stride-{shortcut_stride} output {short_out} (shortcut "
                         f"{tuple(shortcut.shape)}, shortcut_weight {tuple(shortcut_weight.shape)}) does not "
                         f"match the main output {out_shape} (x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    return out_shape


def _conv_out(x: torch.Tensor, out_shape):
    """Allocator of a 1x1 convolution's output in x's memory format (``meta=True``: strides only)."""
    def new_out(meta: bool = False) -> torch.Tensor:
        spec = torch.empty(out_shape, dtype=x.dtype, device="meta", memory_format=output_memory_format(x))
        return spec if meta else _alloc.empty_strided(spec.shape, spec.stride(), x)
    return new_out


def _rows_out(x: torch.Tensor, n: int):
    """Allocator of a linear op's output, viewed as [M, N] rows (``meta=True``: strides only)."""
    def new_out(meta: bool = False) -> torch.Tensor:
        shape = (x.shape[:-1].numel(), n)
        return torch.empty(shape, dtype=x.dtype, device="meta") if meta else _alloc.empty(shape, x)
    return new_out


def _unviewed(rows: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """The [M, N] result in x's leading shape, as a tensor of its own rather than a view of the op's
    internal matrix (autograd refuses in-place changes to a view a custom function returns)."""
    return rows.view(*x.shape[:-1], n).detach()


# ---------------------------------------------------------------------------------------------------------
# Ops


def _linear_add_relu(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    n = _check_linear("linear_add_relu", x, weight, residual, bias)
    return _unviewed(_run(_rows_out(x, n), [Operand(rows_of(x), weight)], bias, rows_of(residual),
                          lambda: rows_of(reference.linear_add_relu(x, weight, residual, bias))), x, n)


def _linear_add_relu_fake(x, weight, residual, bias=None):
    n = _check_linear("linear_add_relu", x, weight, residual, bias)
    return x.new_empty((*x.shape[:-1], n))


def _dual_linear_add_relu(x: torch.Tensor, weight: torch.Tensor, shortcut: torch.Tensor,
                         shortcut_weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    n = _check_dual_linear("dual_linear_add_relu", x, weight, shortcut, shortcut_weight, bias)
    operands = [Operand(rows_of(x), weight), Operand(rows_of(shortcut), shortcut_weight)]
    return _unviewed(_run(_rows_out(x, n), operands, bias, None,
                          lambda: rows_of(reference.dual_linear_add_relu(x, weight, shortcut, shortcut_weight, bias))),
                     x, n)


def _dual_linear_add_relu_fake(x, weight, shortcut, shortcut_weight, bias=None):
    n = _check_dual_linear("dual_linear_add_relu", x, weight, shortcut, shortcut_weight, bias)
    return x.new_empty((*x.shape[:-1], n))


def _conv1x1_add_relu(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, stride: int = 1) -> torch.Tensor:
    out_shape = _check_conv("conv1x1_add_relu", x, weight, residual, bias, stride)
    return _run(_conv_out(x, out_shape), [Operand(x, weight, stride)], bias, residual,
                lambda: reference.conv1x1_add_relu(x, weight, residual, bias, stride))


def _conv1x1_add_relu_fake(x, weight, residual, bias=None, stride=1):
    out_shape = _check_conv("conv1x1_add_relu", x, weight, residual, bias, stride)
    return torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _dual_conv1x1_add_relu(x: torch.Tensor, weight: torch.Tensor, shortcut: torch.Tensor,
                          shortcut_weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          shortcut_stride: int = 1) -> torch.Tensor:
    out_shape = _check_dual_conv("dual_conv1x1_add_relu", x, weight, shortcut, shortcut_weight, bias,
                                 shortcut_stride)
    return _run(_conv_out(x, out_shape), [Operand(x, weight), Operand(shortcut, shortcut_weight, shortcut_stride)],
                bias, None,
                lambda: reference.dual_conv1x1_add_relu(x, weight, shortcut, shortcut_weight, bias,
                                                        shortcut_stride))


def _dual_conv1x1_add_relu_fake(x, weight, shortcut, shortcut_weight, bias=None, shortcut_stride=1):
    out_shape = _check_dual_conv("dual_conv1x1_add_relu", x, weight, shortcut, shortcut_weight, bias,
                                 shortcut_stride)
    return torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


# ---- backward --------------------------------------------------------------------------------------------


def _grad_layout(out: torch.Tensor) -> dict:
    return {} if out.dim() == 2 else {"memory_format": torch.channels_last}


def _eager_relu_grad_colsum(grad, out, gm, colsum) -> None:
    gm.copy_(reference.relu_backward(grad, out))
    if colsum is not None:
        colsum.copy_(as_rows(gm).sum(dim=0, dtype=torch.float32))


def _triton_relu_grad_colsum(grad, out, gm, colsum) -> None:
    M, N, _, _ = output_dims(out)
    if M > TRITON_MAX_ROWS or N > 65535 * 64:
        # past the kernel's int32 row indices (the forward took the library path too), or more column
        # tiles (of 64) than a CUDA grid's second dimension holds
        return _eager_relu_grad_colsum(grad, out, gm, colsum)
    block_m = _triton.kernels("gemm_add_relu").GRAD_BLOCK_M
    partial = torch.empty((_triton.cdiv(M, block_m), N), dtype=torch.float32, device=out.device) \
        if colsum is not None else None
    triton_relu_grad_colsum(grad, out, gm, partial)
    if colsum is not None:  # stage two: a fixed-order sum over the per-tile partials (no atomics)
        torch.sum(partial, dim=0, out=colsum)


def _cpp_relu_grad_colsum(grad, out, gm, colsum) -> None:
    _cpp.module().relu_grad_colsum(as_rows(grad).contiguous(), as_rows(out).contiguous(), as_rows(gm), colsum)


# (grad, out, gm, colsum or None): gm = grad where not (out <= 0); colsum = gm's float32 column sums
RELU_GRAD_COLSUM_IMPLS = {"triton": _triton_relu_grad_colsum, "cpp": _cpp_relu_grad_colsum,
                          "eager": _eager_relu_grad_colsum}


def _relu_grad_colsum(grad: torch.Tensor, out: torch.Tensor, with_colsum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad where not (out <= 0) else 0, its fp32 sums over all dims but the channel dim, or an empty
    tensor). ``grad``/``out`` are [M, N] or NCHW-shaped; the masked gradient comes back row-major [M, N]
    (channels_last for NCHW shapes), the layout the dgrad/wgrad GEMMs read fastest."""
    _checks.floating("relu_grad_colsum", grad=grad, out=out)
    _checks.same_shape("relu_grad_colsum", "grad", grad, "out", out)
    if out.dim() not in (2, 4):
        raise ValueError(f"relu_grad_colsum: expected a 2-D or 4-D out, got shape {tuple(out.shape)}")
    M, N, _, _ = output_dims(out)
    gm = _alloc.empty(out.shape, out, **_grad_layout(out))
    colsum = _alloc.empty((N,) if with_colsum else (0,), out, dtype=torch.float32)
    dispatch(RELU_GRAD_COLSUM_IMPLS, out.device)(grad, out, gm, colsum if with_colsum else None)
    return gm, colsum


def _relu_grad_colsum_fake(grad, out, with_colsum):
    _checks.same_shape("relu_grad_colsum", "grad", grad, "out", out)
    n = out.shape[1]
    return (torch.empty(out.shape, dtype=out.dtype, device=out.device, **_grad_layout(out)),
            out.new_empty((n,) if with_colsum else (0,), dtype=torch.float32))


def _setup_relu_grad_colsum(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_relu_grad_colsum(ctx, grad_gm, grad_colsum):
    """Double backward: both outputs are linear in ``grad`` (the column sum adds each channel's masked
    values), so ``grad`` receives the ReLU gate applied to grad_gm + grad_colsum broadcast over channels."""
    (out,) = ctx.saved_tensors
    g = grad_gm
    if grad_colsum is not None and grad_colsum.numel():
        g = g + grad_colsum.to(out.dtype).view([1, -1] + [1] * (out.dim() - 2))
    return reference.relu_backward(g, out), None, None




def _masked_grad(grad, out, bias_needed):
    gm, colsum = RELU_GRAD_COLSUM.inside_autograd(grad, out, bias_needed)
    return gm, (colsum.to(out.dtype) if bias_needed else None)


def _linear_grads(gm2d, x, weight, x_shape, need_x, need_w):
    gx = (gm2d @ weight).view(x_shape) if need_x else None
    gw = gm2d.t() @ rows_of(x) if need_w else None
    return gx, gw


def _conv_grads(gm, x, weight, stride, need_x, need_w):
    if not (need_x or need_w):
        return None, None
    gx, gw, _ = torch.ops.aten.convolution_backward(gm, x, weight, None, [stride, stride], [0, 0], [1, 1],
                                                    False, [0, 0], 1, [need_x, need_w, False])
    return gx, gw


# The setups save an operand only where a gradient needs it, as eager's autograd does (x for the weight
# gradient, the weight for x's; a convolution node keeps both): a frozen weight or an input changed in
# place after the forward is then no error, and nothing is held longer than needed.


def _setup_linear(ctx, inputs, output):
    x, weight, residual, bias = inputs
    need = ctx.needs_input_grad
    ctx.save_for_backward(x if need[1] else None, weight if need[0] else None, output)
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None


def _backward_linear(ctx, grad):
    x, weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    gm, gb = _masked_grad(rows_of(grad), rows_of(out, view=True), ctx.has_bias and need[3])
    gx, gw = _linear_grads(gm, x, weight, ctx.x_shape, need[0], need[1])
    return gx, gw, gm.view(out.shape) if need[2] else None, gb


def _setup_dual_linear(ctx, inputs, output):
    x, weight, shortcut, shortcut_weight, bias = inputs
    need = ctx.needs_input_grad
    ctx.save_for_backward(x if need[1] else None, weight if need[0] else None,
                          shortcut if need[3] else None, shortcut_weight if need[2] else None, output)
    ctx.x_shape, ctx.shortcut_shape = x.shape, shortcut.shape
    ctx.has_bias = bias is not None


def _backward_dual_linear(ctx, grad):
    x, weight, shortcut, shortcut_weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    gm, gb = _masked_grad(rows_of(grad), rows_of(out, view=True), ctx.has_bias and need[4])
    gx, gw = _linear_grads(gm, x, weight, ctx.x_shape, need[0], need[1])
    gs, gsw = _linear_grads(gm, shortcut, shortcut_weight, ctx.shortcut_shape, need[2], need[3])
    return gx, gw, gs, gsw, gb


def _setup_conv(ctx, inputs, output):
    x, weight, residual, bias, stride = inputs
    conv = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    ctx.save_for_backward(x if conv else None, weight if conv else None, output)
    ctx.has_bias = bias is not None
    ctx.stride = stride


def _backward_conv(ctx, grad):
    x, weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    gm, gb = _masked_grad(grad, out, ctx.has_bias and need[3])
    gx, gw = _conv_grads(gm, x, weight, ctx.stride, need[0], need[1])
    return gx, gw, gm if need[2] else None, gb, None


def _setup_dual_conv(ctx, inputs, output):
    x, weight, shortcut, shortcut_weight, bias, shortcut_stride = inputs
    need = ctx.needs_input_grad
    main, side = need[0] or need[1], need[2] or need[3]
    ctx.save_for_backward(x if main else None, weight if main else None, shortcut if side else None,
                          shortcut_weight if side else None, output)
    ctx.has_bias = bias is not None
    ctx.shortcut_stride = shortcut_stride


def _backward_dual_conv(ctx, grad):
    x, weight, shortcut, shortcut_weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    gm, gb = _masked_grad(grad, out, ctx.has_bias and need[4])
    gx, gw = _conv_grads(gm, x, weight, 1, need[0], need[1])
    gs, gsw = _conv_grads(gm, shortcut, shortcut_weight, ctx.shortcut_stride, need[2], need[3])
    return gx, gw, gs, gsw, gb, None




# ---------------------------------------------------------------------------------------------------------
# Autocast


def autocast_inputs(device_type: str, *args):
    """Under ``torch.autocast`` the GEMM ops run in the autocast dtype, as ``F.linear``/``F.conv2d`` do:
    every floating tensor but float64 is cast to it (float64 stays, as with F.linear, and is then refused
    by name); other arguments pass."""
    # meta tensors have no autocast (torch.amp.is_autocast_available would say so, but torch.compile of
    # torch 2.11 cannot trace it)
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return args
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                 else a for a in args)


def _autocast_kernel(name: str):
    """Op ``name``'s autocast kernel: the public functions cast before calling, but a direct
    ``torch.ops.fused_residual`` call (an exported program or a compiled graph run under autocast) comes
    here with the inputs as they are; without it the implementation would see mixed dtypes."""
    def kernel(keyset, *args):
        args = autocast_inputs(args[0].device.type, *args)  # before the guard, which turns autocast off
        with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_KEYS):
            return getattr(torch.ops.fused_residual, name).default(*args)

    return kernel


# ---------------------------------------------------------------------------------------------------------
# Specs: the aten expressions (fused_residual.reference) are what compiled code sees by default

def _gemm_spec(name: str, impl, fake, setup_context, backward) -> OpSpec:
    """A forward GEMM op: its eager formula ``fused_residual.reference.<name>`` is also its lowering, and it
    casts its inputs under autocast."""
    formula = getattr(reference, name)
    return OpSpec(name, impl, fake, setup_context, backward, reference=formula, lowering=formula,
                  autocast=_autocast_kernel(name))


LINEAR_ADD_RELU = register(_gemm_spec(
    "linear_add_relu", _linear_add_relu, _linear_add_relu_fake, _setup_linear, _backward_linear))
DUAL_LINEAR_ADD_RELU = register(_gemm_spec(
    "dual_linear_add_relu", _dual_linear_add_relu, _dual_linear_add_relu_fake, _setup_dual_linear,
    _backward_dual_linear))
CONV1X1_ADD_RELU = register(_gemm_spec(
    "conv1x1_add_relu", _conv1x1_add_relu, _conv1x1_add_relu_fake, _setup_conv, _backward_conv))
DUAL_CONV1X1_ADD_RELU = register(_gemm_spec(
    "dual_conv1x1_add_relu", _dual_conv1x1_add_relu, _dual_conv1x1_add_relu_fake, _setup_dual_conv,
    _backward_dual_conv))
RELU_GRAD_COLSUM = register(OpSpec(
    "relu_grad_colsum", _relu_grad_colsum, _relu_grad_colsum_fake, _setup_relu_grad_colsum,
    _backward_relu_grad_colsum))
