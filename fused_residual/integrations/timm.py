"""timm ResNet blocks (``timm.models.resnet.BasicBlock`` / ``Bottleneck``), fused.

As for torchvision (see ``integrations/torchvision.py``), with timm's extra block parts honoured: drop_block,
anti-aliasing (``aa``) and inner activations other than ReLU run as they are (a drop_block between a BN and
its ReLU keeps them apart); a block with squeeze-excitation (``se``) or an active drop-path keeps the
add+ReLU tail fused but computes its last BN apart (in eval it is not folded into the tail GEMM: the ``se``
module sits between them). The tail activation (``act2`` / ``act3``) must be ReLU.
"""

from __future__ import annotations

import torch
from timm.models import resnet
from torch import nn

from ._common import (add_relu_tail, basic_tail, bottleneck_tail, conv_bn, conv_bn_relu, conv_bn_tail, fused_class,
                      passes_through, shortcut, tail_why_not)

torch.fx.wrap("add_relu_tail")  # as in _common: one call in FX graphs (this module's name for it)


def _tail_act(block: nn.Module) -> nn.Module:
    return block.act3 if isinstance(block, resnet.Bottleneck) else block.act2


def why_not(block: nn.Module, now: bool = True) -> str | None:
    return tail_why_not(_tail_act(block), "tail activation", now=now, block=block)


def _conv_bn_drop_block_act(block, x, conv, bn, act):
    """``act(drop_block(bn(conv(x))))``: BN + ReLU fused where drop_block passes through."""
    if passes_through(block.drop_block):
        return conv_bn_relu(x, conv, bn, act)
    return act(block.drop_block(conv_bn(x, conv, bn)))


def _se_drop_path(block, x):
    """The parts between a block's last BN and its shortcut add: squeeze-excitation, drop-path."""
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    return x


def _tail_fusable(block) -> bool:
    """Nothing sits between the last BN and the shortcut add at this call."""
    return block.se is None and passes_through(block.drop_path)


def basic_forward(self, x):
    shortcut_in = x
    x = self.aa(_conv_bn_drop_block_act(self, x, self.conv1, self.bn1, self.act1))
    if _tail_fusable(self):
        return conv_bn_tail(x, shortcut_in, self.conv2, self.bn2, self.downsample)
    return basic_tail(_se_drop_path(self, conv_bn(x, self.conv2, self.bn2)), shortcut_in, self.downsample)


def bottleneck_forward(self, x):
    shortcut_in = x
    x = conv_bn_relu(x, self.conv1, self.bn1, self.act1)
    x = self.aa(_conv_bn_drop_block_act(self, x, self.conv2, self.bn2, self.act2))
    if _tail_fusable(self):
        return bottleneck_tail(x, shortcut_in, self.conv3, self.bn3, self.downsample)
    x = _se_drop_path(self, conv_bn(x, self.conv3, self.bn3))
    return add_relu_tail(x, shortcut(self.downsample, shortcut_in))


FusedBasicBlock = fused_class(resnet.BasicBlock, why_not, basic_forward, "FusedBasicBlock")
FusedBottleneck = fused_class(resnet.Bottleneck, why_not, bottleneck_forward, "FusedBottleneck")

BLOCKS = {
    resnet.BasicBlock: (FusedBasicBlock, why_not, "timm.BasicBlock"),
    resnet.Bottleneck: (FusedBottleneck, why_not, "timm.Bottleneck"),
}
