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


def basic_forward(self, x):
    shortcut_in = x
    if passes_through(self.drop_block):
        x = conv_bn_relu(x, self.conv1, self.bn1, self.act1)
    else:
        x = self.act1(self.drop_block(conv_bn(x, self.conv1, self.bn1)))
    x = self.aa(x)
    if self.se is None and passes_through(self.drop_path):
        return conv_bn_tail(x, shortcut_in, self.conv2, self.bn2, self.downsample)
    x = conv_bn(x, self.conv2, self.bn2)
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    return basic_tail(x, shortcut_in, self.downsample)


def bottleneck_forward(self, x):
    shortcut_in = x
    x = conv_bn_relu(x, self.conv1, self.bn1, self.act1)
    if passes_through(self.drop_block):
        x = conv_bn_relu(x, self.conv2, self.bn2, self.act2)
    else:
        x = self.act2(self.drop_block(conv_bn(x, self.conv2, self.bn2)))
    x = self.aa(x)
    if self.se is None and passes_through(self.drop_path):
        return bottleneck_tail(x, shortcut_in, self.conv3, self.bn3, self.downsample)
    x = conv_bn(x, self.conv3, self.bn3)
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    return add_relu_tail(x, shortcut(self.downsample, shortcut_in))


FusedBasicBlock = fused_class(resnet.BasicBlock, why_not, basic_forward, "FusedBasicBlock")
FusedBottleneck = fused_class(resnet.Bottleneck, why_not, bottleneck_forward, "FusedBottleneck")

BLOCKS = {
    resnet.BasicBlock: (FusedBasicBlock, why_not, "timm.BasicBlock"),
    resnet.Bottleneck: (FusedBottleneck, why_not, "timm.Bottleneck"),
}
