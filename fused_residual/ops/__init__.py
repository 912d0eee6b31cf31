"""torch.library ops of fused_residual, one module per op family; importing this package registers them.

``add_relu``, ``batch_norm`` and ``gemm_add_relu`` each declare their ops as ``OpSpec`` s
(``_registry``); :data:`REGISTRY` holds every registered op. ``use_gemm_path`` forces the CUDA GEMM ops
onto the fused Triton kernel or the vendor library (see ``_gemm_library``).
"""

from . import add_relu, batch_norm, gemm_add_relu  # noqa: F401
from ._gemm_library import GEMM_PATHS, use_gemm_path  # noqa: F401
from ._registry import REGISTRY  # noqa: F401
