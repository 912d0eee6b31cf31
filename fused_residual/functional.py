"""The public fused functions. Each checks its arguments and calls its op through the op's one call path
(``fused_residual.ops._registry.RegisteredOp``): the ``torch.ops.fused_residual`` op, its aten expression
while torch.compile traces under the default policy, or in plain eager mode the op's implementation and
autograd formulas without the dispatcher round trips (same code, bit-identical results).

``__all__`` lists them; the package, ``fused_residual.nn`` and this module wrap exactly those names for
FX (see the end of this module)."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _checks
from .ops import _direct
from .ops import add_relu as _ar
from .ops import batch_norm as _bn
from .ops import gemm_add_relu as _gemm
from ._compile import plain_under_compile

SAVE_MODES = ("output", "mask")
__all__: list[str] = []


def public(fn):
    """Adds a function to ``__all__``: the package exports it and FX records it as one call node."""
    __all__.append(fn.__name__)
    return fn


@public
def add_relu(z: torch.Tensor, skip: torch.Tensor, *, save: str = "output") -> torch.Tensor:
    """``relu(z + skip)`` as a new tensor with z's shape, dtype and memory format, bit-identical to eager.

    ``save`` picks what autograd keeps for the backward: ``"output"`` (the result, as eager does) or
    ``"mask"`` (the ReLU gate packed 1 bit per element, ``ceil(numel / 8)`` bytes; identical gradients).
    z and skip must have the same shape (no broadcasting), dtype (float32, float16 or bfloat16) and device.
    """
    _checks.tensors("add_relu", z=z, skip=skip)
    if save not in SAVE_MODES:
        raise ValueError(f"add_relu: save must be one of {SAVE_MODES}, got {save!r}")
    if save == "mask" and torch.is_grad_enabled() and (z.requires_grad or skip.requires_grad) \
            and not plain_under_compile():
        return _ar.ADD_RELU_WITH_MASK(z, skip)[0]
    return _ar.ADD_RELU(z, skip)


@public
def add_relu_(z: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``z = relu(z + skip)`` in place; returns z.

    Autograd works when z is not a leaf (as for eager in-place ops, a leaf that requires grad is rejected).
    Nothing is written into z when an argument is rejected.
    """
    if (isinstance(z, torch.Tensor) and isinstance(skip, torch.Tensor) and _ar.mixed_dtypes(z, skip)
            and z.device.type != "meta" and torch.is_autocast_enabled(z.device.type)):
        return _ar.add_relu_mixed_(z, skip)  # as the op's autocast kernel does
    _checks.tensors("add_relu_", z=z, skip=skip)
    # the dispatcher's rule, on the fast path too (compiled code calls the op: the dispatcher checks there)
    if not torch.compiler.is_compiling() and z.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError("add_relu_: in-place update of an inference tensor outside InferenceMode is not "
                           "allowed (clone it first)")
    if plain_under_compile() or _direct.transformed():  # the aten ops: Inductor fuses them; functorch and
        return z.add_(skip).relu_()  # forward AD handle them
    if torch.is_grad_enabled() and (z.requires_grad or skip.requires_grad):
        if torch._C._get_tracing_state() is not None or torch.compiler.is_compiling():
            # torch.jit.trace refuses in-place autograd Functions, and dynamo of torch 2.11 traces this one
            # so that z keeps its old grad_fn (gradients as if no add or ReLU ran, where the caller uses z
            # rather than the return value): the op's autograd kernel records the backward below them
            _ar.ADD_RELU_INPLACE.overload(z, skip)
            return z
        _ar.check_inplace_autograd(z)
        return _ar.AddReLUInplaceFunction.apply(z, skip)
    _ar.ADD_RELU_INPLACE(z, skip)
    return z


_autocast = _gemm.autocast_inputs


@public
def linear_add_relu(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(x @ weight.T + bias + residual)`` with the add and ReLU fused into the GEMM's epilogue.

    x ``[..., K]``, weight ``[N, K]``, residual ``[..., N]`` (x's leading dims), bias ``[N]`` or None.
    """
    _checks.tensors("linear_add_relu", x=x, weight=weight, residual=residual)
    _checks.optional_tensors("linear_add_relu", bias=bias)
    x, weight, residual, bias = _autocast(x.device.type, x, weight, residual, bias)
    return _gemm.LINEAR_ADD_RELU(x, weight, residual, bias)


@public
def dual_linear_add_relu(x: torch.Tensor, weight: torch.Tensor, shortcut: torch.Tensor,
                         shortcut_weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(x @ weight.T + shortcut @ shortcut_weight.T + bias)``: a residual block's last layer and its
    projection shortcut accumulated by one kernel, then the epilogue.

    x ``[..., K1]``, weight ``[N, K1]``, shortcut ``[..., K2]`` (x's leading dims), shortcut_weight
    ``[N, K2]``, bias ``[N]`` or None.
    """
    _checks.tensors("dual_linear_add_relu", x=x, weight=weight, shortcut=shortcut, shortcut_weight=shortcut_weight)
    _checks.optional_tensors("dual_linear_add_relu", bias=bias)
    x, weight, shortcut, shortcut_weight, bias = _autocast(x.device.type, x, weight, shortcut, shortcut_weight,
                                                           bias)
    return _gemm.DUAL_LINEAR_ADD_RELU(x, weight, shortcut, shortcut_weight, bias)


@public
def conv1x1_add_relu(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                     bias: torch.Tensor | None = None, stride: int = 1) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, stride=stride) + residual)`` for a ``[Cout, Cin, 1, 1]`` weight: the
    ResNet projection shortcut as one GEMM over output pixels.

    NCHW or channels_last x (strided views too, read in place); the output takes x's memory format.
    residual has the output's shape ``[B, Cout, ceil(H / stride), ceil(W / stride)]``.
    """
    _checks.tensors("conv1x1_add_relu", x=x, weight=weight, residual=residual)
    _checks.optional_tensors("conv1x1_add_relu", bias=bias)
    _gemm.check_stride("conv1x1_add_relu", "stride", stride)  # here, so that every path raises alike
    x, weight, residual, bias = _autocast(x.device.type, x, weight, residual, bias)
    return _gemm.CONV1X1_ADD_RELU(x, weight, residual, bias, stride)


@public
def dual_conv1x1_add_relu(x: torch.Tensor, weight: torch.Tensor, shortcut: torch.Tensor,
                          shortcut_weight: torch.Tensor, bias: torch.Tensor | None = None,
                          shortcut_stride: int = 1) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias) + conv2d(shortcut, shortcut_weight, stride=shortcut_stride))`` for 1x1
    weights, in one kernel: a Bottleneck's conv3 and its downsample projection (BN folded) in inference."""
    _checks.tensors("dual_conv1x1_add_relu", x=x, weight=weight, shortcut=shortcut,
                    shortcut_weight=shortcut_weight)
    _checks.optional_tensors("dual_conv1x1_add_relu", bias=bias)
    _gemm.check_stride("dual_conv1x1_add_relu", "shortcut_stride", shortcut_stride)
    x, weight, shortcut, shortcut_weight, bias = _autocast(x.device.type, x, weight, shortcut, shortcut_weight,
                                                           bias)
    return _gemm.DUAL_CONV1X1_ADD_RELU(x, weight, shortcut, shortcut_weight, bias, shortcut_stride)


def _batch_norm_fused(op: str, x, skip, running_mean, running_var, weight, bias, training, momentum, eps, save):
    _checks.tensors(op, x=x)  # the full check runs in the op's implementation (or below), once
    _checks.optional_tensors(op, skip=skip, running_mean=running_mean, running_var=running_var, weight=weight,
                             bias=bias)
    if save not in SAVE_MODES:
        raise ValueError(f"{op}: save must be one of {SAVE_MODES}, got {save!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{op}: momentum must be a number, got {type(momentum).__name__} (nn.BatchNorm's "
                        "momentum=None, a cumulative average, is momentum=1/num_batches_tracked)")
    if plain_under_compile() or _direct.transformed():
        _bn.check(op, x, skip, running_mean, running_var, weight, bias, training)
        bn = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return torch.relu(bn if skip is None else bn + skip)
    return _bn.call(op, x, skip, running_mean, running_var, weight, bias, training, momentum, eps, save)


@public
def batch_norm_relu(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5, *, save: str = "mask") -> torch.Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))`` in two
    passes over x (statistics, then normalise + ReLU), with F.batch_norm's semantics: batch statistics in
    training (the biased variance normalises, the unbiased one updates ``running_var``), the running buffers
    updated in place with ``momentum``, the running statistics in eval mode.

    x is ``(N, C, ...)`` in float32, float16 or bfloat16 (NCHW or channels_last; the output takes x's
    layout); ``running_mean``, ``running_var``, ``weight`` and ``bias`` are ``(C,)`` in x's dtype or float32.
    ``save="mask"`` (default) keeps x, per-channel statistics and the ReLU gate packed 1 bit per element for
    the backward; ``"output"`` keeps the output instead, as eager does. Same gradients either way.
    """
    if not torch.compiler.is_compiling() and _forward_ad._current_level < 0:  # the whole call in C++ (or None)
        out = _bn.fast_call(x, None, running_mean, running_var, weight, bias, training, momentum, eps, save)
        if out is not None:
            return out
    return _batch_norm_fused("batch_norm_relu", x, None, running_mean, running_var, weight, bias, training,
                             momentum, eps, save)


@public
def batch_norm_add_relu(x: torch.Tensor, skip: torch.Tensor, running_mean: torch.Tensor | None,
                        running_var: torch.Tensor | None, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, training: bool = False, momentum: float = 0.1,
                        eps: float = 1e-5, *, save: str = "mask") -> torch.Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + skip)``:
    a residual block's last BatchNorm, the shortcut add and the ReLU in two passes over x (see
    :func:`batch_norm_relu`). skip has x's shape and dtype; its gradient is the gated output gradient."""
    if skip is not None and not torch.compiler.is_compiling() and _forward_ad._current_level < 0:  # as above
        out = _bn.fast_call(x, skip, running_mean, running_var, weight, bias, training, momentum, eps, save)
        if out is not None:
            return out
    _checks.tensors("batch_norm_add_relu", skip=skip)
    return _batch_norm_fused("batch_norm_add_relu", x, skip, running_mean, running_var, weight, bias, training,
                             momentum, eps, save)


# FX symbolic tracing (torch.fx.symbolic_trace, torchvision's create_feature_extractor) records each public
# function as one call node instead of tracing into its argument checks, which cannot run on proxies. A
# wrap applies to the namespace it is made in (and must be made at a module's top level): the package
# namespace and nn.py loop over this same ``__all__``.
for _name in __all__:
    torch.fx.wrap(_name)
del _name
