"""fused_residual: fused kernels for residual blocks.

``add_relu`` / ``add_relu_`` fuse the skip-add with the ReLU; the GEMM ops fuse the projection shortcut's
matrix product with a bias + residual + ReLU epilogue; ``batch_norm_relu`` / ``batch_norm_add_relu`` fuse a
training-mode BatchNorm with the add and the ReLU. All are ``torch.ops.fused_residual`` custom ops with
autograd, and run on Triton (CUDA), C++ (CPU) or the eager reference (see :func:`use_backend`).
:func:`convert` swaps torchvision / timm ResNet blocks for fused ones; :func:`freeze` makes an
inference-only copy with BatchNorm folded once.
"""

from . import nn, reference  # noqa: F401
from ._backend import BACKENDS, BackendUnavailable, current_backend, use_backend
from ._compile import compile_policy, set_compile_policy
from . import functional as _functional
from .functional import (add_relu, add_relu_, batch_norm_add_relu, batch_norm_relu, conv1x1_add_relu,
                         dual_conv1x1_add_relu, dual_linear_add_relu, linear_add_relu)

import torch as _torch

for _name in _functional.__all__:
    _torch.fx.wrap(_name)  # FX records ``fused_residual.<op>(...)`` as one call node (see functional.py)
del _name

from .integrations import ConversionReport, conversion_report, convert, revert
from .integrations.freeze import FreezeReport, FrozenModel, freeze

__version__ = "0.1.0"

__all__ = [
    *_functional.__all__,
    "BACKENDS",
    "BackendUnavailable",
    "ConversionReport",
    "FreezeReport",
    "FrozenModel",
    "compile_policy",
    "conversion_report",
    "convert",
    "current_backend",
    "freeze",
    "revert",
    "set_compile_policy",
    "use_backend",
]
