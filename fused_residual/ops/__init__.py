"""torch.library ops of fused_residual, one module per op family. Importing this package registers them."""

from . import add_relu, batch_norm, gemm_add_relu  # noqa: F401
