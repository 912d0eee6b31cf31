"""Frozen inference: ``freeze(model)`` folds every BatchNorm once and ends each block in a fused epilogue.

:func:`convert` keeps a model trainable: in eval mode it refolds BN into the convolutions at every forward
(about twice the weight bytes of extra traffic), so the weights follow optimizer steps and
``load_state_dict``. Serving wants the other trade: fold once, store the folded weights, fuse every tail.
``freeze`` returns a new module (the model passed in is left as it was) in which

* every recognised torchvision / timm ``BasicBlock`` / ``Bottleneck`` is replaced by a frozen block whose
  convolutions carry the folded weights and bias as buffers: conv + bias + ReLU (oneDNN / cuDNN
  convolutions, the ReLU in place), and the tail as one ``conv1x1_add_relu`` / ``dual_conv1x1_add_relu``
  (Bottleneck: conv3 and the projection in one GEMM; BasicBlock: the projection with the main path as its
  residual) or ``add_relu_``. On CPU in float32 every convolution runs on oneDNN with weights packed once,
  the ReLU as its post-op, and the tail as one oneDNN convolution with the residual add and the ReLU as
  post-ops (the projection, if any, computed first) where the output is small enough for that to pay
  (``ONEDNN_TAIL_MAX_BYTES``);
* every ``nn.Sequential`` holding a ``Conv2d`` followed by a ``BatchNorm2d`` (timm's deep stems, other
  downsample forms) and the stem of torchvision / timm ``ResNet`` (``conv1`` + ``bn1``) are folded the
  same way, the BN replaced by ``nn.Identity``.

The result is inference-only: ``.train()`` and a forward in training mode raise. Under torch.compile and
torch.export the frozen blocks, as the converted ones, emit their plain aten expression by default (see
``fused_residual._compile``), so exported programs hold convolutions with folded weights and no BN.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .. import functional as fr
from .._checks import SUPPORTED_DTYPES
from ..ops import _direct
from ._common import Projection, add_relu_tail, fold_bn, is_gemm_conv, passes_through, unhooked


_FROZEN_TRAIN = ("fused_residual.freeze: this model is frozen for inference (its BatchNorm layers are folded "
                 "into the convolutions); train the original model and freeze it again")


# Block tails up to this output size run as one oneDNN convolution with the residual add and the ReLU as
# post-ops; larger ones (and 1x1 outputs) as the packed convolution, then our add + ReLU pass. ResNet-50 1x1
# tails at batch 8, 2-core VM, fp32 channels_last, ms for one oneDNN call against conv1x1_add_relu's CPU
# path, a convolution + pass (benchmarks/results/cpu-2026-12-07b/onednn_tail.txt): outputs of 0.8-6.4 MB (112 px)
# 0.49-0.59 against 0.54-1.01; 3.2 MB (224 px, layer 4) 1.85 / 2.33; 6.4 and 12.8 MB equal (1.94 / 1.94,
# 2.11 / 2.12); 25.7 MB (layer 1) 3.49 / 2.68.
ONEDNN_TAIL_MAX_BYTES = 8 << 20


class FoldedConv(nn.Module):
    """A convolution with a BatchNorm folded into it (weight and bias are buffers: nothing to train). On CPU
    in float32 it runs as a oneDNN convolution with its weights packed once per input shape (measured
    1.00x-1.18x the plain convolution per ResNet-50 layer, bit-identical results), with the ReLU that
    follows as its post-op."""

    __jit_ignored_attributes__ = ["_packed"]  # a cache: TorchScript runs the plain convolution

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        with torch.no_grad():
            weight, bias = fold_bn(conv.weight, conv.bias, bn)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._packed: dict = {}  # oneDNN-packed weights by input shape (CPU; not state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv2d(x)
        return self._eager(x)

    def _conv2d(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.jit.unused
    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        if self._onednn(x):
            return self._onednn_conv(x, "none")
        return self._conv2d(x)

    def conv_relu(self, x):
        """``relu(conv(x))``: on CPU one oneDNN call with the ReLU as its post-op (Python only)."""
        if self._onednn(x):
            return self._onednn_conv(x, "relu")
        return torch.relu_(self._eager(x))

    def conv_add_relu(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
        """``relu(conv(x) + other)`` as one oneDNN call, the add and the ReLU its post-ops (CPU, float32,
        Python only), or None where that does not apply or does not pay: ``other`` must be a plain float32
        CPU tensor of the output's shape in x's memory format, of at most :data:`ONEDNN_TAIL_MAX_BYTES`,
        the output more than one pixel."""
        shape = self.output_shape(x)
        if not (self._onednn(x) and type(other) is torch.Tensor and other.dtype == torch.float32
                and other.device.type == "cpu" and tuple(other.shape) == shape
                and other.numel() * other.element_size() <= ONEDNN_TAIL_MAX_BYTES
                and math.prod(shape[2:]) > 1  # torch 2.11's oneDNN refuses 1x1 outputs ("could not create a memory")
                and _same_dense_format(x, other)):
            return None
        return self._onednn_conv(x, "relu", other)

    def output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        sizes = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(x.shape[2:], self.padding, self.dilation, self.weight.shape[2:], self.stride)]
        return (x.shape[0], self.weight.shape[0], *sizes)

    def __getstate__(self):  # deepcopy / pickle: the packed weights are oneDNN-opaque, and a cache
        state = self.__dict__.copy()
        state["_packed"] = {}
        return state

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / ...: new weights, new packing
        self._packed = {}
        return super()._apply(fn, *args, **kwargs)

    def _onednn(self, x):
        """oneDNN with weights packed once for the input's shape: a plain float32 CPU tensor in plain eager
        mode (compiled and exported code keeps aten convolutions), string padding excepted."""
        return (not torch.compiler.is_compiling() and type(x) is torch.Tensor and x.device.type == "cpu"
                and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.dim() == 4 and not isinstance(self.padding, str)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and _direct.plain_eager(x))

    def _onednn_conv(self, x, post_op, other=None):
        # packed per input shape, and again whenever the weight changes (a new tensor, or written in place)
        key = (tuple(x.shape), self.weight.data_ptr(), self.weight._version)
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= 8:
                self._packed.clear()
            packed = self._packed[key] = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
        if other is not None:  # relu(conv + other): a binary post-op, then the unary one
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                "add", None, post_op, [], "")
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, list(self.padding), list(self.stride),
                                                       list(self.dilation), self.groups, post_op, [], "")

    def extra_repr(self) -> str:
        w = self.weight
        return (f"{w.shape[1] * self.groups}, {w.shape[0]}, kernel_size={tuple(w.shape[2:])}, stride={self.stride}, "
                "BN folded")


def _same_dense_format(x: torch.Tensor, other: torch.Tensor) -> bool:
    """Both dense in one memory format: contiguous, or channels_last (4-D)."""
    return any(x.is_contiguous(memory_format=f) and other.is_contiguous(memory_format=f)
               for f in (torch.contiguous_format, torch.channels_last))


class FrozenShortcut(nn.Module):
    """A projection shortcut ``[pool,] conv, bn`` with its BN folded."""

    def __init__(self, proj: Projection):
        super().__init__()
        self.pool = proj.pool
        self.conv = FoldedConv(proj.conv, proj.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x) if self.pool is not None else x)


class FrozenBlock(nn.Module):
    """A residual block with every BN folded: ``relu(main(x) + shortcut(x))``, ``main`` being two
    (BasicBlock: ``conv1``, ``act1``, ``conv2``) or three (Bottleneck: ``conv1``, ``act1``, ``conv2``,
    ``act2``, ``conv3``) folded convolutions; the last one's output is fused with the shortcut and the ReLU.

    ``aa`` is timm's anti-aliasing after the last inner activation, ``se`` timm's squeeze-excitation after
    the last convolution, ``shortcut`` a :class:`FrozenShortcut` (a 1x1 projection: a GEMM), another
    module (called) or None (the identity); ``gemm_tail``: the Bottleneck's conv3 is a 1x1 convolution at
    stride 1, a GEMM. Under TorchScript the block computes the same expression unfused (aten convolutions,
    add, ReLU): the fused functions are Python."""

    def __init__(self, convs: list[FoldedConv], acts: list[nn.Module], aa: nn.Module | None,
                 se: nn.Module | None, shortcut: nn.Module | None, kind: str, gemm_tail: bool):
        super().__init__()
        self.kind, self.gemm_tail = kind, gemm_tail
        self.conv1, self.act1, self.conv2 = convs[0], acts[0], convs[1]
        self.act2 = acts[1] if kind == "bottleneck" else None
        self.conv3 = convs[2] if kind == "bottleneck" else None
        self.aa, self.se, self.shortcut = aa, se, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # (TorchScript takes no global strings: the short form of _FROZEN_TRAIN)
            raise RuntimeError("fused_residual.freeze: this model is frozen for inference")
        if torch.jit.is_scripting():
            return self._unfused(x)
        return self._fused(x)

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        """The main path up to the last convolution's input."""
        h = self.act1(self.conv1(x))
        if self.conv3 is not None and self.act2 is not None:
            h = self.act2(self.conv2(h))
        if self.aa is not None:
            h = self.aa(h)
        return h

    @torch.jit.unused
    def _inner_fused(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_inner` with each plain ReLU run as its convolution's post-op (oneDNN, CPU)."""
        h = _conv_act(self.conv1, self.act1, x)
        if self.conv3 is not None:
            h = _conv_act(self.conv2, self.act2, h)
        if self.aa is not None:
            h = self.aa(h)
        return h

    def _last(self, h: torch.Tensor) -> torch.Tensor:
        if self.conv3 is not None:
            return self.conv3(h)
        return self.conv2(h)

    def _unfused(self, x: torch.Tensor) -> torch.Tensor:
        out = self._last(self._inner(x))
        if self.se is not None:
            out = self.se(out)
        skip = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(out + skip)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in SUPPORTED_DTYPES:  # float64: as the convolutions compute it, unfused
            return self._unfused(x)
        h = self._inner_fused(x)
        last = self.conv3 if self.conv3 is not None else self.conv2
        sc = self.shortcut
        if self.se is None and last._onednn(h):  # CPU float32: conv + residual + ReLU in one oneDNN call
            skip = x if sc is None else sc(x)
            out = last.conv_add_relu(h, skip)
            return out if out is not None else add_relu_tail(last(h), skip)
        if self.se is None:
            if sc is None and self.gemm_tail:
                return fr.conv1x1_add_relu(h, last.weight, x, last.bias)  # identity: the input is the residual
            if isinstance(sc, FrozenShortcut):
                stride = sc.conv.stride[0]
                xs = sc.pool(x) if sc.pool is not None else x
                if self.gemm_tail:
                    return fr.dual_conv1x1_add_relu(h, last.weight, xs, sc.conv.weight, last.bias + sc.conv.bias,
                                                    shortcut_stride=stride)
                if self.kind == "basic":  # the projection's GEMM takes the main path as its residual
                    return fr.conv1x1_add_relu(xs, sc.conv.weight, last(h), sc.conv.bias, stride=stride)
        out = last(h)
        if self.se is not None:
            out = self.se(out)
        return add_relu_tail(out, x if sc is None else sc(x))

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(_FROZEN_TRAIN)
        return super().train(False)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def _conv_act(conv: FoldedConv, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(act) is nn.ReLU and unhooked(act):
        return conv.conv_relu(x)
    return act(conv(x))


@dataclass
class FreezeReport:
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (module name, block kind)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (module name, kind, reason)
    folded: list[str] = field(default_factory=list)  # conv + BN pairs folded outside the blocks

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for _, kind in self.blocks:
            kinds[kind] = kinds.get(kind, 0) + 1
        done = ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items())) or "none"
        lines = [f"fused_residual.freeze: {len(self.blocks)} blocks frozen ({done}), {len(self.folded)} other "
                 f"conv + BN pairs folded; {len(self.skipped)} blocks left as they are"]
        lines += [f"  folded {name}" for name in self.folded]
        lines += [f"  left {name} ({kind}): {why}" for name, kind, why in self.skipped]
        return "\n".join(lines)


class FrozenModel(nn.Module):
    """What :func:`freeze` returns: the frozen copy (``.module``), inference only, and its report."""

    def __init__(self, module: nn.Module, report: FreezeReport):
        super().__init__()
        self.module = module
        self.report = report
        super().train(False)
        module.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # (TorchScript takes no global strings: the short form of _FROZEN_TRAIN)
            raise RuntimeError("fused_residual.freeze: this model is frozen for inference")
        return self.module(x)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(_FROZEN_TRAIN)
        return super().train(False)


def _foldable_bn(bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded once, or None."""
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} is not nn.BatchNorm2d"
    if bn.running_mean is None or bn.running_var is None:
        return "a BatchNorm without running statistics normalises with batch statistics in eval too"
    if not unhooked(bn):
        return "a BatchNorm with hooks"
    return None


def _foldable_conv(conv: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if not unhooked(conv):
        return "a convolution with hooks"
    return None


def _block_parts(block: nn.Module, family: str):
    """(kind, [(conv, bn, act)], aa, se, tail act, downsample) of a torchvision / timm block."""
    bottleneck = hasattr(block, "conv3")
    if family == "torchvision":
        pairs = [(block.conv1, block.bn1, block.relu), (block.conv2, block.bn2, None)]
        if bottleneck:
            pairs = [pairs[0], (block.conv2, block.bn2, block.relu), (block.conv3, block.bn3, None)]
        return ("bottleneck" if bottleneck else "basic"), pairs, None, None, block.relu, block.downsample
    if bottleneck:
        pairs = [(block.conv1, block.bn1, block.act1), (block.conv2, block.bn2, block.act2),
                 (block.conv3, block.bn3, None)]
        tail = block.act3
    else:
        pairs = [(block.conv1, block.bn1, block.act1), (block.conv2, block.bn2, None)]
        tail = block.act2
    return ("bottleneck" if bottleneck else "basic"), pairs, block.aa, block.se, tail, block.downsample


def _freeze_block(block: nn.Module, family: str) -> tuple[nn.Module | None, str | None]:
    """(frozen block, None) or (None, why not)."""
    kind, pairs, aa, se, tail, downsample = _block_parts(block, family)
    if not unhooked(block):
        return None, "the block has hooks"
    if type(tail) is not nn.ReLU or not unhooked(tail):
        return None, f"tail activation is {type(tail).__name__}{' with hooks' if type(tail) is nn.ReLU else ''}"
    if family == "timm" and not (passes_through(block.drop_block) and passes_through(block.drop_path)):
        return None, "drop_block / drop_path of an unknown kind"
    for conv, bn, _ in pairs:
        why = _foldable_conv(conv) or _foldable_bn(bn)
        if why:
            return None, why
    shortcut = None
    if downsample is not None:
        proj = Projection.parse(downsample)
        if proj is not None and proj.gemm_ready():  # (the copy is in eval mode)
            shortcut = FrozenShortcut(proj)
        else:
            shortcut = downsample  # called as it is (its own conv + BN pairs are folded by _fold_sequentials)
    # the inner activations act on fresh convolution outputs: a plain ReLU runs in place
    acts = [nn.ReLU(inplace=True) if type(act) is nn.ReLU and unhooked(act) else act for _, _, act in pairs[:-1]]
    convs = [FoldedConv(conv, bn) for conv, bn, _ in pairs]
    aa = aa if aa is not None and not (type(aa) is nn.Identity and unhooked(aa)) else None
    gemm_tail = kind == "bottleneck" and is_gemm_conv(pairs[-1][0], stride_one=True)
    return FrozenBlock(convs, acts, aa, se, shortcut, kind, gemm_tail), None


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _fold_sequentials(root: nn.Module, report: FreezeReport) -> None:
    """Conv2d followed by BatchNorm2d inside any nn.Sequential (exact class: its forward is positional)."""
    for name, seq in list(root.named_modules()):
        if type(seq) is not nn.Sequential or not unhooked(seq):
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if type(conv) is nn.Conv2d and not _foldable_conv(conv) and not _foldable_bn(bn):
                seq._modules[a] = FoldedConv(conv, bn)
                seq._modules[b] = nn.Identity()
                report.folded.append(f"{name}.{a} + {name}.{b}" if name else f"{a} + {b}")


def _fold_stem(root: nn.Module, report: FreezeReport) -> None:
    """torchvision's and timm's ResNet stems: ``conv1`` then ``bn1`` in their forward."""
    families = []
    try:
        from torchvision.models.resnet import ResNet as TvResNet
        families.append(TvResNet)
    except ImportError:  # pragma: no cover - torchvision is a dependency of the integrations
        pass
    try:
        from timm.models.resnet import ResNet as TimmResNet
        families.append(TimmResNet)
    except ImportError:
        pass
    for name, m in list(root.named_modules()):
        if type(m) not in families or _foldable_bn(m.bn1):
            continue
        prefix = f"{name}." if name else ""
        stem = m.conv1
        if type(stem) is nn.Conv2d and not _foldable_conv(stem):
            m.conv1 = FoldedConv(stem, m.bn1)
            conv_name = "conv1"
        elif type(stem) is nn.Sequential and unhooked(stem) and len(stem) and not _foldable_conv(stem[-1]):
            key = list(stem._modules)[-1]  # timm's deep stems: conv, bn, act, conv, bn, act, conv
            stem._modules[key] = FoldedConv(stem[-1], m.bn1)
            conv_name = f"conv1.{key}"
        else:
            continue
        m.bn1 = nn.Identity()
        report.folded.append(f"{prefix}{conv_name} + {prefix}bn1")


def freeze(model: nn.Module) -> FrozenModel:
    """An inference-only copy of ``model`` with every BatchNorm folded once and every recognised residual
    block ending in a fused epilogue (see the module docs). ``model`` itself is left unchanged; converted
    blocks (:func:`convert`) are frozen as their original classes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: expected an nn.Module, got {type(model).__name__}")
    from . import _families, revert

    frozen = revert(copy.deepcopy(model)).eval()
    report = FreezeReport()
    blocks = _families()
    for name, m in list(frozen.named_modules()):
        entry = blocks.get(type(m))
        if entry is None:
            continue
        kind = entry[2]
        family = kind.split(".")[0]
        new, why = _freeze_block(m, family)
        if new is None:
            report.skipped.append((name, kind, why))
        else:
            _set(frozen, name, new)
            report.blocks.append((name, kind))
    _fold_stem(frozen, report)
    _fold_sequentials(frozen, report)
    with torch.no_grad():
        for p in frozen.parameters():
            p.requires_grad_(False)
    return FrozenModel(frozen, report)
