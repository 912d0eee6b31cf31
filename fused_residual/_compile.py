"""What the fused code does while torch.compile or torch.export traces it.

A ``torch.library`` custom op is opaque to Inductor: it becomes an extern call, and nothing fuses across it.
Measured on CPU (2026-12-06, ResNet-50), compiling a converted model that kept the ops ran 0.79x (eval) and
0.95x (train) of the unconverted model compiled: BN-apply, the add and the ReLU no longer fused with their
neighbours. So by default, while dynamo or export traces them, the public functions and the converted blocks
emit the plain aten expression they stand for (``relu(F.batch_norm(x) + skip)``, ``relu(addmm + residual)``,
the block's original forward), and Inductor produces exactly the code it produces for the unconverted
model: a converted model compiles to what the original compiles to.

``FUSED_RESIDUAL_COMPILE=kernels`` (read at import) or :func:`set_compile_policy("kernels")` keeps the
custom ops in traced graphs instead (our kernels run as extern calls), for shapes where they beat
Inductor's code. The policy is read at trace time: set it before compiling (a compiled graph keeps what it
was traced with; ``torch._dynamo.reset()`` retraces). ``torch.onnx.export`` always gets the aten
expressions: ONNX has standard operators for them, none for ours.
"""

from __future__ import annotations

import os

import torch

POLICIES = ("inductor", "kernels")
ENV_VAR = "FUSED_RESIDUAL_COMPILE"


def _validate(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in POLICIES:
        raise ValueError(f"unknown fused_residual compile policy {name!r} (from {source}); "
                         f"expected one of {', '.join(POLICIES)}")
    return name.lower()


_policy = _validate(os.environ.get(ENV_VAR) or "inductor", f"${ENV_VAR}")


def set_compile_policy(name: str) -> None:
    """``"inductor"`` (default): traced code sees the plain aten expressions; ``"kernels"``: traced code
    keeps the ``torch.ops.fused_residual`` ops. Takes effect for graphs traced afterwards."""
    global _policy
    _policy = _validate(name, "set_compile_policy")


def compile_policy() -> str:
    return _policy


def plain_under_compile() -> bool:
    """True while torch.compile / torch.export traces and the policy is ``"inductor"``, or while
    ``torch.onnx.export`` traces whatever the policy (ONNX has no operators for ours; their aten expressions
    translate to standard ones): emit the aten expression, not the custom op."""
    return torch.compiler.is_compiling() and (_policy == "inductor" or torch.onnx.is_in_onnx_export())
