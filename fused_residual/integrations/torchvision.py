"""torchvision ResNet blocks (``torchvision.models.resnet.BasicBlock`` / ``Bottleneck``), fused.

``convert`` swaps a block's class for the subclass below (same attributes, parameters and buffers; only
``forward`` differs); ``revert`` swaps it back.

Train mode: each BN followed by the ReLU runs as one ``batch_norm_relu``, and the last BN, the shortcut add
and the ReLU as one ``batch_norm_add_relu`` (the downsample's BN stays a module call).
Eval mode: every conv+BN pair is folded into one convolution; the Bottleneck's conv3+bn3 and the downsample
conv+bn run as one ``dual_conv1x1_add_relu`` kernel (identity blocks: ``conv1x1_add_relu`` with the input as
the residual); the BasicBlock's downsample runs as ``conv1x1_add_relu`` with the main path as the residual.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet

from ._common import bottleneck_tail, conv_bn_relu, conv_bn_tail, fused_class, tail_why_not


def why_not(block: nn.Module, now: bool = True) -> str | None:
    """Why ``block`` cannot be converted (``now`` false), or cannot run fused at this call, or None."""
    return tail_why_not(block.relu, now=now, block=block)


def basic_forward(self, x):
    out = conv_bn_relu(x, self.conv1, self.bn1, self.relu)
    return conv_bn_tail(out, x, self.conv2, self.bn2, self.downsample)


def bottleneck_forward(self, x):
    out = conv_bn_relu(x, self.conv1, self.bn1, self.relu)
    out = conv_bn_relu(out, self.conv2, self.bn2, self.relu)
    return bottleneck_tail(out, x, self.conv3, self.bn3, self.downsample)


FusedBasicBlock = fused_class(resnet.BasicBlock, why_not, basic_forward, "FusedBasicBlock")
FusedBottleneck = fused_class(resnet.Bottleneck, why_not, bottleneck_forward, "FusedBottleneck")

# original class -> (fused class, why_not, short name)
BLOCKS = {
    resnet.BasicBlock: (FusedBasicBlock, why_not, "torchvision.BasicBlock"),
    resnet.Bottleneck: (FusedBottleneck, why_not, "torchvision.Bottleneck"),
}
