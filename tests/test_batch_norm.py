"""batch_norm_relu / batch_norm_add_relu: F.batch_norm's semantics on every backend, dtype and layout.

Oracle: the same computation in float64 (``ref64``) and eager PyTorch in the tested dtype; every output and
gradient must satisfy ``|fused - ref64| <= 2 |eager - ref64| + atol[dtype]`` (fused_residual.testing), and the
shortcut's gradient, a gated copy of the output gradient, must be bit-exact.
"""

import pytest
import torch
import torch.nn.functional as F

import fused_residual as fr
from cases import BN_CASES, DTYPES, bn_case_ids, device_backend_params
from helpers import NoOpFunctionMode, assert_bitwise_equal, assert_close_to_ref, poisoned

OPS = torch.ops.fused_residual


def _layout(t, fmt):
    return t.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else t.contiguous()


def _params(C, device, dtype):
    w = (torch.rand(C, device=device) + 0.5).to(dtype)
    b = torch.randn(C, device=device).to(dtype)
    rm = torch.randn(C, device=device).to(dtype)
    rv = (torch.rand(C, device=device) + 0.5).to(dtype)
    return w, b, rm, rv


def _eager(x, skip, rm, rv, w, b, training, momentum, eps, grad, dtype=None):
    """relu(F.batch_norm(...) [+ skip]) in ``dtype`` (default: the inputs'): (out, grads, rm, rv)."""
    cast = (lambda t: None if t is None else t.detach().to(dtype)) if dtype else (
        lambda t: None if t is None else t.detach().clone())
    xs, ss, ws, bs = (cast(t) for t in (x, skip, w, b))
    for t in (xs, ss, ws, bs):
        if t is not None:
            t.requires_grad_()
    rms, rvs = cast(rm), cast(rv)
    y = F.batch_norm(xs, rms, rvs, ws, bs, training, momentum, eps)
    if ss is not None:
        y = y + ss
    y = torch.relu(y)
    y.backward(grad.to(y.dtype))
    grads = [xs.grad] + ([ss.grad] if ss is not None else []) + [t if t is None else t.grad for t in (ws, bs)]
    return y.detach(), grads, rms, rvs


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", BN_CASES, ids=bn_case_ids())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_skip", [True, False], ids=["add", "noadd"])
@pytest.mark.parametrize("save", ["mask", "output"])
def test_matches_eager(device, backend, dtype, shape, fmt, training, with_skip, save):
    C = shape[1]
    x = _layout(torch.randn(shape, device=device) * 2 + 0.5, fmt).to(dtype).requires_grad_()
    skip = _layout(torch.randn(shape, device=device), fmt).to(dtype).requires_grad_() if with_skip else None
    w, b = (t.requires_grad_() for t in _params(C, device, dtype)[:2])
    _, _, rm, rv = _params(C, device, dtype)
    rm0, rv0 = rm.clone(), rv.clone()
    grad = torch.randn(shape, device=device).to(dtype)
    with fr.use_backend(backend), poisoned():
        if with_skip:
            out = fr.batch_norm_add_relu(x, skip, rm, rv, w, b, training, 0.1, 1e-5, save=save)
        else:
            out = fr.batch_norm_relu(x, rm, rv, w, b, training, 0.1, 1e-5, save=save)
        out.backward(grad)
    fused_grads = [x.grad] + ([skip.grad] if with_skip else []) + [w.grad, b.grad]
    eager = _eager(x, skip, rm0, rv0, w, b, training, 0.1, 1e-5, grad)
    ref = _eager(x, skip, rm0, rv0, w, b, training, 0.1, 1e-5, grad, dtype=torch.float64)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
    assert_close_to_ref(out, eager[0], ref[0], "out")
    names = ["grad x"] + (["grad skip"] if with_skip else []) + ["grad weight", "grad bias"]
    for name, g, ge, g64 in zip(names, fused_grads, eager[1], ref[1]):
        assert g.dtype == ge.dtype, name
        assert_close_to_ref(g, ge, g64, name)
    if with_skip:  # the gated copy of the output gradient: the same gate as the (matching) output
        gate = ~(out <= 0)
        assert_bitwise_equal(skip.grad, torch.where(gate, grad, torch.zeros_like(grad)), "grad skip gate")
    for name, fused_buf, eager_buf, ref_buf in (("running_mean", rm, eager[2], ref[2]),
                                                ("running_var", rv, eager[3], ref[3])):
        assert fused_buf.dtype == dtype
        assert_close_to_ref(fused_buf, eager_buf, ref_buf, name)
    if not training:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval mode must not touch the running stats"


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32-params", "same-params"])
def test_amp_parameters_and_optional_arguments(device, backend, param_dtype):
    """bf16 activations with float32 parameters and statistics (AMP models), weight/bias None, no running
    stats in training (track_running_stats=False)."""
    shape, dtype = (4, 6, 5, 5), torch.bfloat16
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    skip = torch.randn(shape, device=device).to(dtype)
    w, b, rm, rv = _params(6, device, param_dtype or dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    cases = [dict(w=w, b=b, rm=rm, rv=rv), dict(w=None, b=None, rm=rm, rv=rv), dict(w=w, b=None, rm=None, rv=None)]
    for c in cases:
        x.grad = None
        rm0 = None if c["rm"] is None else c["rm"].clone()
        rv0 = None if c["rv"] is None else c["rv"].clone()
        with fr.use_backend(backend):
            out = fr.batch_norm_add_relu(x, skip, c["rm"], c["rv"], c["w"], c["b"], True)
            out.backward(grad)
        eager = _eager(x, skip, rm0, rv0, c["w"], c["b"], True, 0.1, 1e-5, grad)
        ref = _eager(x, skip, rm0, rv0, c["w"], c["b"], True, 0.1, 1e-5, grad, dtype=torch.float64)
        assert_close_to_ref(out, eager[0], ref[0], f"out {c.keys()}")
        assert_close_to_ref(x.grad, eager[1][0], ref[1][0], "grad x")
        if c["rm"] is not None:
            assert c["rm"].dtype == (param_dtype or dtype)
            assert_close_to_ref(c["rm"], eager[2], ref[2], "running_mean")
            assert_close_to_ref(c["rv"], eager[3], ref[3], "running_var")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_backward_is_deterministic(device, backend):
    shape = (8, 16, 9, 9)
    x = torch.randn(shape, device=device).to(memory_format=torch.channels_last).requires_grad_()
    skip = torch.randn(shape, device=device).requires_grad_()
    w = torch.rand(16, device=device).requires_grad_()
    b = torch.randn(16, device=device).requires_grad_()
    grad = torch.randn(shape, device=device)
    runs = []
    with fr.use_backend(backend):
        for _ in range(2):
            for t in (x, skip, w, b):
                t.grad = None
            rm, rv = torch.zeros(16, device=device), torch.ones(16, device=device)
            out = fr.batch_norm_add_relu(x, skip, rm, rv, w, b, True)
            out.backward(grad)
            runs.append([out.detach(), x.grad, skip.grad, w.grad, b.grad, rm, rv])
    for name, a, b_ in zip(["out", "dx", "dskip", "dw", "db", "rm", "rv"], *runs):
        assert_bitwise_equal(a.contiguous(), b_.contiguous(), name)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_mask_mode_keeps_no_output_sized_tensor(device, backend):
    """save="mask": autograd keeps x, per-channel vectors and ceil(numel/8) bytes; save="output" keeps the
    output beside x, as eager does."""
    shape = (4, 8, 6, 6)
    numel = 4 * 8 * 6 * 6
    for save, expected_big in (("mask", 1), ("output", 2)):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        x = torch.randn(shape, device=device).requires_grad_()
        skip = torch.randn(shape, device=device).requires_grad_()
        w, b = torch.ones(8, device=device, requires_grad=True), torch.zeros(8, device=device, requires_grad=True)
        with fr.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fr.batch_norm_add_relu(x, skip, None, None, w, b, True, save=save)
        big = [t for t in saved if t.numel() == numel]
        assert len(big) == expected_big, [(t.shape, t.dtype) for t in saved]
        assert all(t.numel() in (numel, 8, (numel + 7) // 8) for t in saved), [(t.shape, t.dtype) for t in saved]
        if save == "mask":
            assert any(t.dtype == torch.uint8 and t.numel() == (numel + 7) // 8 for t in saved)
            assert not any(t.dtype == torch.bool for t in saved)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_specials_propagate_like_eager(device, backend):
    """NaN in x poisons its channel's statistics as in eager; Inf and NaN in the output gradient where the
    ReLU is closed give zero gradients."""
    shape = (3, 4, 5, 5)
    x = torch.randn(shape, device=device)
    x[0, 1, 2, 2] = float("nan")
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    with fr.use_backend(backend):
        out = fr.batch_norm_relu(x, rm, rv, None, None, True)
    ref = torch.relu(F.batch_norm(x, torch.zeros(4), torch.ones(4), None, None, True))
    assert torch.equal(out.isnan(), ref.isnan())
    assert rm[1].isnan() and not rm[[0, 2, 3]].isnan().any()
    xg = torch.randn(shape, device=device).requires_grad_()
    grad = torch.randn(shape, device=device)
    with fr.use_backend(backend):
        out = fr.batch_norm_relu(xg, None, None, None, None, True)
    closed = out.detach() <= 0
    grad[closed] = float("inf")
    grad.view(-1)[closed.view(-1).nonzero()[::2]] = float("nan")
    out.backward(grad)
    # dx mixes each channel's gradients, so the gate is checked on the op's gated gradient (dskip)
    with fr.use_backend(backend):
        _, mask, mean, invstd, _ = OPS.batch_norm_relu(xg.detach(), None, None, None, None, True, 1e-5, True)
        _, dskip, _, _ = OPS.batch_norm_relu_backward(grad, xg.detach(), None, mask, mean, invstd, None, False,
                                                      True, False)
    assert_bitwise_equal(dskip, torch.where(closed, torch.zeros_like(grad), grad), "gated gradient")


def test_running_stats_update_matches_module_rules():
    """momentum as nn.BatchNorm2d passes it, over several steps; num_batches_tracked is the caller's."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5) * 3 + 1
        bn(x)
        with fr.use_backend("eager"):
            fr.batch_norm_relu(x, rm, rv, bn.weight, bn.bias, True, 0.1, bn.eps)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)


def _arg_error(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_input_is_refused_before_anything_is_written():
    x = torch.randn(2, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    keep = rm.clone(), rv.clone()
    f = fr.batch_norm_add_relu
    _arg_error(lambda: f(x, torch.randn(2, 4, 3, 2), rm, rv, training=True), ValueError, "shapes differ")
    _arg_error(lambda: f(x, torch.randn(2, 4, 3, 3).half(), rm, rv, training=True), TypeError, "dtypes differ")
    _arg_error(lambda: f(x, x, torch.zeros(5), rv, training=True), ValueError, "running_mean has shape")
    _arg_error(lambda: f(x, x, rm, torch.ones(3), training=True), ValueError, "running_var has shape")
    _arg_error(lambda: f(x, x, rm, rv, torch.ones(2), training=True), ValueError, "weight has shape")
    _arg_error(lambda: f(x, x, rm, rv, None, torch.ones(5), training=True), ValueError, "bias has shape")
    _arg_error(lambda: f(x.long(), x, rm, rv, training=True), TypeError, "x has dtype torch.int64")
    _arg_error(lambda: f(x, x, rm.int(), rv, training=True), TypeError, "running_mean has dtype torch.int32")
    _arg_error(lambda: f(torch.randn(1, 4), torch.randn(1, 4), rm, rv, training=True), ValueError,
               "more than 1 value per channel")
    _arg_error(lambda: f(x, x, rm, rv, training=True, save="bits"), ValueError, "save must be one of")
    _arg_error(lambda: f(x, x, None, None, training=False), ValueError, "must be given when training=False")
    _arg_error(lambda: f(x, x, rm, None, training=True), ValueError, "given together")
    _arg_error(lambda: f(x, x, rm, rv, training=True, momentum=None), TypeError, "momentum must be a number")
    _arg_error(lambda: f(torch.randn(4), torch.randn(4), None, None, training=True), ValueError,
               "batch and a channel dimension")
    _arg_error(lambda: fr.batch_norm_relu("x", rm, rv), TypeError, "x must be a torch.Tensor")
    assert torch.equal(rm, keep[0]) and torch.equal(rv, keep[1])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("policy", ["inductor", "kernels"])
def test_compile_fullgraph(device, backend, policy):
    torch._dynamo.reset()
    fr.set_compile_policy(policy)
    try:
        def block(x, skip, rm, rv, w, b):
            return fr.batch_norm_add_relu(x * 2, skip, rm, rv, w, b, True).sum(dim=1)

        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        x = torch.randn(4, 6, 3, 3, device=device, requires_grad=True)
        skip = torch.randn(4, 6, 3, 3, device=device, requires_grad=True)
        w = torch.rand(6, device=device, requires_grad=True)
        b = torch.randn(6, device=device, requires_grad=True)
        rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
        with fr.use_backend(backend):
            out = compiled(x, skip, rm, rv, w, b)
            out.sum().backward()
        xe, se, we, be = (t.detach().clone().requires_grad_() for t in (x, skip, w, b))
        rme, rve = torch.zeros(6, device=device), torch.ones(6, device=device)
        ref = torch.relu(F.batch_norm(xe * 2, rme, rve, we, be, True) + se).sum(dim=1)
        ref.sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, e in ((x.grad, xe.grad), (skip.grad, se.grad), (w.grad, we.grad), (b.grad, be.grad), (rm, rme),
                     (rv, rve)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    finally:
        fr.set_compile_policy("inductor")
        torch._dynamo.reset()


# ---- the C++ fast path (plain eager, CPU, cpp backend: kernels/csrc/bn_call.h) ---------------------------


def _run_public(x, skip, rm, rv, w, b, training, momentum, save, grad, needs):
    leaves = [None if t is None else t.detach().clone().requires_grad_(need) for t, need in zip((x, skip, w, b), needs)]
    rm, rv = (None if t is None else t.clone() for t in (rm, rv))
    xs, ss, ws, bs = leaves
    if ss is None:
        y = fr.batch_norm_relu(xs, rm, rv, ws, bs, training, momentum, save=save)
    else:
        y = fr.batch_norm_add_relu(xs, ss, rm, rv, ws, bs, training, momentum, save=save)
    if y.requires_grad:
        y.backward(grad)
    return y, [None if t is None else t.grad for t in leaves], rm, rv


@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)], ids=["fp32", "bf16-amp", "fp16"])
@pytest.mark.parametrize("shape,fmt", [((4, 32, 5, 3), "channels_last"), ((3, 8, 7, 5), "contiguous"),
                                       ((20, 16), "contiguous"), ((2, 8, 3, 4, 2), "contiguous")],
                         ids=["cl", "nchw", "2d", "5d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("save", ["mask", "output"])
def test_fast_path_equals_the_registered_ops(dtype, param_dtype, shape, fmt, training, save):
    """The one-call C++ path gives bit for bit what the registered ops and the Python running-statistics update
    give: outputs, every gradient (cast to the parameters' dtypes), the running buffers."""
    C = shape[1]
    x = _layout(torch.randn(shape), fmt).to(dtype)
    skip = _layout(torch.randn(shape), fmt).to(dtype)
    grad = _layout(torch.randn(shape), fmt).to(dtype)
    w, b, rm, rv = _params(C, "cpu", param_dtype)
    for args in [(x, skip, rm, rv, w, b), (x, None, rm, rv, w, None), (x, skip, None, None, None, b)]:
        if not training and args[2] is None:
            continue
        for needs in [(True, True, True, True), (False, True, False, True), (True, False, True, False)]:
            differentiable = any(t is not None and need for t, need in zip((x, args[1], args[4], args[5]), needs))
            with fr.use_backend("cpp"):
                fast = _run_public(*args, training, 0.3, save, grad, needs)
                with NoOpFunctionMode():
                    slow = _run_public(*args, training, 0.3, save, grad, needs)
            if differentiable:  # which path ran: the C++ node, or the registered op's
                assert "BatchNormReLUCall" in fast[0].grad_fn.name()
                assert "BatchNormReLUCall" not in slow[0].grad_fn.name()
            else:
                assert fast[0].grad_fn is None and slow[0].grad_fn is None
            assert_bitwise_equal(fast[0].detach(), slow[0].detach())
            assert fast[0].stride() == slow[0].stride()
            for g_fast, g_slow, arg, need in zip(fast[1], slow[1], (args[0], args[1], args[4], args[5]), needs):
                if arg is None or not need:
                    assert g_fast is None and g_slow is None
                else:
                    assert g_fast.dtype == arg.dtype and g_fast.shape == arg.shape
                    assert_bitwise_equal(g_fast, g_slow)
            for r_fast, r_slow in zip(fast[2:], slow[2:]):
                if r_fast is not None:
                    assert_bitwise_equal(r_fast, r_slow)


def test_fast_path_autograd_rules():
    """Version counters, saved-tensor checks, no-grad calls and create_graph behave as on the registered ops."""
    x = torch.randn(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = _params(8, "cpu", torch.float32)
    with fr.use_backend("cpp"):
        # the running buffers are written in place: their version counters move, as with F.batch_norm
        v0 = (rm._version, rv._version)
        fr.batch_norm_relu(x, rm, rv, w, b, True)
        assert rm._version > v0[0] and rv._version > v0[1]
        # no input needs grad: no graph, no mask kept
        with torch.no_grad():
            assert fr.batch_norm_relu(x.requires_grad_(), rm, rv, w, b, True).grad_fn is None
        # x modified in place after the forward: the backward refuses, as for any saved tensor
        xs = x.detach().clone().requires_grad_()
        h = xs * 1.0
        y = fr.batch_norm_relu(h, rm, rv, w, b, True)
        h.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
        # first-order gradients under create_graph work; differentiating them again is refused with a message
        xs = x.detach().clone().requires_grad_()
        y = fr.batch_norm_relu(xs, None, None, w, b, True)
        g, = torch.autograd.grad((y * torch.randn_like(y)).sum(), xs, create_graph=True)
        expect, = torch.autograd.grad((fr.batch_norm_relu(xs, None, None, w, b, True) * 0).sum(), xs)
        assert g.shape == xs.shape and g.requires_grad and expect.shape == xs.shape
        with pytest.raises(RuntimeError, match="not differentiable"):
            g.sum().backward()


def test_fast_path_writes_every_output_element():
    """Under poisoned allocation (0x55 bytes in every new output) the fast path gives what it gives without:
    every element of the output and of the x and skip gradients is written."""
    shape = (3, 16, 5, 5)
    for fmt in ("channels_last", "contiguous"):
        x = _layout(torch.randn(shape), fmt)
        skip = _layout(torch.randn(shape), fmt)
        w, b, rm, rv = _params(16, "cpu", torch.float32)
        grad = torch.randn(shape)
        runs = []
        for poison in (False, True):
            with fr.use_backend("cpp"), fr._alloc.poison_outputs(poison):
                runs.append(_run_public(x, skip, rm, rv, w, b, True, 0.1, "mask", grad, (True,) * 4))
            assert "BatchNormReLUCall" in runs[-1][0].grad_fn.name()
        (y0, g0, _, _), (y1, g1, _, _) = runs
        assert_bitwise_equal(y1.detach(), y0.detach())
        assert_bitwise_equal(g1[0], g0[0])
        assert_bitwise_equal(g1[1], g0[1])


class _Subclass(torch.Tensor):
    pass


class _NoOpDispatchMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _under(context):
    """A context manager for each way of calling that the one-call C++ path must leave to the Python path."""
    import contextlib
    import torch.autograd.forward_ad as fwAD

    return {"plain": contextlib.nullcontext, "function mode": NoOpFunctionMode, "dispatch mode": _NoOpDispatchMode,
            "profiler": lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
            "default device": lambda: torch.device("cpu"), "eager backend": lambda: fr.use_backend("eager"),
            "forward AD": fwAD.dual_level}[context]()


@pytest.mark.parametrize("context", ["plain", "function mode", "dispatch mode", "profiler", "default device",
                                     "eager backend", "forward AD"])
def test_fast_path_is_taken_only_in_plain_eager(context):
    """The whole-call C++ path (``fast_call``) runs exactly where nothing but autograd needs to see the call: under
    modes, the profiler, another backend or forward-mode AD the Python path runs (registered ops or eager formulas),
    and every path gives eager's output, gradients and running buffers."""
    x = torch.randn(4, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    skip, grad = torch.randn_like(x), torch.randn_like(x)
    w, b, rm, rv = _params(16, "cpu", torch.float32)
    with _under(context):
        got = _run_public(x, skip, rm, rv, w, b, True, 0.2, "mask", grad, (True,) * 4)
    assert ("BatchNormReLUCall" in got[0].grad_fn.name()) == (context == "plain")
    want = _eager(x, skip, rm, rv, w, b, True, 0.2, 1e-5, grad)
    torch.testing.assert_close(got[0].detach(), want[0], rtol=1e-5, atol=1e-5)
    for g, e in zip(got[1], want[1]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[3], want[3])


def test_fast_path_leaves_transforms_subclasses_and_bad_input_to_python(monkeypatch):
    """vmap / torch.func.grad (batched tensors are plain Tensors in Python: the C++ test is the functorch dispatch
    key), tensor subclasses, jit.trace, and every argument the Python checks refuse: the same results or errors
    as without the C++ path, and nothing written on refusal."""
    x = torch.randn(3, 8, 4, 2)
    w, b, rm, rv = _params(8, "cpu", torch.float32)

    def f(x_):
        return fr.batch_norm_relu(x_, None, None, w, b, True)

    def ref(x_):
        return torch.relu(F.batch_norm(x_, None, None, w, b, True))

    xs = torch.stack([x, 2 * x + 1])
    torch.testing.assert_close(torch.func.vmap(f)(xs), torch.func.vmap(ref)(xs))
    torch.testing.assert_close(torch.func.grad(lambda x_: f(x_).square().sum())(x),
                               torch.func.grad(lambda x_: ref(x_).square().sum())(x))
    sub = fr.batch_norm_relu(x.as_subclass(_Subclass).requires_grad_(), rm.clone(), rv.clone(), w, b, True)
    assert type(sub) is _Subclass and "BatchNormReLUCall" not in sub.grad_fn.name()
    traced = torch.jit.trace(lambda x_: fr.batch_norm_relu(x_, None, None, w, b, True), (x,), check_trace=False)
    torch.testing.assert_close(traced(x), ref(x))

    skip = torch.randn_like(x)
    bad = [
        (dict(skip=torch.randn(3, 8, 4, 3)), ValueError, "shapes differ"),
        (dict(skip=skip.double()), TypeError, "dtype"),
        (dict(skip=None), TypeError, "skip must be a torch.Tensor"),
        (dict(rm=torch.zeros(7)), ValueError, "running_mean has shape"),
        (dict(w=torch.ones(8, 1)), ValueError, "weight has shape"),
        (dict(b=torch.zeros(8, dtype=torch.int64)), TypeError, "bias has dtype"),
        (dict(rv=None), ValueError, "given together"),
        (dict(x=x[:1, :, :1, :1], skip=skip[:1, :, :1, :1]), ValueError, "more than 1 value per channel"),
        (dict(x=x.to(torch.int32), skip=skip.to(torch.int32)), TypeError, "dtype"),
        (dict(save="bits"), ValueError, "save must be one of"),
        (dict(momentum=None), TypeError, "momentum must be a number"),
    ]
    for change, error, match in bad:
        args = dict(x=x, skip=skip, rm=rm.clone(), rv=rv.clone(), w=w, b=b, save="mask", momentum=0.1)
        args.update(change)
        before = [t.clone() for t in (args["rm"], args["rv"]) if t is not None]
        with pytest.raises(error, match=match):
            fr.batch_norm_add_relu(args["x"], args["skip"], args["rm"], args["rv"], args["w"], args["b"], True,
                                   args["momentum"], save=args["save"])
        for t, t0 in zip([t for t in (args["rm"], args["rv"]) if t is not None], before):
            assert_bitwise_equal(t, t0)
    monkeypatch.setenv("FUSED_RESIDUAL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown fused_residual backend"):
        fr.batch_norm_relu(x, rm, rv, w, b, True)
