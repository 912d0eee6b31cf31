"""What the torchvision and timm integrations share: BN folding, shortcut parsing and the fused block tails.

Every helper decides per call whether a BatchNorm can be folded (``fold_bn``): it can when the BN module is
in eval mode with running statistics. Folded weights are computed from the current parameters and buffers
at each forward, so they are never stale and carry autograd; nothing is stored on the modules, so
``state_dict`` and ``load_state_dict`` behave exactly as before conversion.

A module the fused path would not call (a folded conv or BN, a parsed downsample or its Identity pool, an
eval-mode drop-path, the tail activation) is called after all when it carries forward or backward hooks or
an instance-level ``forward``: weight_norm, spectral_norm and pruning work through forward pre-hooks,
feature extraction through forward hooks, accelerate by replacing ``forward``. Under FX symbolic tracing
no BN is folded (the graph would keep eval mode for good).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as _module

from .. import functional as fr
from .._checks import SUPPORTED_DTYPES
from .._compile import plain_under_compile

# FX symbolic tracing (torchvision's create_feature_extractor) records these helpers as one call each: their
# dtype tests cannot run on proxies. The fused functions the tails call are recorded the same way.
torch.fx.wrap("add_relu_tail")
torch.fx.wrap("fold_bn_tensors")


def unhooked(m: nn.Module) -> bool:
    """``m`` has no forward or backward hooks of its own, nor a ``forward`` set on the instance (as
    accelerate's hooks do): the fused path may compute its output without calling it."""
    return not (m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def fx_tracing() -> bool:
    """Under FX symbolic tracing every decision taken from a module's state is frozen into the graph: the
    helpers then take the choices that are right in either mode (no BN folding, drop-path kept)."""
    tracing = torch.fx._symbolic_trace
    if hasattr(tracing, "is_fx_symbolic_tracing"):  # torch 2.11 and 2.14 have it; older ones keep a flag
        return tracing.is_fx_symbolic_tracing()
    return tracing._is_fx_tracing_flag and not torch.compiler.is_compiling()  # (torch.export traces fold)


def global_hooks() -> bool:
    """Module hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook``
    and the like): the converted blocks then run their original forward, so that each hook fires as often."""
    return bool(_module._global_forward_pre_hooks or _module._global_forward_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def norm_why_not(block: nn.Module) -> str | None:
    """Why the block's own BatchNorm layers keep it unconverted: a subclass of BatchNorm (SyncBatchNorm
    reduces its statistics across processes; others override what the fused ops compute)."""
    for name, child in block.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and type(child) is not nn.BatchNorm2d:
            return f"{name} is {type(child).__name__} (only nn.BatchNorm2d is fused or folded)"
    return None


def tail_why_not(act: nn.Module, name: str = "activation", now: bool = True,
                 block: nn.Module | None = None) -> str | None:
    """Why a block whose tail activation is ``act`` cannot be converted (``now`` false: what its structure
    says), or must run its original forward at this call (``now``: hooks too). The fused tail never calls
    the activation module."""
    if type(act) is not nn.ReLU:
        return f"{name} is {type(act).__name__}, not ReLU"
    if block is not None and (why := norm_why_not(block)):
        return why
    if not now:
        return None
    if not unhooked(act):
        return f"{name} has hooks (the fused tail does not call it)"
    if global_hooks():
        return "global module hooks are registered"
    return None


class FusedForward:
    """The ``forward`` of every fused block class (a mixin before the original class).

    It runs the block's fused computation (``_fused_forward``) in eager mode, and the original class's
    ``forward`` where the fused one must not run:

    * under TorchScript (``torch.jit.script``): the original forward compiles as it always did (the fused
      one is Python-only, ``torch.jit.unused``);
    * while torch.compile / torch.export traces with the ``"inductor"`` compile policy (the default, see
      ``fused_residual._compile``): Inductor then sees exactly the unconverted model's graph and fuses it
      as well as it fuses that (our ops would be opaque extern calls to it);
    * whenever ``why_not`` gives a reason at this call (hooks on a module the fused path skips, global
      module hooks), or the input's dtype is not one the fused ops take (float64).

    Under FX symbolic tracing (``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor``) a
    converted block inside the traced model is recorded as one ``call_module`` node: the graph then runs
    the block itself, bit-identical to the model's forward and right in train and eval alike.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._original_forward(x)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy) and x.tracer.root is not self:
            # FX symbolic tracing: the block becomes one node that calls it (the graph keeps the block as a
            # submodule), so the graph computes exactly what the model computes, in whichever mode it runs
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        if self._run_original(x):
            return self._original_forward(x)
        return self._fused_forward(x)

    @torch.jit.unused
    def _run_original(self, x: torch.Tensor) -> bool:
        if plain_under_compile() or self._why_not() is not None:
            return True
        return not fx_tracing() and x.dtype not in SUPPORTED_DTYPES  # float64 models run as they are

    @torch.jit.unused
    def _why_not(self) -> str | None:
        raise NotImplementedError

    @torch.jit.unused
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _renamed(fn, name: str):
    """``fn`` under another name (same code, globals and closure). TorchScript names a method it compiles
    after the function's ``__name__``: the original ``forward`` called from ours must not be "forward"."""
    g = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    g.__kwdefaults__, g.__annotations__ = fn.__kwdefaults__, dict(fn.__annotations__)
    g.__qualname__ = fn.__qualname__.rsplit(".", 1)[0] + "." + name
    return g


def fused_class(base: type, why_not, fused_forward, name: str) -> type:
    """The fused subclass of block class ``base``: :class:`FusedForward` with ``base.forward`` as the
    original forward, ``fused_forward(self, x)`` as the fused one, ``why_not(self)`` asked per call."""
    return type(name, (FusedForward, base), {
        "__module__": fused_forward.__module__,
        "__qualname__": name,
        "__doc__": f"{base.__module__}.{base.__qualname__} with its residual tail fused (fused_residual.convert).",
        "_original_forward": _renamed(base.forward, "_original_forward"),
        "_fused_forward": torch.jit.unused(fused_forward),
        "_why_not": torch.jit.unused(lambda self: why_not(self)),
    })


def bn_foldable(bn: nn.Module) -> bool:
    """``bn`` normalises with fixed statistics right now (eval mode, running stats present), has no hooks,
    and no FX trace is being made (a graph with the BN folded would be wrong once switched to train)."""
    return (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None
            and bn.running_var is not None and unhooked(bn) and not fx_tracing())


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """(weight', bias') of the convolution followed by ``bn`` in eval mode, as one convolution, in the
    convolution's dtype."""
    return fold_bn_tensors(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def fold_bn_tensors(weight, bias, mean, var, gamma, beta, eps: float):
    """:func:`fold_bn` on the tensors themselves (one call node in FX graphs). Computed in float32 at least:
    a half-precision model may keep its BN in float32, and rounding the factors to half first would add
    error."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    scale = torch.rsqrt(var.to(dtype) + eps)
    if gamma is not None:
        scale = scale * gamma.to(dtype)
    mean = mean.to(dtype)
    shift = -mean * scale if bias is None else (bias.to(dtype) - mean) * scale
    if beta is not None:
        shift = shift + beta.to(dtype)
    w = weight.to(dtype) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), shift.to(weight.dtype)


def fold_pays(out_elements: int, *convs: nn.Conv2d) -> bool:
    """Whether folding BN into these convolutions' weights is cheaper than running the BN: folding costs a
    pass over the weights at every forward (they are refolded, so they stay current), and saves at least a
    pass over the output. A small batch at low resolution makes outputs smaller than the weights (ResNet-18
    at batch 2, 64 px: 1.8x slower folded on CPU). Under torch.compile / torch.export always true: shapes
    may be symbolic there, and a test on them would become a guard."""
    if torch.compiler.is_compiling():
        return True
    return out_elements >= sum(c.weight.numel() for c in convs)


def conv_out_elements(x: torch.Tensor, conv: nn.Conv2d) -> int:
    """About how many elements ``conv(x)`` has (for :func:`fold_pays`)."""
    return x.shape[0] * conv.out_channels * (x.shape[-2] // conv.stride[0]) * (x.shape[-1] // conv.stride[1])


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """``bn(conv(x))``, as a single convolution with folded weights when ``bn`` can be folded and that pays."""
    if (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and unhooked(conv) and bn_foldable(bn)
            and fold_pays(conv_out_elements(x, conv), conv)):
        w, b = fold_bn(conv.weight, conv.bias, bn)
        return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    return bn(conv(x))


def bn_fusable(bn: nn.Module) -> bool:
    """``bn`` normalises with batch statistics at this call (training, or no running statistics) and the
    fused BatchNorm ops can stand for it: a plain ``nn.BatchNorm2d`` (SyncBatchNorm and other subclasses run
    themselves) without hooks, and no FX trace being made (the call would freeze this batch's momentum into
    the graph). Under torch.compile (the ``"kernels"`` compile policy) ``momentum=None`` runs the module: its
    momentum is read from a buffer. The caller checks that the input is 4-D, as the module would."""
    return (type(bn) is nn.BatchNorm2d and unhooked(bn)
            and (bn.training or bn.running_mean is None or bn.running_var is None)
            and not fx_tracing() and not (bn.momentum is None and torch.compiler.is_compiling()))


def bn_arguments(bn: nn.BatchNorm2d):
    """``(running_mean, running_var, training, momentum)`` as ``nn.BatchNorm2d.forward`` hands them to
    ``F.batch_norm``, with its side effect done: ``num_batches_tracked`` counts this batch in training, and
    ``momentum=None`` means the cumulative average ``1 / num_batches_tracked``."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return (bn.running_mean if keep else None), (bn.running_var if keep else None), training, momentum


def is_relu(act: nn.Module) -> bool:
    """``act`` is a plain ReLU without hooks: the fused ops may compute it without calling it."""
    return type(act) is nn.ReLU and unhooked(act)


def conv_bn_relu(x: torch.Tensor, conv: nn.Module, bn: nn.Module, act: nn.Module) -> torch.Tensor:
    """``act(bn(conv(x)))``: with batch statistics (training) BN-apply and the ReLU run as one
    ``batch_norm_relu``; in eval BN is folded into the convolution where that pays (:func:`conv_bn`)."""
    if not (is_relu(act) and bn_fusable(bn)):
        return act(conv_bn(x, conv, bn))
    h = conv(x)
    if h.dim() != 4:  # (BatchNorm2d's own error for other ranks)
        return act(bn(h))
    running_mean, running_var, training, momentum = bn_arguments(bn)
    return fr.batch_norm_relu(h, running_mean, running_var, bn.weight, bn.bias, training, momentum, bn.eps)


def bn_add_relu(h: torch.Tensor, bn: nn.Module, skip: torch.Tensor) -> torch.Tensor:
    """``relu(bn(h) + skip)`` as the block tails write it (``out += skip`` in place, then the ReLU): one
    ``batch_norm_add_relu`` when BN uses batch statistics and the shortcut has h's shape and dtype (under
    autocast a float32 shortcut beside a bf16 main path adds in float32 as eager does, unfused)."""
    if bn_fusable(bn) and h.dim() == 4 and skip.dtype == h.dtype and skip.shape == h.shape:
        running_mean, running_var, training, momentum = bn_arguments(bn)
        return fr.batch_norm_add_relu(h, skip, running_mean, running_var, bn.weight, bn.bias, training, momentum,
                                      bn.eps)
    return add_relu_tail(bn(h), skip)


def is_gemm_conv(conv: nn.Module, stride_one: bool = False) -> bool:
    """A plain 1x1 convolution (square stride, no padding, dilation or groups): a GEMM over pixels."""
    return (type(conv) is nn.Conv2d and unhooked(conv) and conv.kernel_size == (1, 1) and conv.groups == 1
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1)
            and conv.stride[0] == conv.stride[1] and (not stride_one or conv.stride == (1, 1)))


@dataclass
class Projection:
    """A downsample shortcut ``[pool,] conv, bn``, the structures torchvision and timm build."""

    pool: nn.Module | None
    conv: nn.Conv2d
    bn: nn.Module

    @staticmethod
    def parse(downsample: nn.Module | None) -> "Projection | None":
        # exactly a Sequential without hooks: a subclass's forward or a hook must run
        if type(downsample) is not nn.Sequential or not unhooked(downsample):
            return None
        parts = list(downsample)
        if len(parts) == 2 and type(parts[0]) is nn.Conv2d:
            return Projection(None, parts[0], parts[1])
        if len(parts) == 3 and type(parts[1]) is nn.Conv2d:
            if type(parts[0]) is nn.Identity and unhooked(parts[0]):  # skipped: it must be a plain Identity
                return Projection(None, parts[1], parts[2])
            if isinstance(parts[0], nn.AvgPool2d):  # called
                return Projection(parts[0], parts[1], parts[2])
        return None

    def gemm_ready(self) -> bool:
        return is_gemm_conv(self.conv) and bn_foldable(self.bn)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) if self.pool is not None else x

    def folded(self):
        return fold_bn(self.conv.weight, self.conv.bias, self.bn)


def shortcut(downsample: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    if downsample is None:
        return x
    proj = Projection.parse(downsample)
    if proj is None:
        return downsample(x)
    return conv_bn(proj.input(x), proj.conv, proj.bn)


def add_relu_tail(out: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``out += skip; out = relu(out)`` as the blocks write it, in one pass (in place, like eager). Where
    the dtypes differ (autocast: a low-precision main path, a float32 shortcut) eager's in-place add
    computes in the wider type and rounds once: so does this, unfused."""
    if skip.dtype != out.dtype:
        return out.add_(skip).relu_()
    return fr.add_relu_(out, skip)


def basic_tail(out: torch.Tensor, x: torch.Tensor, downsample: nn.Module | None) -> torch.Tensor:
    """``relu(out + shortcut(x))`` for a BasicBlock: when the projection's BN can be folded, the shortcut's
    1x1 GEMM runs with ``out`` as its residual and the ReLU in its epilogue (see also
    :func:`conv_bn_tail`)."""
    proj = Projection.parse(downsample)
    if proj is not None and proj.gemm_ready() and fold_pays(out.numel(), proj.conv):
        w, b = proj.folded()
        return fr.conv1x1_add_relu(proj.input(x), w, out, b, stride=proj.conv.stride[0])
    return add_relu_tail(out, shortcut(downsample, x))


def conv_bn_tail(h: torch.Tensor, x: torch.Tensor, conv: nn.Module, bn: nn.Module,
                 downsample: nn.Module | None) -> torch.Tensor:
    """``relu(bn(conv(h)) + shortcut(x))`` for a BasicBlock's conv2 and bn2: one ``batch_norm_add_relu`` in
    training, :func:`basic_tail` after the (folded) convolution otherwise."""
    if bn_fusable(bn):
        return bn_add_relu(conv(h), bn, shortcut(downsample, x))
    return basic_tail(conv_bn(h, conv, bn), x, downsample)


def bottleneck_tail(h: torch.Tensor, x: torch.Tensor, conv3: nn.Module, bn3: nn.Module,
                    downsample: nn.Module | None) -> torch.Tensor:
    """``relu(bn3(conv3(h)) + shortcut(x))`` for a Bottleneck: with BN folded, conv3 and the projection
    accumulate in one dual GEMM kernel (or conv3 takes the identity as its residual)."""
    if bn_fusable(bn3):  # training: BN-apply, the add and the ReLU in one pass
        return bn_add_relu(conv3(h), bn3, shortcut(downsample, x))
    out_elements = conv_out_elements(h, conv3)
    if is_gemm_conv(conv3, stride_one=True) and bn_foldable(bn3) and fold_pays(out_elements, conv3):
        w3, b3 = fold_bn(conv3.weight, conv3.bias, bn3)
        if downsample is None:
            return fr.conv1x1_add_relu(h, w3, x, b3)
        proj = Projection.parse(downsample)
        if proj is not None and proj.gemm_ready() and fold_pays(out_elements, conv3, proj.conv):
            wd, bd = proj.folded()
            return fr.dual_conv1x1_add_relu(h, w3, proj.input(x), wd, b3 + bd, shortcut_stride=proj.conv.stride[0])
    return add_relu_tail(conv_bn(h, conv3, bn3), shortcut(downsample, x))


def passes_through(m: nn.Module | None) -> bool:
    """``m`` is absent or returns its input unchanged right now (a plain Identity, or timm's drop-path /
    drop-block in eval mode or with probability 0), without hooks, so that skipping the call changes
    nothing."""
    if m is None:
        return True
    if not unhooked(m):
        return False
    if type(m) is nn.Identity:
        return True
    return (type(m).__name__ in ("DropPath", "DropBlock2d") and not fx_tracing()
            and (not m.training or getattr(m, "drop_prob", 1.0) == 0.0))
