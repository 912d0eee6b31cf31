"""torch.library registration: torch.compile(fullgraph=True) and torch.export (opcheck of every op:
test_opcheck.py)."""

import pytest
import torch

import fused_residual as fr
from fused_residual import reference
from fused_residual import verify
from cases import device_backend_params
from helpers import NoOpFunctionMode, assert_bitwise_equal


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("save", ["output", "mask"])
def test_compile_fullgraph_forward_backward(device, backend, save):
    torch._dynamo.reset()

    def block(z, skip):
        return fr.add_relu(z * 2, skip, save=save).sum(dim=1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    z = torch.randn(4, 33, device=device, requires_grad=True)
    skip = torch.randn(4, 33, device=device, requires_grad=True)
    with fr.use_backend(backend):
        out = compiled(z, skip)
        out.sum().backward()
    ze, se = z.detach().clone().requires_grad_(), skip.detach().clone().requires_grad_()
    ref = torch.relu(ze * 2 + se).sum(dim=1)
    ref.sum().backward()
    assert_bitwise_equal(out.detach(), ref.detach(), "forward")
    assert_bitwise_equal(z.grad, ze.grad, "grad z")
    assert_bitwise_equal(skip.grad, se.grad, "grad skip")


def test_compile_inductor_with_dynamic_shapes():
    """The default (inductor) backend, with shapes marked dynamic, forward and backward, no graph break."""
    torch._dynamo.reset()

    def block(z, skip):
        return fr.add_relu(z, skip, save="mask") * 3

    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for n in (17, 40):
        z = torch.randn(n, 8, requires_grad=True)
        skip = torch.randn(n, 8, requires_grad=True)
        out = compiled(z, skip)
        out.backward(torch.ones_like(out))
        assert_bitwise_equal(out.detach(), torch.relu(z.detach() + skip.detach()) * 3)
        assert_bitwise_equal(z.grad, torch.where(out.detach() > 0, 3.0, 0.0))


def test_compile_inplace_no_grad():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(z, skip):
        return fr.add_relu_(z, skip)

    z, skip = torch.randn(10), torch.randn(10)
    expected = torch.relu(z + skip)
    with torch.no_grad():
        block(z, skip)
    assert_bitwise_equal(z, expected)


def _assert_matches_eager_inplace(out, a, skip):
    """out = add_relu_(a * 2, skip), backpropagated with ones into a and skip: bit-identical to eager's
    relu_(a * 2 + skip), values and gradients."""
    ae, se = a.detach().clone().requires_grad_(), skip.detach().clone().requires_grad_()
    ref = torch.relu_(ae * 2 + se)
    ref.backward(torch.ones_like(ref))
    assert_bitwise_equal(out.detach(), ref.detach())
    assert_bitwise_equal(a.grad, ae.grad)
    assert_bitwise_equal(skip.grad, se.grad)


@pytest.mark.parametrize("use", ["return value", "z itself"])
def test_compile_inplace_with_autograd(use):
    """Compiled add_relu_ with gradients, whether the caller keeps the return value or z itself (with
    torch 2.11's dynamo, z kept its old grad_fn when the in-place autograd Function was traced)."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(a, skip):
        z = a * 2
        out = fr.add_relu_(z, skip)
        return out if use == "return value" else z

    a, skip = torch.randn(50, requires_grad=True), torch.randn(50, requires_grad=True)
    out = block(a, skip)
    out.backward(torch.ones_like(out))
    _assert_matches_eager_inplace(out, a, skip)


class LinearTail(torch.nn.Module):
    """``add_relu_(fc(x), x)``: a residual tail whose z needs gradients (through fc) when fc's parameters do."""

    def __init__(self, n):
        super().__init__()
        self.fc = torch.nn.Linear(n, n)

    def forward(self, x):
        return fr.add_relu_(self.fc(x), x)


def test_inplace_op_records_its_backward_when_called_directly():
    """The mutating op cannot register_autograd; its autograd kernel records the backward itself, so a direct
    op call, and the bare op node torch.export leaves of fused_residual.add_relu_, give eager's gradients (a
    direct call used to keep z's old grad_fn: gradients as if no ReLU had run)."""
    a, skip = torch.randn(50, requires_grad=True), torch.randn(50, requires_grad=True)
    z = a * 2
    torch.ops.fused_residual.add_relu_(z, skip)
    z.backward(torch.ones_like(z))
    _assert_matches_eager_inplace(z, a, skip)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        torch.ops.fused_residual.add_relu_(a, skip)
    with torch.no_grad():
        torch.ops.fused_residual.add_relu_(a * 2, skip)

    torch.manual_seed(0)
    tail, x = LinearTail(8), torch.randn(4, 8)
    fr.set_compile_policy("kernels")  # (the default policy exports the aten expression)
    try:
        exported = torch.export.export(tail, (x,), strict=False).module()
    finally:
        fr.set_compile_policy("inductor")
    assert any(n.target is torch.ops.fused_residual.add_relu_.default for n in exported.graph.nodes)
    out = exported(x)
    out.square().sum().backward()
    ref = torch.relu(tail.fc(x) + x)
    ref.square().sum().backward()
    assert_bitwise_equal(out.detach(), ref.detach())
    grads = dict(exported.named_parameters())
    torch.testing.assert_close(grads["fc.weight"].grad, tail.fc.weight.grad)


def test_import_where_library_impl_refuses_overrides_by_default():
    """torch 2.11 (the GPU machine's) defaults Library.impl to allow_override=False: the package must still
    import there (it replaces custom_op's Autograd kernel of add_relu_)."""
    import subprocess
    import sys

    code = ("import torch.library\n"
            "torch.library.Library.impl.__kwdefaults__['allow_override'] = False\n"
            "import fused_residual\n"
            "print('imported')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "imported" in res.stdout, res.stderr[-2000:]


@pytest.mark.filterwarnings("ignore:fused_residual.*eager formulas")
def test_transforms_compute_with_the_eager_formulas():
    """Forward-mode AD and torch.func transforms, which the custom ops have no rules for (forward AD used to
    drop the tangent silently, torch.func.grad to fail): the public functions give eager's results, with
    a warning that the call is not fused."""
    import torch.autograd.forward_ad as fwAD

    x, w, r = torch.randn(5, 8), torch.randn(6, 8), torch.randn(5, 6)
    z, skip = torch.randn(7, 3), torch.randn(7, 3)
    cases = [(fr.linear_add_relu, reference.linear_add_relu, lambda w_: (x, w_, r), w),  # differentiated in w
             (fr.add_relu, reference.add_relu, lambda z_: (z_, skip), z)]  # in z
    for fn, ref, args, primal in cases:
        tangent = torch.randn_like(primal)
        with fwAD.dual_level():
            got = fwAD.unpack_dual(fn(*args(fwAD.make_dual(primal, tangent)))).tangent
        want = torch.func.jvp(lambda p: ref(*args(p)), (primal,), (tangent,))[1]
        assert got is not None and torch.allclose(got, want), fn.__name__
        assert torch.allclose(torch.func.jvp(lambda p: fn(*args(p)), (primal,), (tangent,))[1], want)
        g = torch.func.grad(lambda p: fn(*args(p)).sum())(primal)
        assert torch.allclose(g, torch.func.grad(lambda p: ref(*args(p)).sum())(primal)), fn.__name__
        batched = torch.func.vmap(lambda p: fn(*args(p)))(torch.stack([primal, 2 * primal]))
        # batched against unbatched: another GEMM kernel, so rounding differs (an element near 0 fails a
        # relative tolerance alone: seen on torch 2.11)
        assert torch.allclose(batched[1], ref(*args(2 * primal)), rtol=1e-5, atol=1e-5), fn.__name__
    assert torch.equal(torch.func.grad(lambda a: fr.add_relu_(a * 1.0, skip).sum())(z), (z + skip > 0).float())
    with pytest.warns(UserWarning, match="eager formulas"), fwAD.dual_level():
        fr.linear_add_relu(x, fwAD.make_dual(w, torch.randn_like(w)), r)


def test_functionalize_keeps_the_fused_ops():
    """torch.func.functionalize is a functorch transform the (already functional) ops need nothing from: a
    graph traced through it holds them, and no 'eager formulas' warning is given."""
    import warnings

    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, r = torch.randn(4, 8), torch.randn(6, 8), torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = make_fx(torch.func.functionalize(lambda x, w, r: fr.linear_add_relu(x, w, r)))(x, w, r).graph
    assert any(n.target is torch.ops.fused_residual.linear_add_relu.default for n in graph.nodes)


def test_export_round_trip():
    class Block(torch.nn.Module):
        def forward(self, z, skip):
            return fr.add_relu(z, skip)

    z, skip = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fr.set_compile_policy("kernels")  # (the default policy exports the aten expression)
    try:
        ep = torch.export.export(Block(), (z, skip))
    finally:
        fr.set_compile_policy("inductor")
    assert "fused_residual.add_relu" in str(ep.graph)
    assert_bitwise_equal(ep.module()(z, skip), torch.relu(z + skip))


# ---- the eager fast path (fused_residual.ops._direct) ------------------------------------------------------


def _fast_path_cases():
    """(name, function, args): every public function, with inputs that need gradients."""
    def t(*shape, cl=False):
        x = torch.randn(*shape)
        return (x.to(memory_format=torch.channels_last) if cl else x).requires_grad_()

    return [
        ("add_relu", fr.add_relu, (t(3, 4, 5), t(3, 4, 5))),
        ("add_relu mask", lambda z, s: fr.add_relu(z, s, save="mask"), (t(3, 4, 5), t(3, 4, 5))),
        ("add_relu_", lambda z, s: fr.add_relu_(z * 1, s), (t(40), t(40))),
        ("linear", fr.linear_add_relu, (t(2, 7, 9), t(6, 9), t(2, 7, 6), t(6))),
        ("dual linear", fr.dual_linear_add_relu, (t(7, 9), t(6, 9), t(7, 5), t(6, 5), t(6))),
        ("conv", lambda x, w, r, b: fr.conv1x1_add_relu(x, w, r, b, stride=2),
         (t(2, 4, 5, 5, cl=True), t(6, 4, 1, 1), t(2, 6, 3, 3), t(6))),
        ("dual conv", lambda x, w, s, ws, b: fr.dual_conv1x1_add_relu(x, w, s, ws, b, shortcut_stride=2),
         (t(2, 4, 3, 3), t(6, 4, 1, 1), t(2, 3, 6, 6), t(6, 3, 1, 1), t(6))),
    ]


def _forward_backward(fn, args):
    leaves = verify.leaf_copies(args)
    out = fn(*leaves)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(5)))
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_fast_path_is_bit_identical_to_the_registered_ops(monkeypatch, backend):
    """The public functions run the ops' implementation directly in plain eager mode; with the fast path
    switched off they go through torch.ops. Outputs and gradients agree bit for bit."""
    from fused_residual.ops import _direct

    real_plain_eager = _direct.plain_eager
    for name, fn, args in _fast_path_cases():
        with fr.use_backend(backend):
            answers = []
            with monkeypatch.context() as m:  # record that the fast path was taken
                m.setattr(_direct, "plain_eager", lambda *t: answers.append(real_plain_eager(*t)) or answers[-1])
                direct = _forward_backward(fn, args)
            assert answers and all(answers), (name, answers)
            with monkeypatch.context() as m:
                m.setattr(_direct, "plain_eager", lambda *tensors: False)
                via_ops = _forward_backward(fn, args)
        for i, (a, b) in enumerate(zip(direct, via_ops)):
            assert_bitwise_equal(a, b, f"{name}: {'output' if i == 0 else f'grad of input {i - 1}'}")


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*:FutureWarning")  # still traced by users
def test_fast_path_takes_plain_eager_calls_only():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fused_residual.ops import _direct

    z = torch.randn(4)
    assert _direct.plain_eager(z, torch.nn.Parameter(z), None)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(z)
        assert not _direct.plain_eager(fake)
        assert not _direct.plain_eager(z)  # a real tensor, but a dispatch mode is active
        out = fr.linear_add_relu(mode.from_tensor(torch.randn(3, 4)), mode.from_tensor(torch.randn(5, 4)),
                                 mode.from_tensor(torch.randn(3, 5)))  # the fake impl answers
        assert out.shape == (3, 5)

    with NoOpFunctionMode():
        assert not _direct.plain_eager(z)
    assert not torch.vmap(lambda t: torch.tensor(_direct.plain_eager(t)))(torch.randn(2, 3)).any()
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        assert not _direct.plain_eager(z)
    with torch.profiler.profile() as prof:
        assert not _direct.plain_eager(z)
        fr.linear_add_relu(torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 5))
    assert any(e.name == "fused_residual::linear_add_relu" for e in prof.events())
    traced = torch.jit.trace(lambda z, s: fr.add_relu(z, s), (z, z.flip(0)))
    assert "fused_residual::add_relu" in str(traced.graph)


def test_fast_path_inplace_bumps_the_version_counter():
    """add_relu_ without autograd writes z directly: autograd must still see that z changed."""
    a = torch.randn(8, requires_grad=True)
    z = a.exp()  # exp saves its output for the backward
    before = z._version
    with torch.no_grad():
        fr.add_relu_(z, torch.randn(8))
    assert z._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_fast_path_leaves_lazy_views_and_meta_tensors_to_the_dispatcher():
    """A lazily negated view (``.conj().imag`` of a complex tensor: plain float storage with the negation
    pending) and meta tensors go through torch.ops, where the dispatcher resolves them."""
    from fused_residual.ops import _direct

    c = torch.randn(6, 5, dtype=torch.complex64)
    neg = c.conj().imag
    assert neg.is_neg() and not _direct.plain_eager(neg)
    skip = torch.randn(6, 5)
    assert_bitwise_equal(fr.add_relu(neg, skip), torch.relu(neg.resolve_neg() + skip), "add_relu on a neg view")
    x, w = torch.randn(6, 3), torch.randn(5, 3)
    expected = fr.reference.linear_add_relu(x, w, neg.resolve_neg())
    assert torch.allclose(fr.linear_add_relu(x, w, neg), expected, atol=1e-6)
    meta = torch.empty(6, 5, device="meta")
    assert not _direct.plain_eager(meta)
    out = fr.add_relu(meta, meta)
    assert out.device.type == "meta" and out.shape == (6, 5)
    assert fr.add_relu(meta, meta, save="mask").shape == (6, 5)
    assert fr.add_relu_(meta, torch.empty(6, 5, device="meta")) is meta


def test_fast_path_under_inference_mode_matches_eager():
    """Inference tensors (no version counter) through the fast path, in place included."""
    with torch.inference_mode():
        z, s = torch.randn(7, 6), torch.randn(7, 6)
        expected = torch.relu(z + s)
        assert_bitwise_equal(fr.add_relu(z, s), expected)
        x, w = torch.randn(7, 4), torch.randn(6, 4)
        assert torch.allclose(fr.linear_add_relu(x, w, s), fr.reference.linear_add_relu(x, w, s), atol=1e-6)
        fr.add_relu_(z, s)
        assert_bitwise_equal(z, expected)
    with pytest.raises(RuntimeError, match="inference tensor outside InferenceMode"):
        fr.add_relu_(z, s)  # as z.add_(s) outside the mode: refused, on the fast path too
    assert_bitwise_equal(z, expected)


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*:FutureWarning")  # still traced by users
def test_jit_trace_of_inplace_add_relu_with_grad():
    """torch.jit.trace of ``add_relu_`` on tensors that need gradients (a converted ResNet's train-mode
    tail, or any model with grad enabled): the trace holds the op, and its output and gradients are
    eager's."""
    model = LinearTail(6)
    traced = torch.jit.trace(model, torch.randn(3, 6))
    assert "fused_residual::add_relu_" in str(traced.graph)
    x = torch.randn(5, 6, requires_grad=True)
    out, ref = traced(x), torch.relu(model.fc(x) + x)
    g = torch.randn_like(ref)
    assert_bitwise_equal(out, ref, "traced output")
    leaves = (x, model.fc.weight)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert_bitwise_equal(a, b, "traced gradient")


@pytest.mark.parametrize("train", [False, True])
def test_exported_converted_block_runs_under_autocast(train):
    """A converted block exported without autocast and run under it: the main path comes out bf16 while
    the identity stays float32, and add_relu_ (function or op) adds in place as eager's ``out += identity``
    does, rounding once; the GEMM tails cast their inputs."""
    import copy

    from torchvision.models.resnet import BasicBlock

    z, s = torch.randn(64).bfloat16(), torch.randn(64)
    expected = z.clone()
    expected += s
    expected.relu_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_bitwise_equal(fr.add_relu_(z.clone(), s), expected, "function")
        via_op = z.clone()
        torch.ops.fused_residual.add_relu_(via_op, s)
        assert_bitwise_equal(via_op, expected, "op")
    block = BasicBlock(8, 8).train(train)
    x = torch.randn(2, 8, 8, 8)
    fused = torch.export.export(fr.convert(copy.deepcopy(block)), (x,)).module()
    plain = torch.export.export(copy.deepcopy(block), (x,)).module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fused(x), plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    if train:  # unfused tail, the same arithmetic as eager
        assert_bitwise_equal(out, ref, "train")
    else:  # BN folded into the convolutions
        assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < 2e-2


def test_inplace_under_autocast_keeps_the_shape_and_device_checks():
    """Under autocast add_relu_ accepts a shortcut of another floating dtype, and nothing more: no
    broadcasting, no other device, no unsupported dtype (function and op alike)."""
    z = torch.randn(4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for call in (fr.add_relu_, torch.ops.fused_residual.add_relu_):
            with pytest.raises(ValueError, match=r"shapes differ.*\(4, 4\).*\(4,\)"):
                call(z.clone(), torch.randn(4))
            with pytest.raises(TypeError, match="float64"):
                call(z.clone(), torch.randn(4, 4, dtype=torch.float64))
            with pytest.raises(ValueError, match="devices differ"):
                call(z.clone(), torch.randn(4, 4, device="meta"))
