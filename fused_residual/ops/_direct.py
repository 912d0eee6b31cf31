"""When a call may skip the dispatcher (the eager fast path of ``fused_residual.ops._registry``).

A ``torch.library.custom_op`` call hops Python -> dispatcher -> Python autograd kernel -> dispatcher ->
Python implementation, and ``register_autograd`` wraps the backward again (``fused-residual bench
overhead`` measures both paths). The ops' call path therefore runs the same implementation and the same
autograd formulas through a ``torch.autograd.Function`` when nothing but autograd needs to see the call:
:func:`plain_eager` says when that is. Everywhere else (torch.compile and torch.export tracing,
torch.jit.trace, fake / functional / subclass / meta tensors, lazily negated or conjugated views,
TorchFunction and TorchDispatch modes, the profiler) calls take ``torch.ops.fused_residual.*``, so compiled
graphs, exported programs and traces see the registered ops (``torch.set_default_device`` installs a
TorchFunction mode, so under it every call takes the registered op). Under forward-mode AD and functorch
transforms (vmap, torch.func.grad / jvp), which the ops have no rules for, :func:`transformed` is true and
calls compute with the eager formulas. Both paths run the same code on the same backend, so their results
are bit-identical (tests/test_registration.py checks it).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors) -> bool:
    """True when the call may bypass the dispatcher: every tensor is a plain strided ``Tensor`` /
    ``Parameter`` holding its values as stored (not meta, no lazy negation or conjugation, which the
    dispatcher resolves before a kernel sees the memory) and no tracer, mode, transform, forward-mode AD
    level or profiler is active."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.is_meta or t.is_neg() or t.is_conj()
                              or t.layout != torch.strided):
            return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None
                or torch.autograd._profiler_enabled() or torch._C._get_tracing_state() is not None
                or _forward_ad._current_level >= 0)


def transformed() -> bool:
    """Whether forward-mode AD or a functorch transform (``torch.func.grad``/``jvp``/``vmap``; not
    ``functionalize``) is active outside compilation: the custom ops have no forward-mode or functorch
    rules (forward AD would drop the tangent without a word, ``torch.func.grad`` fails), so the public
    functions compute those calls with the eager formulas, which every transform handles."""
    if torch.compiler.is_compiling():
        return False
    if _forward_ad._current_level >= 0:
        return True
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    # functionalize needs nothing of the ops (they are functional already); grad, jvp and vmap do
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() != TransformType.Functionalize for i in retrieve_all_functorch_interpreters())
