"""Imports the Triton kernels on demand and reports whether they run compiled or interpreted."""

from __future__ import annotations

import importlib

from ._errors import BackendUnavailable

_status: tuple[bool, bool, str] | None = None


def kernels(name: str):
    """``fused_residual._kernels.<name>``; raises ``BackendUnavailable`` if triton cannot be imported."""
    ok, _, why = status()
    if not ok:
        raise BackendUnavailable(f"the 'triton' backend is not available: {why}")
    return importlib.import_module(f"fused_residual._kernels.{name}")


def status() -> tuple[bool, bool, str]:
    """(importable, interpreting, detail)."""
    global _status
    if _status is None:
        try:
            import triton
            from triton.runtime.interpreter import InterpretedFunction

            from ._kernels.common import relu_f32
        except Exception as exc:  # ImportError, or triton failing on a platform it does not support
            _status = (False, False, f"triton not importable: {type(exc).__name__}: {exc}")
        else:
            # triton.jit decides at decoration time whether a kernel is interpreted.
            interpreting = isinstance(relu_f32, InterpretedFunction)
            mode = "interpreter (TRITON_INTERPRET=1)" if interpreting else "compiled"
            _status = (True, interpreting, f"triton {triton.__version__}, {mode}")
    return _status


def interpreting() -> bool:
    return status()[1]


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids (triton.cdiv, without importing triton at package import)."""
    return -(-a // b)
