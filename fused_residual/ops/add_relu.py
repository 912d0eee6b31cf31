"""``relu(z + skip)``: launchers, torch.library registration, fake impls and autograd.

Ops (namespace ``fused_residual``):

* ``add_relu(z, skip) -> out``                     out has z's shape, dtype and memory format
* ``add_relu_with_mask(z, skip) -> (out, mask)``   plus the packed gradient gate, ceil(numel/8) bytes
* ``add_relu_(z, skip) -> ()``                     z = relu(z + skip) in place
* ``add_relu_backward(grad, out) -> grad_in``      grad where not (out <= 0), in out's layout
* ``add_relu_mask_backward(grad, mask, out_stride) -> grad_in``  the same from the packed gate

Each op is declared once as an ``OpSpec`` (``fused_residual.ops._registry``) and called through its
``RegisteredOp``. The two backward ops have autograd of their own (they are linear in ``grad``), so double
backward works. The kernels: ``kernels/add_relu.py`` (Triton) and ``kernels/csrc/cpu_kernels.h`` (C++).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _alloc, _backend, _checks, _cpp, _triton, reference
from .._layout import is_dense, is_dense_layout, iteration_space, same_dense_layout
from ._registry import AUTOCAST_KEYS, OpSpec, device_guard, dispatch, impl_autograd, register

# ---------------------------------------------------------------------------------------------------------
# Eager's ReLU (clamp_min) is `x < 0 ? 0 : x` on CPU, which keeps -0.0, and `fmaxf(x, 0)` (after a NaN
# check) on CUDA. The kernels compute it the same way on the device they serve (kernels/common.py), so that
# the forward is bit-identical to eager there, signed zeros included; the Triton interpreter serves CPU
# tensors. tests/test_add_relu.py::test_signed_zero_convention_matches_eager checks the result against eager.
RELU_HW_MAX_DEVICES = {"cuda": True}


def relu_uses_hw_max(device: torch.device) -> bool:
    return RELU_HW_MAX_DEVICES.get(device.type, False)


def mask_numel(numel: int) -> int:
    return (numel + 7) // 8


def _check(op: str, z: torch.Tensor, skip: torch.Tensor) -> None:
    _checks.floating(op, z=z, skip=skip)
    _checks.same_shape(op, "z", z, "skip", skip)


# ---------------------------------------------------------------------------------------------------------
# Triton launchers


def _index64(numel: int, block: int) -> bool:
    """Whether the strided kernels need int64 element indices (int32 ones divide faster)."""
    return numel + block >= 2**31


def _triton_forward(z: torch.Tensor, skip: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None) -> None:
    """out = relu(z + skip) (out may be z itself); mask, if given, needs a dense out."""
    numel = out.numel()
    if numel == 0:
        return
    kernels = _triton.kernels("add_relu")
    flags = dict(SAVE_MASK=mask is not None, RELU_HW_MAX=relu_uses_hw_max(out.device),
                 INTERPRET=_triton.interpreting(), num_warps=kernels.NUM_WARPS)
    mask_arg = mask if mask is not None else out
    if same_dense_layout(out, z, skip):
        with device_guard(out):
            kernels.add_relu_fwd_kernel[(_triton.cdiv(numel, kernels.BLOCK),)](z, skip, out, mask_arg, numel, BLOCK=kernels.BLOCK,
                                                                  **flags)
        return
    space = iteration_space(out, z, skip, max_dims=kernels.MAX_DIMS)
    if space is None:  # more than 4 non-mergeable dims: run the flat kernel on dense copies
        dense = out if is_dense(out) else torch.empty_like(out)
        _triton_forward(torch.empty_like(dense).copy_(z), torch.empty_like(dense).copy_(skip), dense, mask)
        if dense is not out:
            out.copy_(dense)
        return
    sizes, (o_st, z_st, s_st) = space
    with device_guard(out):
        kernels.add_relu_fwd_strided_kernel[(_triton.cdiv(numel, kernels.STRIDED_BLOCK),)](
            z, skip, out, mask_arg, numel, sizes[1], sizes[2], sizes[3], *z_st, *s_st, *o_st,
            BLOCK=kernels.STRIDED_BLOCK, INDEX64=_index64(numel, kernels.STRIDED_BLOCK), **flags)


def _triton_backward(grad: torch.Tensor, out: torch.Tensor | None, mask: torch.Tensor | None,
                     gin: torch.Tensor) -> None:
    """gin (dense) = grad gated by ``out`` (gin's layout: one offset addresses both) or the packed ``mask``."""
    numel = gin.numel()
    if numel == 0:
        return
    kernels = _triton.kernels("add_relu")
    gate = out if out is not None else gin
    mask_arg = mask if mask is not None else gin
    if same_dense_layout(gin, grad):
        with device_guard(gin):
            kernels.add_relu_bwd_kernel[(_triton.cdiv(numel, kernels.BLOCK),)](
                grad, gate, mask_arg, gin, numel, FROM_MASK=mask is not None, BLOCK=kernels.BLOCK, num_warps=kernels.NUM_WARPS)
        return
    space = iteration_space(gin, grad, max_dims=kernels.MAX_DIMS)
    if space is None:  # more than 4 non-mergeable dims: bring grad into gin's layout first
        _triton_backward(torch.empty_like(gin).copy_(grad), out, mask, gin)
        return
    sizes, (gin_st, g_st) = space
    with device_guard(gin):
        kernels.add_relu_bwd_strided_kernel[(_triton.cdiv(numel, kernels.STRIDED_BLOCK),)](
            grad, gate, mask_arg, gin, numel, sizes[1], sizes[2], sizes[3], *g_st, *gin_st,
            FROM_MASK=mask is not None, BLOCK=kernels.STRIDED_BLOCK, INDEX64=_index64(numel, kernels.STRIDED_BLOCK),
            num_warps=kernels.NUM_WARPS)


# ---------------------------------------------------------------------------------------------------------
# Backend dispatch (real implementations)


def _eager_forward(z, skip, out, mask) -> None:
    out.copy_(reference.add_relu(z, skip))
    if mask is not None:
        mask.copy_(reference.pack_mask(out))


def _eager_backward(grad, out, mask, gin) -> None:
    if out is not None:
        gin.copy_(reference.relu_backward(grad, out))
        return
    keep = reference.unpack_mask(mask, gin.numel())
    grad_in_order = reference.storage_order(torch.empty_like(gin).copy_(grad))
    reference.storage_order(gin).copy_(torch.where(keep, grad_in_order, 0))


# forward(z, skip, out, mask): out = relu(z + skip) (out may be z); mask, if given, gets the packed gate.
# backward(grad, out, mask, gin): gin = grad gated by out (same layout as gin) or by the packed mask (gin's
# storage order).
FORWARD = {"triton": _triton_forward, "cpp": lambda *a: _cpp.module().add_relu_fwd(*a), "eager": _eager_forward}
BACKWARD = {"triton": _triton_backward, "cpp": lambda *a: _cpp.module().add_relu_bwd(*a), "eager": _eager_backward}


def _forward(z, skip, out, mask) -> None:
    dispatch(FORWARD, z.device)(z, skip, out, mask)


def _backward(grad, out, mask, gin) -> None:
    dispatch(BACKWARD, gin.device)(grad, out, mask, gin)


# ---------------------------------------------------------------------------------------------------------
# Ops: implementations and fake impls


def _add_relu(z: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    _check("add_relu", z, skip)
    out = _alloc.empty_like(z)
    _forward(z, skip, out, None)
    return out


def _add_relu_fake(z, skip):
    _check("add_relu", z, skip)
    return torch.empty_like(z)


def _add_relu_with_mask(z: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check("add_relu", z, skip)
    out = _alloc.empty_like(z)
    mask = _alloc.empty(mask_numel(z.numel()), z, dtype=torch.uint8)
    _forward(z, skip, out, mask)
    return out, mask


def _add_relu_with_mask_fake(z, skip):
    _check("add_relu", z, skip)
    return torch.empty_like(z), z.new_empty(mask_numel(z.numel()), dtype=torch.uint8)


def _add_relu_with_mask_reference(z, skip):
    out = reference.add_relu(z, skip)
    return out, reference.pack_mask(out)


def _add_relu_inplace(z: torch.Tensor, skip: torch.Tensor) -> None:
    _check("add_relu_", z, skip)
    _checks.writable_destination("add_relu_", z, skip)
    _forward(z, skip, z, None)


def _add_relu_inplace_fake(z, skip):
    _check("add_relu_", z, skip)


def _add_relu_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    _check("add_relu_backward", grad, out)
    gin = _alloc.empty_like(out)
    if not same_dense_layout(gin, out):  # out is not dense (a direct call): gate from a dense copy
        out = torch.empty_like(gin).copy_(out)
    _backward(grad, out, None, gin)
    return gin


def _add_relu_backward_fake(grad, out):
    _check("add_relu_backward", grad, out)
    return torch.empty_like(out)


def _check_mask(grad: torch.Tensor, mask: torch.Tensor, out_stride: Sequence[int], layout: bool = True) -> None:
    if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != mask_numel(grad.numel()):
        raise ValueError(f"add_relu_mask_backward: mask must be {mask_numel(grad.numel())} uint8 bytes for "
                         f"{grad.numel()} elements, got shape {tuple(mask.shape)} {mask.dtype}")
    if layout and not is_dense_layout(grad.shape, out_stride):
        raise ValueError(f"add_relu_mask_backward: out_stride {tuple(out_stride)} is not a dense layout of "
                         f"shape {tuple(grad.shape)}")


def _add_relu_mask_backward(grad: torch.Tensor, mask: torch.Tensor, out_stride: Sequence[int]) -> torch.Tensor:
    _checks.floating("add_relu_mask_backward", grad=grad)
    _check_mask(grad, mask, out_stride)
    gin = _alloc.empty_strided(grad.shape, out_stride, grad)
    _backward(grad, None, mask.contiguous(), gin)
    return gin


def _add_relu_mask_backward_fake(grad, mask, out_stride):
    _check_mask(grad, mask, out_stride, layout=False)  # no data-dependent sorting of symbolic strides
    return torch.empty_strided(grad.shape, out_stride, dtype=grad.dtype, device=grad.device)


def _mask_backward_reference(grad, mask, out_stride):
    gin = torch.empty_strided(grad.shape, out_stride, dtype=grad.dtype, device=grad.device)
    _eager_backward(grad, None, mask, gin)
    return gin


# ---------------------------------------------------------------------------------------------------------
# Autograd. The two backward ops are linear in ``grad``, so they have autograd of their own (double
# backward).


def _setup_output(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward_output(ctx, grad):
    (out,) = ctx.saved_tensors
    gin = ADD_RELU_BACKWARD.inside_autograd(grad, out)
    return gin, gin


def _setup_mask(ctx, inputs, output):
    out, mask = output
    ctx.mark_non_differentiable(mask)
    ctx.save_for_backward(mask)
    ctx.out_stride = out.stride()


def _backward_mask(ctx, grad, _grad_mask):
    (mask,) = ctx.saved_tensors
    gin = ADD_RELU_MASK_BACKWARD.inside_autograd(grad, mask, ctx.out_stride)
    return gin, gin


def _setup_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_of_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return ADD_RELU_BACKWARD.op(grad, out), None


def _setup_mask_backward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.out_stride = inputs[2]


def _backward_of_mask_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return ADD_RELU_MASK_BACKWARD.op(grad, mask, ctx.out_stride), None, None


# ---------------------------------------------------------------------------------------------------------
# The in-place op: a mutating custom op cannot carry ``register_autograd``; its autograd kernel records
# :class:`AddReLUInplaceFunction` instead, and its autocast kernel adds mixed dtypes as eager does.


class AddReLUInplaceFunction(torch.autograd.Function):
    """Autograd for ``add_relu_`` when z or skip needs a gradient: runs the in-place op, marks z dirty and
    keeps z (now the output) for backward."""

    @staticmethod
    def forward(ctx, z, skip):
        ADD_RELU_INPLACE.inside_autograd(z, skip)  # grad mode is off here: the implementation directly
        ctx.mark_dirty(z)
        ctx.save_for_backward(z)
        _backend.remember(ctx)
        return z

    @staticmethod
    @_backend.under_forward_backend
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        gin = ADD_RELU_BACKWARD.inside_autograd(grad, out)
        return gin, gin


def check_inplace_autograd(z: torch.Tensor) -> None:
    """Autograd's rule for in-place ops, as eager states it: not on a leaf that requires grad, nor a view
    of one."""
    if z.is_leaf and z.requires_grad:
        raise RuntimeError("add_relu_: a leaf Variable that requires grad is being used in an in-place operation")
    if z._base is not None and z._base.is_leaf and z._base.requires_grad:
        raise RuntimeError("add_relu_: a view of a leaf Variable that requires grad is being used in an "
                           "in-place operation")


def _add_relu_inplace_autograd(keyset, z, skip):
    """The op's autograd kernel. Without it a direct ``torch.ops.fused_residual.add_relu_`` call (or the bare
    op node that ``torch.export`` leaves of ``fused_residual.add_relu_``) would keep z's old grad_fn:
    gradients as if no ReLU had run. Where a gradient is needed it records :class:`AddReLUInplaceFunction`,
    whose forward runs the op with grad mode off."""
    if torch.is_grad_enabled() and (z.requires_grad or skip.requires_grad):
        check_inplace_autograd(z)
        AddReLUInplaceFunction.apply(z, skip)
        return None
    return ADD_RELU_INPLACE.overload.redispatch(keyset & torch._C._after_autograd_keyset, z, skip)


def mixed_dtypes(z: torch.Tensor, skip: torch.Tensor) -> bool:
    """z and skip are floating tensors of different dtypes: under autocast, a block's main path in the
    autocast dtype beside a float32 identity shortcut."""
    return z.dtype != skip.dtype and z.is_floating_point() and skip.is_floating_point()


def add_relu_mixed_(z: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``add_relu_`` of :func:`mixed_dtypes` tensors, as eager's ``z += skip; z.relu_()``: added in the
    wider type and rounded once into z (unfused). The checks are ``add_relu_``'s but for the dtype: no
    broadcasting, one device, supported floating dtypes."""
    _checks.floating_mixed("add_relu_", z=z, skip=skip)
    _checks.same_shape("add_relu_", "z", z, "skip", skip)
    _checks.writable_destination("add_relu_", z, skip)
    return z.add_(skip).relu_()


def _add_relu_inplace_autocast(keyset, z, skip):
    """The op's autocast kernel: :func:`add_relu_mixed_` where the dtypes differ (a graph exported without
    autocast and run under it calls the op so), the op as usual otherwise."""
    with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_KEYS):
        if mixed_dtypes(z, skip):
            add_relu_mixed_(z, skip)
        else:
            ADD_RELU_INPLACE.overload(z, skip)


# ---------------------------------------------------------------------------------------------------------
# Specs

ADD_RELU = register(OpSpec(
    "add_relu", _add_relu, _add_relu_fake, _setup_output, _backward_output,
    reference=reference.add_relu, lowering=reference.add_relu))
ADD_RELU_WITH_MASK = register(OpSpec(
    "add_relu_with_mask", _add_relu_with_mask, _add_relu_with_mask_fake, _setup_mask, _backward_mask,
    reference=_add_relu_with_mask_reference))  # under compile, add_relu lowers (the mask is autograd's)
ADD_RELU_INPLACE = register(OpSpec(
    "add_relu_", _add_relu_inplace, _add_relu_inplace_fake, autocast=_add_relu_inplace_autocast,
    mutates_args=("z",)))
impl_autograd("add_relu_", _add_relu_inplace_autograd)
ADD_RELU_BACKWARD = register(OpSpec(
    "add_relu_backward", _add_relu_backward, _add_relu_backward_fake, _setup_backward, _backward_of_backward,
    reference=reference.relu_backward))
ADD_RELU_MASK_BACKWARD = register(OpSpec(
    "add_relu_mask_backward", _add_relu_mask_backward, _add_relu_mask_backward_fake, _setup_mask_backward,
    _backward_of_mask_backward, reference=_mask_backward_reference))
