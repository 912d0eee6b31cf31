"""torchvision ResNet blocks (``torchvision.models.resnet.BasicBlock`` / ``Bottleneck``), fused.

``convert`` swaps a block's class for the subclass below (same attributes, parameters and buffers; only
``forward`` differs); ``revert`` swaps it back.

Train mode: the tail ``out += identity; relu`` runs as one in-place ``add_relu_``.
Eval mode: every conv+BN pair is folded into one convolution; the Bottleneck's conv3+bn3 and the downsample
conv+bn run as one ``dual_conv1x1_add_relu`` kernel (identity blocks: ``conv1x1_add_relu`` with the input as
the residual); the BasicBlock's downsample runs as ``conv1x1_add_relu`` with the main path as the residual.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet

from ._common import basic_tail, bottleneck_tail, conv_bn, fused_class, tail_why_not


def why_not(block: nn.Module, now: bool = True) -> str | None:
    """Why ``block`` cannot be converted (``now`` false), or cannot run fused at this call, or None."""
    return tail_why_not(block.relu, now=now)


def basic_forward(self, x):
    out = self.relu(conv_bn(x, self.conv1, self.bn1))
    out = conv_bn(out, self.conv2, self.bn2)
    return basic_tail(out, x, self.downsample)


def bottleneck_forward(self, x):
    out = self.relu(conv_bn(x, self.conv1, self.bn1))
    out = self.relu(conv_bn(out, self.conv2, self.bn2))
    return bottleneck_tail(out, x, self.conv3, self.bn3, self.downsample)


FusedBasicBlock = fused_class(resnet.BasicBlock, why_not, basic_forward, "FusedBasicBlock")
FusedBottleneck = fused_class(resnet.Bottleneck, why_not, bottleneck_forward, "FusedBottleneck")

# original class -> (fused class, why_not, short name)
BLOCKS = {
    resnet.BasicBlock: (FusedBasicBlock, why_not, "torchvision.BasicBlock"),
    resnet.Bottleneck: (FusedBottleneck, why_not, "torchvision.Bottleneck"),
}
