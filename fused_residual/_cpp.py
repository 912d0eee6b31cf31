"""Loads the C++ CPU kernels: ``fused_residual._C_avx2`` where torch reports AVX2 or better, else
``fused_residual._C``. Import failures are recorded, not raised, so the package imports without them."""

from __future__ import annotations

import importlib

import torch

from ._errors import BackendUnavailable

_module = None
_error: str | None = None
_loaded = False


def _candidates() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    names = ["fused_residual._C"]
    if capability.startswith("AVX2") or capability.startswith("AVX512"):
        names.insert(0, "fused_residual._C_avx2")
    return names


def _load():
    global _module, _error, _loaded
    if _loaded:
        return
    _loaded = True
    errors = []
    for name in _candidates():
        try:
            _module = importlib.import_module(name)
            return
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    _error = ("C++ extension not importable (" + "; ".join(errors) + "); build it with "
              "`pip install --no-build-isolation -e .` (FUSED_RESIDUAL_BUILD_CPP=0 skips it)")


def status() -> tuple[bool, str]:
    """(available, detail): the instruction set in use, or why the kernels cannot be loaded."""
    _load()
    if _module is None:
        return False, _error
    return True, f"{_module.__name__} ({_module.capability})"


def module():
    """The loaded extension module; raises ``BackendUnavailable`` with the cause if there is none."""
    _load()
    if _module is None:
        raise BackendUnavailable(f"the 'cpp' backend is not available: {_error}")
    return _module
