"""One op, one spec: how every ``torch.ops.fused_residual`` op is declared, registered and called.

An op family module (``add_relu.py``, ``batch_norm.py``, ``gemm_add_relu.py``) writes, per op, an
:class:`OpSpec`: the implementation (argument checks, allocation, then the backend's kernels picked by
:func:`dispatch`), the fake impl, the autograd formulas and the eager formula. :func:`register` turns it
into a :class:`RegisteredOp`:

* ``torch.library.custom_op("fused_residual::<name>")`` with the fake impl, the autograd formulas (whose
  backward runs under its forward's ``use_backend`` choice: :func:`fused_residual._backend.remember`) and,
  if declared, an autocast kernel;
* the op's one call path, ``RegisteredOp.__call__``, which the public functions use (see below);
* an entry in :data:`REGISTRY` (``tests/test_opcheck.py`` checks that it holds every op of the namespace
  and runs ``opcheck`` on each).

**The call path.** Under torch.compile / torch.export tracing with the ``"inductor"`` compile policy
(``fused_residual._compile``) a call emits ``spec.lowering`` (the op's aten expression) so that Inductor
fuses it with its neighbours; under forward-mode AD and torch.func transforms, which the ops have no rules
for, it computes ``spec.reference`` (with a warning); elsewhere it runs the registered op. The one
exception is plain eager mode on plain tensors (:func:`fused_residual.ops._direct.plain_eager`): there the
call runs the same implementation and the same autograd formulas through a ``torch.autograd.Function``
built here from the spec, without the custom op's dispatcher round trips. Results are bit-identical
(same code, same backend); only host time differs. ``fused-residual bench overhead`` measures the two paths
(CPU, 2026-12-07, float32, us per call through the public function vs ``torch.ops``): add_relu fwd 7.2 vs
9.4, fwd+bwd 35 vs 45; linear_add_relu fwd+bwd 87 vs 102; conv1x1_add_relu fwd+bwd 293 vs 325. A
training step of a converted ResNet-50 makes ~50 fused calls, so the fast path saves ~0.5-1 ms of host
time per step: that matters where launches, not kernels, bound the step (small batches on a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _backend
from .._compile import plain_under_compile
from . import _direct

NAMESPACE = "fused_residual"

# Kernels added to the custom ops beyond what custom_op registers (autocast; the in-place op's autograd).
# allow_override: custom_op registers an Autograd kernel of its own, which older torch releases refuse to
# replace by default.
LIBRARY = torch.library.Library(NAMESPACE, "IMPL")

AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                 | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))


def impl_autocast(name: str, kernel: Callable) -> None:
    """Register ``kernel(keyset, *args)`` as op ``name``'s autocast kernel on CPU and CUDA."""
    for key in ("AutocastCPU", "AutocastCUDA"):
        LIBRARY.impl(name, kernel, key, with_keyset=True)


def impl_autograd(name: str, kernel: Callable) -> None:
    """Register ``kernel(keyset, *args)`` as op ``name``'s autograd kernel (mutating ops, which
    ``register_autograd`` does not take)."""
    LIBRARY.impl(name, kernel, "Autograd", with_keyset=True, allow_override=True)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s CUDA device (Triton launches on the current device)."""
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------
# Backend dispatch


def dispatch(implementations: dict[str, Callable], device: torch.device) -> Callable:
    """The implementation of the backend in effect for ``device`` (``fused_residual._backend.resolve``):
    ``implementations`` maps ``"triton"``, ``"cpp"`` and ``"eager"`` to callables."""
    return implementations[_backend.resolve(device)]


# ---------------------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op, declared once.

    ``impl(*args)``            the implementation: checks, allocation, ``dispatch`` to a backend
    ``fake(*args)``            the fake (meta) implementation: checks, then empty outputs of the right layout
    ``setup_context(ctx, inputs, output)`` / ``backward(ctx, *grads)``
                               the autograd formulas (``register_autograd``'s); None: no autograd
    ``reference(*args)``       the eager formula with the op's signature and outputs, used under forward-mode
                               AD and torch.func transforms; None: the op itself (its caller handles them)
    ``lowering(*args)``        what a call emits while torch.compile / torch.export trace it under the
                               ``"inductor"`` policy (an aten expression Inductor can fuse); None: the op
                               itself (its caller then lowers at its own level, see ``batch_norm.py``)
    ``autocast(keyset, *args)``  the op's autocast kernel, if it has one
    ``mutates_args``           as ``torch.library.custom_op``
    """

    name: str
    impl: Callable
    fake: Callable
    setup_context: Callable | None = None
    backward: Callable | None = None
    reference: Callable | None = None
    lowering: Callable | None = None
    autocast: Callable | None = None
    mutates_args: tuple[str, ...] = ()


class RegisteredOp:
    """A registered op: ``op(*args)`` is its one call path (module docstring); ``.op`` the ``custom_op``
    object, ``.overload`` ``torch.ops.fused_residual.<name>.default``, ``.function`` the eager fast path's
    autograd Function (None without autograd)."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        self.name = spec.name
        self.op = torch.library.custom_op(f"{NAMESPACE}::{spec.name}", spec.impl, mutates_args=spec.mutates_args)
        self.op.register_fake(spec.fake)
        self.function = None
        if spec.backward is not None:
            setup = _recording_backend(spec.setup_context)
            backward = _backend.under_forward_backend(spec.backward)
            self.op.register_autograd(backward, setup_context=setup)
            self.function = _autograd_function(spec.name, spec.impl, setup, backward)
        if spec.autocast is not None:
            impl_autocast(spec.name, spec.autocast)
        self.overload = getattr(getattr(torch.ops, NAMESPACE), spec.name).default
        names = list(inspect.signature(spec.impl).parameters)
        self._mutated = tuple(names.index(a) for a in spec.mutates_args)

    def __repr__(self) -> str:
        return f"<fused_residual op {self.name}>"

    def __call__(self, *args):
        """The op's result for a public function's call (see the module docstring)."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not _direct.plain_eager(*tensors):
            if self.spec.lowering is not None and plain_under_compile():
                return self.spec.lowering(*args)
            if self.spec.reference is not None and _direct.transformed():
                warnings.warn(f"fused_residual: {self.name} under forward-mode AD or a torch.func transform runs "
                              "the eager formulas (the fused ops have no rules for those)", stacklevel=3)
                return self.spec.reference(*args)
            return self.overload(*args)
        if self.function is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.function.apply(*args)
        result = self.spec.impl(*args)
        for i in self._mutated:  # what the custom op's wrapper does for autograd's in-place checks
            torch.autograd.graph.increment_version(args[i])
        return result

    def inside_autograd(self, *args):
        """Calls made inside autograd formulas: the registered op where autograd must record it (double
        backward, ``create_graph=True``) or a tracer must see it, the implementation directly otherwise."""
        if torch.is_grad_enabled() or not _direct.plain_eager(*[a for a in args if isinstance(a, torch.Tensor)]):
            return self.overload(*args)
        return self.spec.impl(*args)


REGISTRY: dict[str, RegisteredOp] = {}


def register(spec: OpSpec) -> RegisteredOp:
    """Register ``spec`` with torch.library and return its :class:`RegisteredOp` (also in :data:`REGISTRY`)."""
    if spec.name in REGISTRY:
        raise ValueError(f"fused_residual op {spec.name!r} is registered twice")
    registered = REGISTRY[spec.name] = RegisteredOp(spec)
    return registered


def _recording_backend(setup_context: Callable) -> Callable:
    @functools.wraps(setup_context)
    def setup(ctx, inputs, output):
        _backend.remember(ctx)
        return setup_context(ctx, inputs, output)
    return setup


def _autograd_function(name: str, impl: Callable, setup_context: Callable, backward: Callable):
    """The eager fast path: a ``torch.autograd.Function`` running ``impl`` with the op's own formulas."""

    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    return type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(lambda ctx, *grads: backward(ctx, *grads)),
        "__doc__": f"The eager fast path of ``torch.ops.{NAMESPACE}.{name}`` (fused_residual.ops._registry).",
    })
