"""Backend selection: which implementation an op runs.

``auto``    CUDA tensors -> Triton kernels, CPU tensors -> the C++ kernels (eager if they were not built)
``triton``  Triton kernels; on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1`` set
            before triton is imported)
``cpp``     the C++ CPU kernels: ``fused_residual._C_avx2`` where torch reports AVX2 or better, else
            ``fused_residual._C`` (see ``fused_residual._cpp``); CPU tensors only
``eager``   the eager PyTorch reference (``fused_residual.reference``)

Chosen, innermost first, by ``with fused_residual.use_backend(name):`` and the environment variable
``FUSED_RESIDUAL_BACKEND`` (read at each call). A backend that cannot serve a tensor raises
:class:`BackendUnavailable` naming the reason; none falls back to another silently. The one fallback,
``auto`` on CPU without the C++ kernels, gives bit-identical results for ``add_relu`` and warns once.

The choice is read when an op *runs*, inside the opaque custom op, so it also applies to code compiled
with ``torch.compile`` or exported with ``torch.export``. A backward runs under the choice its forward ran
under (eager mode; compiled backward graphs read the choice in effect where they run).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings

import torch

from . import _cpp, _triton
from ._errors import BackendUnavailable

BACKENDS = ("auto", "triton", "cpp", "eager")
ENV_VAR = "FUSED_RESIDUAL_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_residual_backend", default=None)


def _validate(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown fused_residual backend {name!r} (from {source}); "
                         f"expected one of {', '.join(BACKENDS)}")
    return name.lower()


@contextlib.contextmanager
def use_backend(name: str):
    """Run the fused ops inside the ``with`` block on backend ``name`` (one of :data:`BACKENDS`)."""
    token = _override.set(_validate(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


def remember(ctx) -> None:
    """Keep the ``use_backend`` choice in effect during a forward (if any) on its autograd ``ctx``, for
    :func:`under_forward_backend`. Under torch.compile, nothing: compiled backward graphs read the choice
    where they run (and dynamo of torch 2.11 cannot trace ``ContextVar.get``)."""
    ctx.fused_residual_backend = None if torch.compiler.is_compiling() else _override.get()


def under_forward_backend(backward):
    """Decorates an op's autograd ``backward``: it runs under its forward's ``use_backend`` choice. Autograd
    may run a backward on another thread (CUDA's device threads, a thread pool), which does not see the
    context variable, or after the ``with`` block has ended. Without a choice at the forward, the one in
    effect at the backward applies."""
    @functools.wraps(backward)
    def run(ctx, *grads, **kwargs):
        name = getattr(ctx, "fused_residual_backend", None)
        if name is None:
            return backward(ctx, *grads, **kwargs)
        token = _override.set(name)
        try:
            return backward(ctx, *grads, **kwargs)
        finally:
            _override.reset(token)
    return run


def current_backend() -> str:
    """The backend name in effect: the innermost ``use_backend``, else ``$FUSED_RESIDUAL_BACKEND``, else auto."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR)
    return _validate(env, f"${ENV_VAR}") if env else "auto"


def triton_status() -> tuple[bool, bool, str]:
    """(importable, interpreting, detail) for the Triton kernels."""
    return _triton.status()


def cpp_status() -> tuple[bool, str]:
    return _cpp.status()


_warned_auto_cpu = False


def resolve(device: torch.device) -> str:
    """The concrete backend (``triton``, ``cpp`` or ``eager``) that serves tensors on ``device`` now."""
    name = current_backend()
    kind = device.type
    if name == "eager":
        return "eager"
    if name == "auto":
        if kind == "cuda":
            name = "triton"
        elif kind == "cpu":
            ok, why = cpp_status()
            if ok:
                return "cpp"
            global _warned_auto_cpu
            if not _warned_auto_cpu:
                _warned_auto_cpu = True
                warnings.warn(f"fused_residual: C++ CPU kernels unavailable ({why}); backend 'auto' runs the "
                              "eager reference on CPU tensors", RuntimeWarning, stacklevel=3)
            return "eager"
        else:
            raise BackendUnavailable(f"fused_residual has no kernels for {kind!r} tensors; "
                                     "use_backend('eager') runs the eager reference there")
    if name == "cpp":
        if kind != "cpu":
            raise BackendUnavailable(f"the 'cpp' backend runs on CPU tensors only, got a {kind!r} tensor")
        ok, why = cpp_status()
        if not ok:
            raise BackendUnavailable(f"the 'cpp' backend is not available: {why}")
        return "cpp"
    # triton
    importable, interpreting, why = triton_status()
    if not importable:
        raise BackendUnavailable(f"the 'triton' backend is not available: {why}")
    if kind == "cpu" and not interpreting:
        raise BackendUnavailable("the 'triton' backend runs on CPU tensors only under the Triton interpreter: "
                                 "set TRITON_INTERPRET=1 before triton is imported")
    if kind not in ("cpu", "cuda"):
        raise BackendUnavailable(f"the 'triton' backend does not run on {kind!r} tensors")
    return "triton"
