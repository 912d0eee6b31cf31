"""BatchNorm + ReLU and BatchNorm + add + ReLU: torch.library ops, fake impls, autograd, backend dispatch.

Ops (namespace ``fused_residual``):

* ``batch_norm_relu(x, weight, bias, running_mean, running_var, training, eps, save_mask)``
  ``-> (out, mask, mean, invstd, var)``                 out = relu(batch_norm(x))
* ``batch_norm_add_relu(x, skip, weight, bias, running_mean, running_var, training, eps, save_mask)``
  ``-> (out, mask, mean, invstd, var)``                 out = relu(batch_norm(x) + skip)
* ``batch_norm_relu_backward(grad, x, out, mask, mean, invstd, weight, training, skip_grad, param_grads)``
  ``-> (grad_x, grad_skip, grad_weight, grad_bias)``

The ops are functional: they return the statistics they normalised with (float32: ``mean``, ``invstd``
and the biased batch variance ``var``), and the public functions (``fused_residual.batch_norm_relu`` /
``batch_norm_add_relu``) update the running buffers in place from them, as ``F.batch_norm`` does. ``mask``
is the ReLU gate packed 1 bit per element in the storage order of ``out`` (empty unless ``save_mask``):
with it, autograd keeps x, the per-channel statistics and ceil(numel / 8) bytes, nothing the size of the
output.

Every backend implements four primitives over a dense activation whose storage is viewed as
``[outer, C, inner]`` (NCHW: inner = H*W; channels_last and 2-D: inner = 1), all math in float32:

* ``stats(x, C, inner, mean, var)``                      per-channel mean, biased variance (stable merge)
* ``apply(x, skip, mean, scale, shift, out, mask, C, inner)``
                                                         out = relu((x - mean) * scale + shift [+ skip])
* ``bwd_reduce(dy, x, out, mask, mean, C, inner, sum_g, sum_gx)``
                                                         g = dy where the gate is on; sums of g, g*(x-mean)
* ``bwd_apply(dy, x, out, mask, mean, a, b, d, dx, dskip, C, inner)``
                                                         dskip = g; dx = (g - b - (x - mean) * d) * a

Triton: ``fused_residual.ops._bn_triton``; C++: ``fused_residual._C`` (``bn_*``); eager: below. The
reductions are deterministic on every backend (fixed partitions, no atomics), so the same inputs give
bit-identical statistics and gradients run to run.

The public functions hand each call to :func:`fast_call` first, which in plain eager mode on the cpp backend
does the whole call in C++ (``kernels/csrc/bn_call.h``); the calls it leaves go through :func:`call` and the
registered ops.
"""

from __future__ import annotations

import math
import types
from typing import Optional  # custom-op signatures: Optional, which every torch's infer_schema knows

import torch

from .. import _alloc, _backend, _checks, _cpp, reference
from . import _direct
from ._registry import OpSpec, dispatch, register


def mask_numel(numel: int) -> int:
    return (numel + 7) // 8


# ---------------------------------------------------------------------------------------------------------
# Layout: every activation of one call shares the canonical layout of x


def canonical_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the op computes in: x's own where it is dense row-major or channels_last, else
    row-major (a copy)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def inner_size(x: torch.Tensor, fmt: torch.memory_format) -> int:
    """Elements of one channel that are adjacent in storage, in format ``fmt``."""
    if fmt == torch.contiguous_format:
        return math.prod(x.shape[2:])
    return 1


def in_format(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` itself when it is laid out in ``fmt``, else a copy that is."""
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------------------------------------
# The eager backend's primitives (also the oracle the kernels are tested against)


def _channels(t: torch.Tensor, C: int, inner: int) -> torch.Tensor:
    return reference.storage_order(t).view(-1, C, inner)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1)


def _gate(dy, out, mask, C, inner):
    dy3 = _channels(dy, C, inner).float()
    if mask is not None:
        keep = reference.unpack_mask(mask, dy.numel()).view_as(dy3)
    else:
        keep = ~(_channels(out, C, inner) <= 0)
    return torch.where(keep, dy3, 0.0)


def _eager_stats(x, C, inner, mean, var):
    v, m = torch.var_mean(_channels(x, C, inner).float(), dim=(0, 2), correction=0)
    mean.copy_(m)
    var.copy_(v)


def _eager_apply(x, skip, mean, scale, shift, out, mask, C, inner):
    y = (_channels(x, C, inner).float() - _per_channel(mean)) * _per_channel(scale) + _per_channel(shift)
    if skip is not None:
        y = y + _channels(skip, C, inner).float()
    _channels(out, C, inner).copy_(torch.relu(y))
    if mask is not None:
        mask.copy_(reference.pack_mask(out))


def _eager_bwd_reduce(dy, x, out, mask, mean, C, inner, sum_g, sum_gx):
    g = _gate(dy, out, mask, C, inner)
    sum_g.copy_(g.sum(dim=(0, 2)))
    sum_gx.copy_((g * (_channels(x, C, inner).float() - _per_channel(mean))).sum(dim=(0, 2)))


def _eager_bwd_apply(dy, x, out, mask, mean, a, b, d, dx, dskip, C, inner):
    g = _gate(dy, out, mask, C, inner)
    if dskip is not None:
        _channels(dskip, C, inner).copy_(g)
    xmu = _channels(x, C, inner).float() - _per_channel(mean)
    _channels(dx, C, inner).copy_((g - _per_channel(b) - xmu * _per_channel(d)) * _per_channel(a))


EAGER = types.SimpleNamespace(stats=_eager_stats, apply=_eager_apply, bwd_reduce=_eager_bwd_reduce,
                              bwd_apply=_eager_bwd_apply)


def _triton_primitives():
    from . import _bn_triton

    return _bn_triton


def _cpp_kernels():
    """The C++ extension, which must have the BatchNorm kernels (primitives, whole ops and the one-call path)."""
    m = _cpp.module()
    if not hasattr(m, "bn_fast_call"):
        raise _backend.BackendUnavailable("the 'cpp' backend was built without the BatchNorm kernels: "
                                          "rebuild it (pip install --no-build-isolation -e .)")
    return m


def _cpp_primitives():
    m = _cpp_kernels()
    return types.SimpleNamespace(stats=m.bn_stats, apply=m.bn_apply, bwd_reduce=m.bn_bwd_reduce,
                                 bwd_apply=m.bn_bwd_apply)


PRIMITIVES = {"triton": _triton_primitives, "cpp": _cpp_primitives, "eager": lambda: EAGER}


def primitives(device: torch.device):
    """The four primitives of the backend in effect for ``device``."""
    return dispatch(PRIMITIVES, device)()


# ---------------------------------------------------------------------------------------------------------
# Checks (the public functions, the real and the fake implementations share them)


def check(op: str, x, skip, running_mean, running_var, weight, bias, training: bool) -> None:
    """Everything is refused before anything is computed or written, with the argument named."""
    _checks.tensors(op, x=x)
    _checks.optional_tensors(op, skip=skip, running_mean=running_mean, running_var=running_var, weight=weight,
                             bias=bias)
    _checks.floating(op, x=x, skip=skip)  # the activations share a dtype and a device
    _checks.floating_mixed(op, x=x, running_mean=running_mean, running_var=running_var, weight=weight,
                           bias=bias)  # parameters and statistics: the activation dtype or float32 (AMP)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have a batch and a channel dimension, got shape {tuple(x.shape)}")
    if skip is not None:
        _checks.same_shape(op, "x", x, "skip", skip)
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None:
            _checks.shape(op, name, t, (C,), f"one value per channel of x, which has {C}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var must be given when training=False")
    if training and x.numel() // max(C, 1) <= 1 and x.numel() > 0:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got x of shape "
                         f"{tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Forward


def _forward_by_primitives(x, skip, weight, bias, running_mean, running_var, training: bool, eps: float, out,
                           mask, C: int, inner: int):
    """The forward from the four primitives, with the per-channel arithmetic as tensor operations."""
    f32 = dict(dtype=torch.float32, device=x.device)
    if training:
        mean, var = torch.empty(C, **f32), torch.empty(C, **f32)
        if x.numel():
            primitives(x.device).stats(x, C, inner, mean, var)
        else:  # as eager: statistics of nothing are NaN
            mean.fill_(math.nan), var.fill_(math.nan)
    else:  # copies: op outputs never alias inputs
        mean = running_mean.to(torch.float32, copy=True).contiguous()
        var = running_var.to(torch.float32, copy=True).contiguous()
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight.float() if weight is not None else invstd
    shift = bias.to(torch.float32, copy=True).contiguous() if bias is not None else torch.zeros(C, **f32)
    if x.numel():
        primitives(x.device).apply(x, skip, mean, scale.contiguous(), shift, out, mask, C, inner)
    return mean, invstd, var


def _cpp_forward(x, skip, weight, bias, running_mean, running_var, training: bool, eps: float, out, mask, C: int,
                 inner: int):
    """The forward as one C++ call: statistics, per-channel scale and shift, normalise (+ add) + ReLU. On
    small tensors the tensor operations between the primitives would cost as much as the passes."""
    mean, invstd, var = (torch.empty(C, dtype=torch.float32) for _ in range(3))
    _cpp_kernels().bn_forward(x, skip, weight, bias, running_mean, running_var, training, eps, out, mask, mean,
                              invstd, var, C, inner)
    return mean, invstd, var


# Each backend's forward: (x, skip, weight, bias, running_mean, running_var, training, eps, out, mask or None,
# C, inner) -> (mean, invstd, var), the activations already in one layout and out / mask allocated.
FORWARD = {"triton": _forward_by_primitives, "cpp": _cpp_forward, "eager": _forward_by_primitives}


def _forward(x, skip, weight, bias, running_mean, running_var, training: bool, eps: float, save_mask: bool):
    fmt = canonical_format(x)
    x = in_format(x, fmt)
    out = _alloc.empty_like(x)
    mask = _alloc.empty(mask_numel(x.numel()) if save_mask else 0, x, dtype=torch.uint8)
    mean, invstd, var = dispatch(FORWARD, x.device)(
        x, None if skip is None else in_format(skip, fmt), weight, bias, running_mean, running_var, training, eps,
        out, mask if save_mask else None, x.shape[1], inner_size(x, fmt))
    return out, mask, mean, invstd, var


def _fake_outputs(x, save_mask: bool):
    C = x.shape[1]
    out = torch.empty_like(x, memory_format=canonical_format(x))
    f32 = dict(dtype=torch.float32, device=x.device)
    mask = x.new_empty(mask_numel(x.numel()) if save_mask else 0, dtype=torch.uint8)
    return out, mask, x.new_empty(C, **f32), x.new_empty(C, **f32), x.new_empty(C, **f32)


def _batch_norm_relu(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                     eps: float, save_mask: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check("batch_norm_relu", x, None, running_mean, running_var, weight, bias, training)
    return _forward(x, None, weight, bias, running_mean, running_var, training, eps, save_mask)


def _batch_norm_add_relu(x: torch.Tensor, skip: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                         running_var: Optional[torch.Tensor], training: bool, eps: float, save_mask: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check("batch_norm_add_relu", x, skip, running_mean, running_var, weight, bias, training)
    return _forward(x, skip, weight, bias, running_mean, running_var, training, eps, save_mask)


def _batch_norm_relu_fake(x, weight, bias, running_mean, running_var, training, eps, save_mask):
    check("batch_norm_relu", x, None, running_mean, running_var, weight, bias, training)
    return _fake_outputs(x, save_mask)


def _batch_norm_add_relu_fake(x, skip, weight, bias, running_mean, running_var, training, eps, save_mask):
    check("batch_norm_add_relu", x, skip, running_mean, running_var, weight, bias, training)
    return _fake_outputs(x, save_mask)


# ---------------------------------------------------------------------------------------------------------
# Backward


def _check_backward(grad, x, out, mask, mean, invstd):
    op = "batch_norm_relu_backward"
    _checks.floating(op, grad=grad, x=x, out=out)
    _checks.same_shape(op, "grad", grad, "x", x)
    if out is not None:
        _checks.same_shape(op, "out", out, "x", x)
    if (out is None) == (mask is None):
        raise ValueError(f"{op}: give exactly one of out and mask (the ReLU gate)")
    if mask is not None and (mask.dtype != torch.uint8 or mask.numel() != mask_numel(x.numel())):
        raise ValueError(f"{op}: mask must be {mask_numel(x.numel())} uint8 bytes, got {mask.numel()} {mask.dtype}")
    for name, t in (("mean", mean), ("invstd", invstd)):
        if t.dtype != torch.float32 or tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"{op}: {name} must be float32 of shape ({x.shape[1]},), got {t.dtype} "
                             f"{tuple(t.shape)}")


def _batch_norm_relu_backward(grad: torch.Tensor, x: torch.Tensor, out: Optional[torch.Tensor],
                              mask: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                              weight: Optional[torch.Tensor], training: bool, skip_grad: bool, param_grads: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_backward(grad, x, out, mask, mean, invstd)
    fmt = canonical_format(x)
    x, grad = in_format(x, fmt), in_format(grad, fmt)
    dx = _alloc.empty_like(x)
    dskip = _alloc.empty_like(x) if skip_grad else x.new_empty(0)
    dw, db = dispatch(BACKWARD, x.device)(
        grad, x, None if out is None else in_format(out, fmt), None if mask is None else mask.contiguous(), mean,
        invstd, weight, training, param_grads, dx, dskip if skip_grad else None, x.shape[1], inner_size(x, fmt))
    return dx, dskip, dw, db


def _cpp_backward(grad, x, out, mask, mean, invstd, weight, training: bool, param_grads: bool, dx, dskip, C: int,
                  inner: int):
    """The backward as one C++ call: sums, per-channel coefficients, dx (and dskip); dw and db come back."""
    dw, db = torch.empty(C, dtype=torch.float32), torch.empty(C, dtype=torch.float32)
    _cpp_kernels().bn_backward(grad, x, out, mask, mean.contiguous(), invstd.contiguous(), weight, training,
                               param_grads, dx, dskip, dw, db, C, inner)
    return dw, db


def _backward_by_primitives(grad, x, out, mask, mean, invstd, weight, training: bool, param_grads: bool, dx, dskip,
                            C: int, inner: int):
    """The backward from the primitives, with the per-channel arithmetic as tensor operations."""
    f32 = dict(dtype=torch.float32, device=x.device)
    sum_g, sum_gx = torch.zeros(C, **f32), torch.zeros(C, **f32)
    kernels = primitives(x.device) if x.numel() else None
    if x.numel() and (training or param_grads):
        kernels.bwd_reduce(grad, x, out, mask, mean, C, inner, sum_g, sum_gx)
    a = invstd * weight.float() if weight is not None else invstd.clone()
    if training:
        count = x.numel() // C
        b, d = sum_g / count, invstd * invstd * sum_gx / count
    else:
        b, d = torch.zeros(C, **f32), torch.zeros(C, **f32)
    if x.numel():
        kernels.bwd_apply(grad, x, out, mask, mean, a.contiguous(), b.contiguous(), d.contiguous(), dx, dskip, C,
                          inner)
    return sum_gx * invstd, sum_g


# Each backend's backward: (grad, x, out or None, mask or None, mean, invstd, weight, training, param_grads, dx,
# dskip or None, C, inner) -> (dw, db), the activations already in x's layout and dx / dskip allocated.
BACKWARD = {"triton": _backward_by_primitives, "cpp": _cpp_backward, "eager": _backward_by_primitives}


def _batch_norm_relu_backward_fake(grad, x, out, mask, mean, invstd, weight, training, skip_grad, param_grads):
    _check_backward(grad, x, out, mask, mean, invstd)
    fmt = canonical_format(x)
    C = x.shape[1]
    dx = torch.empty_like(x, memory_format=fmt)
    dskip = torch.empty_like(x, memory_format=fmt) if skip_grad else x.new_empty(0)
    return dx, dskip, x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Autograd: x (as given), the gate (out or the packed mask), mean, invstd and weight are kept


def _setup(ctx, x, skip, weight, bias, training, save_mask, output):
    out, mask, mean, invstd, var = output
    ctx.mark_non_differentiable(mask, mean, invstd, var)
    ctx.save_for_backward(x, mask if save_mask else out, mean, invstd, weight)
    ctx.training, ctx.save_mask, ctx.has_skip = training, save_mask, skip is not None
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grads(ctx, grad):
    x, gate, mean, invstd, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    # input order: x, [skip,] weight, bias, ...
    i_w = 2 if ctx.has_skip else 1
    need_params = need[i_w] or need[i_w + 1]
    dx, dskip, dw, db = BATCH_NORM_RELU_BACKWARD.inside_autograd(
        grad, x, None if ctx.save_mask else gate, gate if ctx.save_mask else None, mean, invstd, weight,
        ctx.training, ctx.has_skip and need[1], need_params)
    dw = dw.to(ctx.weight_dtype) if need[i_w] else None
    db = db.to(ctx.bias_dtype) if need[i_w + 1] else None
    return (dx if need[0] else None), (dskip if ctx.has_skip and need[1] else None), dw, db


def _setup_relu(ctx, inputs, output):
    x, weight, bias, _rm, _rv, training, _eps, save_mask = inputs
    _setup(ctx, x, None, weight, bias, training, save_mask, output)


def _backward_relu(ctx, grad, *_):
    dx, _, dw, db = _grads(ctx, grad)
    return dx, dw, db, None, None, None, None, None


def _setup_add_relu(ctx, inputs, output):
    x, skip, weight, bias, _rm, _rv, training, _eps, save_mask = inputs
    _setup(ctx, x, skip, weight, bias, training, save_mask, output)


def _backward_add_relu(ctx, grad, *_):
    dx, dskip, dw, db = _grads(ctx, grad)
    return dx, dskip, dw, db, None, None, None, None, None




# ---------------------------------------------------------------------------------------------------------
# The running statistics, as F.batch_norm updates them


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, the variance unbiased (``count / (count -
    1)``), in place (no autograd). Plain float32 CPU buffers in eager mode on the cpp backend: one C++ call
    (``bn_update_running``, as :func:`fast_call` updates them); else (traced, compiled, other dtypes and
    devices) the tensor operations."""
    if (running_mean.dtype == running_var.dtype == torch.float32 and running_mean.device.type == "cpu"
            and running_mean.is_contiguous() and running_var.is_contiguous()
            and _direct.plain_eager(running_mean, running_var, mean, var)
            and _backend.resolve(running_mean.device) == "cpp"):
        _cpp_kernels().bn_update_running(running_mean, running_var, mean, var, count, momentum)  # bumps versions
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1)) if count > 1 else var
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


# ---------------------------------------------------------------------------------------------------------
# The public functions' call (fused_residual.batch_norm_relu / batch_norm_add_relu, after their own checks)


def call(op: str, x, skip, running_mean, running_var, weight, bias, training: bool, momentum: float, eps: float,
         save: str) -> torch.Tensor:
    """``relu(F.batch_norm(x, ...) [+ skip])`` with the running statistics updated, through the registered op
    (:data:`BATCH_NORM_RELU` / :data:`BATCH_NORM_ADD_RELU`, whose call path is the registry's): the public
    functions' path for every call that :func:`fast_call` leaves."""
    save_mask = save == "mask" and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, skip, weight, bias))
    if skip is None:
        out, _, mean, _, var = BATCH_NORM_RELU(x, weight, bias, running_mean, running_var, training, eps, save_mask)
    else:
        out, _, mean, _, var = BATCH_NORM_ADD_RELU(x, skip, weight, bias, running_mean, running_var, training, eps,
                                                   save_mask)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return out


def _no_fast_call(*args) -> None:
    return None


def fast_call(x, skip, running_mean, running_var, weight, bias, training, momentum, eps, save):
    """The public functions' eager call in one C++ call (``bn_fast_call``, ``kernels/csrc/bn_call.h``): the
    output, its autograd node (the C++ ``BatchNormReLUCall``) and the running-statistics update, with the
    kernels and formulas of the registered ops (bit-identical results). It takes the call only in plain eager
    mode on the cpp backend with every argument plainly valid (CPU tensors of supported dtypes, matching shapes,
    ...), and returns None otherwise, having done nothing: :func:`call` then checks and computes.
    The caller rules out torch.compile and forward-mode AD first (Python state, and dynamo must not trace into
    the C++ call).

    Bound on first use: from then on this name is the C++ function itself (or a function returning None where
    the extension is absent), so a call costs one Python call into C++."""
    global fast_call
    ok, _ = _cpp.status()
    m = _cpp.module() if ok else None
    if m is not None and hasattr(m, "bn_fast_call"):
        m.bn_fast_init(_backend._override, _alloc._poison)
        fast_call = m.bn_fast_call
    else:  # an older build: the Python path for every call (_cpp_kernels says to rebuild where it matters)
        fast_call = _no_fast_call
    return fast_call(x, skip, running_mean, running_var, weight, bias, training, momentum, eps, save)


# ---------------------------------------------------------------------------------------------------------
# Specs. No lowering: under torch.compile the public functions emit F.batch_norm + add + relu themselves,
# as F.batch_norm also updates the running statistics (which these functional ops return instead).

BATCH_NORM_RELU = register(OpSpec(
    "batch_norm_relu", _batch_norm_relu, _batch_norm_relu_fake, _setup_relu, _backward_relu))
BATCH_NORM_ADD_RELU = register(OpSpec(
    "batch_norm_add_relu", _batch_norm_add_relu, _batch_norm_add_relu_fake, _setup_add_relu, _backward_add_relu))
BATCH_NORM_RELU_BACKWARD = register(OpSpec(
    "batch_norm_relu_backward", _batch_norm_relu_backward, _batch_norm_relu_backward_fake))
