"""GEMM + bias + residual + ReLU ops: accuracy against fp64 (forward and every gradient), layouts, the ReLU
kink, determinism, bad input and torch.compile."""

import contextlib

import pytest
import torch

import fused_residual as fr
from fused_residual import reference
from fused_residual import _alloc
from fused_residual.ops import _gemm_layout, _gemm_library, _gemm_triton
from fused_residual import verify
from cases import DTYPES, GEMM_CASES, device_backend_params, device_params
from helpers import assert_bitwise_equal, assert_close_to_ref, poisoned

CASES = GEMM_CASES


def _build(case, dtype, device):
    return CASES[case][1](dtype, device)


def _grads(args):
    return [a.grad for a in args if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_accuracy_forward_and_gradients(device, backend, dtype, case):
    """Forward and every gradient within the accuracy rule of float64 (fused_residual.verify's check)."""
    checks = verify.check_gemm(case, dtype, device, backend)
    n_tensors = sum(isinstance(a, torch.Tensor) for a in _build(case, dtype, device))
    assert len(checks) == 1 + n_tensors, [c.what for c in checks]
    failed = [f"{c.what}: error {c.error:.3g}, eager {c.eager_error}" for c in checks if not c.ok]
    assert not failed, failed


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_no_gradient_where_pre_activation_is_exactly_zero(device, backend):
    x = torch.randn(6, 8, device=device)
    x[2] = 0.0  # row 2: x @ W.T = 0 exactly; with residual 0 and bias 0 the pre-activation is exactly 0
    w = torch.randn(5, 8, device=device)
    r = torch.randn(6, 5, device=device)
    r[2] = 0.0
    b = torch.zeros(5, device=device)
    x, w, r, b = (t.requires_grad_() for t in (x, w, r, b))
    with fr.use_backend(backend):
        out = fr.linear_add_relu(x, w, r, b)
    assert torch.equal(out[2].detach(), torch.zeros(5, device=device))
    out.backward(torch.ones_like(out))
    assert torch.equal(r.grad[2], torch.zeros(5, device=device))
    assert torch.equal(x.grad[2], torch.zeros(8, device=device))
    expected_b = (out.detach() > 0).sum(0).to(b.grad.dtype)
    assert torch.equal(b.grad, expected_b)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_bias_gradient_is_deterministic(device, backend):
    x = torch.randn(300, 33, device=device, dtype=torch.float16)
    w = torch.randn(70, 33, device=device, dtype=torch.float16) / 6
    r = torch.randn(300, 70, device=device, dtype=torch.float16)
    g = torch.randn(300, 70, device=device, dtype=torch.float16)
    grads = []
    for _ in range(3):
        b = torch.randn(70, device=device, dtype=torch.float16).mul_(0).requires_grad_()
        with fr.use_backend(backend):
            fr.linear_add_relu(x, w, r, b).backward(g)
        grads.append(b.grad)
    assert all(torch.equal(grads[0], gb) for gb in grads[1:])


def test_conv_output_keeps_the_input_memory_format():
    w = torch.randn(8, 4, 1, 1)
    for x, cl in [(torch.randn(2, 4, 6, 6), False), (verify._cl(torch.randn(2, 4, 6, 6)), True),
                  (verify._sliced_cl(torch.randn(2, 4, 3, 3)), True)]:
        r = torch.randn(2, 8, x.shape[2], x.shape[3])
        for backend in ("cpp", "eager"):
            with fr.use_backend(backend):
                out = fr.conv1x1_add_relu(x, w, r)
            assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@pytest.mark.parametrize("dual", [False, True], ids=["linear", "dual"])
def test_cpu_row_blocks_cover_every_row(monkeypatch, dual):
    """The cpp path runs BLAS and the bias+ReLU pass in row blocks: with 64-row blocks over 203 rows (three
    full blocks and a remainder, poisoned output) every row matches the eager formula's accuracy."""
    monkeypatch.setattr(_gemm_library, "CPU_BLOCK_BYTES", 64 * 24 * 4)  # N=24 fp32 rows -> 64-row blocks
    m, k, n = 203, 40, 24
    x, w, b = torch.randn(m, k), torch.randn(n, k) / 6, torch.randn(n)
    if dual:
        args = (x, w, torch.randn(m, 16), torch.randn(n, 16) / 4, b)
        fn, ref = fr.dual_linear_add_relu, reference.dual_linear_add_relu
    else:
        args, fn, ref = (x, w, torch.randn(m, n), b), fr.linear_add_relu, reference.linear_add_relu
    with fr.use_backend("cpp"), poisoned():
        out = fn(*args)
    assert_close_to_ref(out, ref(*args), ref(*(a.double() for a in args)), "row blocks")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_zero_width_operands_match_eager(device, backend):
    """K = 0 (an empty product: relu(bias + residual)) and N = 0 (no outputs), forward and backward."""
    def run(fn, args):
        leaves = verify.leaf_copies(args)
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [leaf.grad for leaf in leaves]

    m = 5
    cases = [(fr.linear_add_relu, reference.linear_add_relu,
              (torch.randn(m, 0), torch.randn(3, 0), torch.randn(m, 3), torch.randn(3))),
             (fr.dual_linear_add_relu, reference.dual_linear_add_relu,
              (torch.randn(m, 4), torch.randn(3, 4), torch.randn(m, 0), torch.randn(3, 0), torch.randn(3))),
             (fr.linear_add_relu, reference.linear_add_relu,
              (torch.randn(m, 4), torch.randn(0, 4), torch.randn(m, 0), torch.randn(0)))]
    for fn, ref, args in cases:
        args = tuple(a.to(device) for a in args)
        with fr.use_backend(backend), poisoned():
            got = run(fn, args)
        for g, e in zip(got, run(ref, args)):
            assert g.shape == e.shape
            assert torch.allclose(g, e, atol=1e-5), (fn.__name__, [a.shape for a in args])


@contextlib.contextmanager
def _fp32_matmul_precision(matmul: str, default: str = "none"):
    """Set torch's fp32 matmul precision (torch.backends.cuda.matmul.fp32_precision, and the default it
    defers to when "none") and restore both afterwards."""
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = default
        torch.backends.cuda.matmul.fp32_precision = matmul
        yield
    finally:
        torch.backends.fp32_precision = before[1]
        torch.backends.cuda.matmul.fp32_precision = before[0]


def test_tf32_follows_torch_matmul_setting():
    """TF32 exactly where torch's own matmul would use it, set through either API (reading the legacy
    allow_tf32 flag raises once the new one has been used)."""
    cuda = torch.device("cuda")
    with _fp32_matmul_precision("none"):
        assert _gemm_layout.dot_precision(torch.float32, cuda) == "ieee"  # PyTorch's default
        before = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = True
            assert _gemm_layout.dot_precision(torch.float32, cuda) == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = False
            assert _gemm_layout.dot_precision(torch.float32, cuda) == "ieee"
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    for matmul, default, expected in (("tf32", "none", "tf32"), ("ieee", "tf32", "ieee"), ("none", "tf32", "tf32"),
                                      ("none", "ieee", "ieee")):
        with _fp32_matmul_precision(matmul, default):
            assert _gemm_layout.dot_precision(torch.float32, cuda) == expected, (matmul, default)
            assert _gemm_layout.dot_precision(torch.bfloat16, cuda) == "ieee"  # fp16/bf16 use tensor cores anyway
            assert _gemm_layout.dot_precision(torch.float32, torch.device("cpu")) == "ieee"


def test_tf32_of_convolutions_follows_cudnn_setting():
    """1x1 convolutions take cuDNN's convolution setting, as F.conv2d does (TF32 by default), whatever the
    matmul setting; linear layers keep the matmul one."""
    cuda, cudnn = torch.device("cuda"), torch.backends.cudnn
    before = torch.backends.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision
    try:
        with _fp32_matmul_precision("ieee"):
            for conv, parent, default, expected in (("tf32", "none", "none", "tf32"), ("ieee", "tf32", "tf32", "ieee"),
                                                    ("none", "tf32", "none", "tf32"), ("none", "none", "tf32", "tf32"),
                                                    ("none", "ieee", "tf32", "ieee"), ("none", "none", "none", "ieee")):
                torch.backends.fp32_precision = default
                cudnn.fp32_precision, cudnn.conv.fp32_precision = parent, conv
                assert _gemm_layout.dot_precision(torch.float32, cuda, conv=True) == expected, (conv, parent, default)
                assert _gemm_layout.dot_precision(torch.bfloat16, cuda, conv=True) == "ieee"
                assert _gemm_layout.dot_precision(torch.float32, cuda) == "ieee"  # linear: the matmul setting
    finally:
        # (not cuDNN's legacy allow_tf32: once mixed with the new settings, later reads of it raise)
        torch.backends.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision = before


@pytest.mark.cuda
def test_fp32_without_tf32_is_ieee_accurate():
    assert _gemm_layout.dot_precision(torch.float32, torch.device("cuda")) == "ieee"  # PyTorch's default
    x = torch.randn(512, 1024, device="cuda")
    w = torch.randn(256, 1024, device="cuda")
    r = torch.randn(512, 256, device="cuda")
    out = fr.linear_add_relu(x, w, r)
    ref = reference.linear_add_relu(x.double(), w.double(), r.double())
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, f"relative error {rel:.2e}: looks like TF32"


@pytest.mark.cuda
def test_int64_addressing_past_2_pow_31_elements():
    m, k, n = 2**22 + 77, 64, 512  # out and residual hold > 2**31 elements
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") / 8).to(torch.bfloat16)
    r = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    out = fr.linear_add_relu(x, w, r)
    for rows in (slice(0, 4096), slice(m - 4096, m)):
        ref = reference.linear_add_relu(x[rows].double(), w.double(), r[rows].double())
        eager = reference.linear_add_relu(x[rows], w, r[rows])
        assert_close_to_ref(out[rows], eager, ref, f"rows {rows}")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_float16_bias_before_residual_as_eager(device, backend):
    """float16: x @ W^T + residual overflows (60000 + 10000) where eager's order, bias first, stays in
    range (60000 - 10000 + 10000): the result must be finite and as accurate as eager's."""
    def h(v):
        return torch.tensor(v, dtype=torch.float16, device=device)

    x, w, r, b = h([[1.0], [0.5]]), h([[60000.0]]), h([[10000.0], [-3.0]]), h([-10000.0])
    ws = h([[10000.0]])
    cases = [("linear", fr.linear_add_relu, reference.linear_add_relu, (x, w, r, b)),
             ("dual", fr.dual_linear_add_relu, reference.dual_linear_add_relu, (x, w, x, ws, b))]
    for what, fused, ref_fn, args in cases:
        with fr.use_backend(backend):
            out = fused(*args)
        assert torch.isfinite(out).all(), (what, out)
        assert_close_to_ref(out, ref_fn(*args), ref_fn(*(a.double() for a in args)), what)


@pytest.mark.parametrize("device", device_params())
def test_int64_offsets_along_k(device):
    """An operand whose K stride is huge (an NCHW input's channel stride is H * W; here x = big.t()): the
    K offsets and the per-step advance pass 2**31 elements and must not wrap. The storage is one
    allocation (4 GiB of address space) written and read at 17 elements only."""
    from fused_residual import _triton

    if device == "cpu" and not _triton.interpreting():
        pytest.skip("the Triton kernel on CPU runs under the interpreter only")
    k, stride = 17, 2**27 + 16  # 16 * stride > 2**31, and so is one interpreter step of 16 (or 64 on GPU)
    storage = torch.empty(16 * stride + 1, dtype=torch.float16, device=device)  # empty: no page is touched
    x = storage.as_strided((1, k), (1, stride))
    values = torch.arange(1, k + 1, dtype=torch.float16, device=device) / 16
    x[0] = values
    w = torch.ones(1, k, dtype=torch.float16, device=device)
    with poisoned(), fr.use_backend("triton"):
        out = fr.linear_add_relu(x, w, torch.zeros(1, 1, dtype=torch.float16, device=device))
    assert out.item() == values.float().sum().item() == 9.5625


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_autocast_runs_in_the_autocast_dtype(device, backend):
    dtype = torch.bfloat16
    x, r = torch.randn(8, 16, device=device), torch.randn(8, 12, device=device)
    lin = torch.nn.Linear(16, 12).to(device)
    with fr.use_backend(backend), torch.autocast(device, dtype=dtype):
        out = fr.linear_add_relu(x, lin.weight, r, lin.bias)
        eager = torch.relu(lin(x) + r)
    assert out.dtype == dtype
    ref = reference.linear_add_relu(x.double(), lin.weight.double(), r.double(), lin.bias.double())
    assert_close_to_ref(out, eager.to(dtype), ref, "autocast")


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("bias_kind", ["sliced", "expanded"])
def test_bias_views_are_read_at_their_strides(device, backend, bias_kind):
    """A bias that is a strided slice or an expanded scalar: each backend reads it as eager does (the Triton
    kernel used to read bias[n] at bias_ptr + n)."""
    x, w, r = torch.randn(9, 12, device=device), torch.randn(10, 12, device=device) / 4, torch.randn(9, 10, device=device)
    b = torch.randn(20, device=device)[::2] if bias_kind == "sliced" else torch.randn(1, device=device).expand(10)
    xc = torch.randn(2, 12, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    rc = torch.randn(2, 10, 3, 3, device=device)
    with fr.use_backend(backend), poisoned():
        outs = fr.linear_add_relu(x, w, r, b), fr.conv1x1_add_relu(xc, w[..., None, None], rc, b)
    refs = reference.linear_add_relu, reference.conv1x1_add_relu
    for out, ref, args in zip(outs, refs, ((x, w, r, b), (xc, w[..., None, None], rc, b))):
        assert_close_to_ref(out, ref(*args), ref(*(a.double() for a in args)), f"{ref.__name__} {bias_kind}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", ["linear-3d-bias", "dual-linear", "conv-cl-s2"])
def test_outputs_can_be_modified_in_place(device, backend, case):
    """As with eager's outputs: in-place ops on the result work (a linear op's output used to be a view of
    its internal [M, N] matrix, which autograd refuses to let change), and a backward through the changed
    output then fails as eager's does (both keep the output for the ReLU gate)."""
    base = _build(case, torch.float32, device)
    (fn, ref, _), _, _ = CASES[case]
    for f, use in ((fn, backend), (ref, "eager")):
        args = verify.leaf_copies(base)
        with fr.use_backend(use):
            out = f(*args)
        out.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    with fr.use_backend(backend), torch.no_grad():
        out = fn(*base)
        assert not out._is_view()
        out.detach_().mul_(2)
        assert_close_to_ref(out, 2 * ref(*base), 2 * ref(*(a.double() if isinstance(a, torch.Tensor) else a
                                                              for a in base)), case)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_only_operands_a_gradient_needs_are_saved(device, backend):
    """As eager: with only the residual needing a gradient, x and the weight may change in place after the
    forward, and may be inference tensors; a frozen weight may be updated in place before backward."""
    with torch.inference_mode():
        xi, wi = torch.randn(6, 8, device=device), torch.randn(5, 8, device=device)
    x, w = torch.randn(6, 8, device=device), torch.randn(5, 8, device=device)
    r = torch.randn(6, 5, device=device, requires_grad=True)
    with fr.use_backend(backend):
        fr.linear_add_relu(xi, wi, r).sum().backward()
        out = fr.linear_add_relu(x, w, r)
        x.add_(1.0)
        w.mul_(2.0)
        out.sum().backward()
        xg = torch.randn(6, 8, device=device, requires_grad=True)
        out = fr.linear_add_relu(xg, w, r)
        xg.data.zero_()  # x's gradient needs the weight, not x
        out.sum().backward()
        xc = torch.randn(1, 8, 3, 3, device=device, requires_grad=True)
        wc = torch.randn(5, 8, 1, 1, device=device)
        out = fr.conv1x1_add_relu(xc, wc, torch.randn(1, 5, 3, 3, device=device))
        out.sum().backward()
    assert xg.grad is not None and xc.grad is not None and r.grad is not None


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", ["linear-3d-bias", "dual-linear", "conv-cl-s2", "dual-conv-s2"])
def test_double_backward_matches_eager(device, backend, case):
    """create_graph=True: the gradient's own gradient (through the masked-gradient op's autograd) as eager's.
    The output is weighted by random values that vanish near the ReLU kink, where rounding may flip the
    gate."""
    (fn, ref, weight_idx), build, _ = CASES[case]
    base = build(torch.float32, device)
    pre = verify.pre_activation(ref, weight_idx, verify.leaf_copies(base, torch.float64))
    weights = torch.where(pre.abs() < 1e-3 * max(1.0, pre.abs().max().item()), 0.0, torch.randn_like(pre)).float()

    def second_order(f, use):
        args = verify.leaf_copies(base)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        with fr.use_backend(use):
            grads = torch.autograd.grad((f(*args) * weights).sum(), tensors, create_graph=True)
            total = sum((g * g).sum() for g in grads)
            return torch.autograd.grad(total, tensors, allow_unused=True)

    got = second_order(fn, backend)
    want = second_order(ref, "eager")
    for g, e in zip(got, want):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=2e-4, atol=2e-4 * max(1.0, e.abs().max().item()))


def test_public_functions_run_on_meta_tensors():
    """Shape inference (deferred initialisation, FSDP) through the public functions and the MLP block."""
    m = dict(device="meta")
    assert fr.linear_add_relu(torch.empty(4, 8, **m), torch.empty(6, 8, **m), torch.empty(4, 6, **m)).shape == (4, 6)
    out = fr.conv1x1_add_relu(torch.empty(2, 8, 5, 5, **m), torch.empty(6, 8, 1, 1, **m), torch.empty(2, 6, 3, 3, **m),
                              stride=2)
    assert out.shape == (2, 6, 3, 3) and out.is_meta
    assert fr.nn.ResidualBlock(8, 16).to("meta")(torch.empty(3, 8, **m)).shape == (3, 16)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_registered_ops_autocast_their_inputs(device, backend):
    """The ops themselves have autocast kernels: a direct torch.ops call, or an exported program run under
    autocast, gets float32 inputs and must compute in the autocast dtype as the public functions do (the
    implementations would otherwise see a bf16 product beside a float32 residual)."""
    def t(*shape):
        return torch.randn(*shape, device=device)

    x, w, r, b = t(2, 4, 3, 3), t(5, 4, 1, 1), t(2, 5, 3, 3), t(5)
    xs, ws = t(2, 3, 5, 5), t(5, 3, 1, 1)
    lx, lw, lr = t(6, 4), t(5, 4), t(6, 5)
    ops = torch.ops.fused_residual
    cases = [("linear", ops.linear_add_relu, fr.linear_add_relu, (lx, lw, lr, b)),
             ("dual linear", ops.dual_linear_add_relu, fr.dual_linear_add_relu,
              (lx, lw, t(6, 3), t(5, 3), b)),
             ("conv", ops.conv1x1_add_relu, fr.conv1x1_add_relu, (x, w, r, b, 1)),
             ("dual conv", ops.dual_conv1x1_add_relu, fr.dual_conv1x1_add_relu, (x, w, xs, ws, b, 2))]
    for what, op, public, args in cases:
        with fr.use_backend(backend), torch.autocast(device, dtype=torch.bfloat16):
            out, expected = op(*args), public(*args)
        assert out.dtype == torch.bfloat16, what
        assert_bitwise_equal(out, expected, what)

    class Block(torch.nn.Module):
        def forward(self, x, w, r):
            return fr.conv1x1_add_relu(x, w, r)

    # The default compile policy exports the aten expression: under autocast it computes as eager does (a
    # bf16 convolution plus a float32 residual: float32). The kernels policy exports the op, whose autocast
    # kernel casts every input: bf16, as the public function under autocast.
    ref = torch.relu(torch.nn.functional.conv2d(x.double(), w.double()) + r.double())
    for policy, dtype in (("inductor", torch.float32), ("kernels", torch.bfloat16)):
        fr.set_compile_policy(policy)
        try:
            program = torch.export.export(Block(), (x, w, r))
        finally:
            fr.set_compile_policy("inductor")
        assert ("fused_residual" in str(program.graph)) == (policy == "kernels")
        with fr.use_backend(backend), torch.autocast(device, dtype=torch.bfloat16):
            out = program.module()(x, w, r)
            eager = (torch.relu(torch.nn.functional.conv2d(x, w) + r) if policy == "inductor"
                     else fr.conv1x1_add_relu(x, w, r))
        assert out.dtype == dtype, policy
        assert_close_to_ref(out, eager, ref, f"exported program under autocast ({policy} policy)")


def test_autocast_leaves_float64_alone():
    """As F.linear under autocast: float64 is not cast down (it is then refused by name, not silently run in
    bf16)."""
    x, w, r = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="float64"):
        fr.linear_add_relu(x, w, r.double())


def test_bad_input_names_the_shapes():
    x, w, r = torch.randn(4, 8), torch.randn(5, 8), torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"K=8.*\(5, 9\).*K=9"):
        fr.linear_add_relu(x, torch.randn(5, 9), r)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 6\), expected \(4, 5\)"):
        fr.linear_add_relu(x, w, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \(5,\)"):
        fr.linear_add_relu(x, w, r, torch.randn(4))
    with pytest.raises(TypeError, match="float32.*float16"):
        fr.linear_add_relu(x, w.half(), r)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got int"):
        fr.linear_add_relu(x, w, r, 3)
    with pytest.raises(TypeError, match="int64"):
        fr.linear_add_relu(x.long(), w.long(), r.long())
    with pytest.raises(ValueError, match=r"shortcut_weight \(5, 3\).*K=3|K=4.*\(5, 3\)"):
        fr.dual_linear_add_relu(x, w, torch.randn(4, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"same number of outputs"):
        fr.dual_linear_add_relu(x, w, torch.randn(4, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match=r"leading dims"):
        fr.dual_linear_add_relu(x, w, torch.randn(3, 3), torch.randn(5, 3))

    xc = torch.randn(2, 8, 7, 7)
    with pytest.raises(ValueError, match=r"1x1 convolution weight.*\(4, 8, 3, 3\)"):
        fr.conv1x1_add_relu(xc, torch.randn(4, 8, 3, 3), torch.randn(2, 4, 7, 7))
    with pytest.raises(ValueError, match=r"residual has shape \(2, 4, 7, 7\), expected \(2, 4, 4, 4\).*stride-2"):
        fr.conv1x1_add_relu(xc, torch.randn(4, 8, 1, 1), torch.randn(2, 4, 7, 7), stride=2)
    with pytest.raises(ValueError, match="stride must be a positive int, got 0"):
        fr.conv1x1_add_relu(xc, torch.randn(4, 8, 1, 1), torch.randn(2, 4, 7, 7), stride=0)
    with pytest.raises(ValueError, match=r"x \(2, 0, 7, 7\) has no input channels"):
        fr.conv1x1_add_relu(torch.randn(2, 0, 7, 7), torch.randn(4, 0, 1, 1), torch.randn(2, 4, 7, 7))
    with pytest.raises(ValueError, match=r"shortcut \(2, 0, 7, 7\) has no input channels"):
        fr.dual_conv1x1_add_relu(xc, torch.randn(4, 8, 1, 1), torch.randn(2, 0, 7, 7), torch.randn(4, 0, 1, 1))
    for stride in (2.0, (2, 2), True):  # the same error on the fast path and through torch.ops
        for plain in (True, False):
            with pytest.raises(ValueError, match=r"stride must be a positive int, got"), \
                    (contextlib.nullcontext() if plain else torch.device("cpu")):  # a mode: torch.ops path
                fr.conv1x1_add_relu(xc, torch.randn(4, 8, 1, 1), torch.randn(2, 4, 4, 4), stride=stride)
            with pytest.raises(ValueError, match=r"shortcut_stride must be a positive int, got"), \
                    (contextlib.nullcontext() if plain else torch.device("cpu")):
                fr.dual_conv1x1_add_relu(xc, torch.randn(4, 8, 1, 1), xc, torch.randn(4, 8, 1, 1),
                                         shortcut_stride=stride)
    with pytest.raises(ValueError, match=r"shortcut's stride-1 output \(2, 4, 14, 14\).*main output \(2, 4, 7, 7\)"):
        fr.dual_conv1x1_add_relu(xc, torch.randn(4, 8, 1, 1), torch.randn(2, 3, 14, 14), torch.randn(4, 3, 1, 1))


@pytest.mark.cuda
def test_device_mismatch_names_devices():
    with pytest.raises(ValueError, match="cpu.*cuda"):
        fr.linear_add_relu(torch.randn(4, 8), torch.randn(5, 8, device="cuda"), torch.randn(4, 5))


# ---- registration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", ["linear-3d-bias", "dual-linear", "conv-cl-s2", "dual-conv-s2"])
@pytest.mark.parametrize("policy", ["kernels", "inductor"])
def test_compile_fullgraph_forward_backward(device, backend, case, policy):
    """Compiled (fullgraph) calls. The kernels policy keeps the op in the graph: forward and gradients are
    the uncompiled op's. The default policy compiles the aten expression instead, which is not the fused
    kernel's rounding: there forward and gradients meet the accuracy rule against float64 (beside eager's
    float32 formula)."""
    torch._dynamo.reset()
    (fused_fn, ref_fn, _), build, _ = CASES[case]
    args = verify.leaf_copies(build(torch.float32, device))
    plain_args = verify.leaf_copies(args)
    fr.set_compile_policy(policy)
    try:
        compiled = torch.compile(lambda *a: fused_fn(*a) * 2, fullgraph=True, backend="aot_eager")
        with fr.use_backend(backend):
            out = compiled(*args)
            out.sum().backward()
    finally:
        fr.set_compile_policy("inductor")
        torch._dynamo.reset()
    if policy == "kernels":
        with fr.use_backend(backend):
            ref = fused_fn(*plain_args) * 2
            ref.sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        for g, g_ref in zip(_grads(args), _grads(plain_args)):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
        return
    args64 = verify.leaf_copies(plain_args, torch.float64)
    eager, ref64 = ref_fn(*plain_args) * 2, ref_fn(*args64) * 2
    eager.sum().backward()
    ref64.sum().backward()
    assert_close_to_ref(out, eager, ref64, f"{case} forward")
    for i, (g, g_eager, g64) in enumerate(zip(_grads(args), _grads(plain_args), _grads(args64))):
        assert_close_to_ref(g, g_eager, g64, f"{case} gradient {i}")


@pytest.mark.parametrize("dynamic", [None, True], ids=["static-first", "dynamic"])
def test_compile_with_a_changing_conv_stride(dynamic):
    """Dynamo turns an int argument symbolic once its value changes (or from the start with
    dynamic=True): the ops' shape checks take a symbolic stride."""
    torch._dynamo.reset()
    conv = torch.compile(lambda x, w, r, s: fr.conv1x1_add_relu(x, w, r, None, stride=s), fullgraph=True,
                         dynamic=dynamic)
    dual = torch.compile(lambda x, w, sc, ws, s: fr.dual_conv1x1_add_relu(x, w, sc, ws, None, shortcut_stride=s),
                         fullgraph=True, dynamic=dynamic)
    x, w, ws = torch.randn(2, 4, 8, 8), torch.randn(3, 4, 1, 1), torch.randn(3, 5, 1, 1)
    for s in (1, 2, 3):
        r, sc = torch.randn(2, 3, 7 // s + 1, 7 // s + 1), torch.randn(2, 5, 7 * s + 1, 7 * s + 1)
        torch.testing.assert_close(conv(x, w, r, s), reference.conv1x1_add_relu(x, w, r, None, s))
        torch.testing.assert_close(dual(x, w, sc, ws, s), reference.dual_conv1x1_add_relu(x, w, sc, ws, None, s))


def test_compile_inductor_linear_add_relu():
    torch._dynamo.reset()
    x, w, r, b = verify.leaf_copies(verify.linear_case((16,), 32, 24)(torch.float32, "cpu"))
    compiled = torch.compile(lambda *a: fr.linear_add_relu(*a).square(), fullgraph=True)
    out = compiled(x, w, r, b)
    out.sum().backward()
    ref = reference.linear_add_relu(x.detach(), w.detach(), r.detach(), b.detach()).square()
    assert torch.allclose(out.detach(), ref, atol=1e-5, rtol=1e-5)
    assert x.grad is not None and w.grad is not None and b.grad is not None


# ---- the library path (vendor product + fused add+ReLU pass) --------------------------------------------


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_library_path_accuracy(device, backend, dtype, case):
    with _gemm_library.use_gemm_path("library"):
        checks = verify.check_gemm(case, dtype, device, backend)
    failed = [f"{c.what}: error {c.error:.3g}, eager {c.eager_error}" for c in checks if not c.ok]
    assert not failed, failed


def test_gemm_path_follows_arithmetic_intensity(monkeypatch):
    monkeypatch.delenv("FUSED_RESIDUAL_GEMM_PATH", raising=False)

    def path(m, n, k):  # bf16, as the intensities in gemm_add_relu.py are counted
        meta = dict(device="meta", dtype=torch.bfloat16)
        x, w, out = torch.empty(m, k, **meta), torch.empty(n, k, **meta), torch.empty(m, n, **meta)
        return _gemm_library.gemm_path([_gemm_layout.Operand(x, w)], out, out)

    assert path(802816, 256, 64) == "triton"  # a ResNet shortcut: memory-bound
    assert path(50176, 1024, 512) == "triton"  # ResNet-50 layer-3 shortcut, 204 FLOP/B
    assert path(12544, 2048, 1024) == "library"  # 397 FLOP/B
    assert path(8192, 8192, 8192) == "library"  # compute-bound
    x = w = out = torch.empty(8192, 8192, device="meta", dtype=torch.bfloat16)
    assert _gemm_library.gemm_path([_gemm_layout.Operand(x, w), _gemm_layout.Operand(x, w)], None, out) == "triton"  # dual
    with _gemm_library.use_gemm_path("triton"):
        assert path(8192, 8192, 8192) == "triton"
    monkeypatch.setenv("FUSED_RESIDUAL_GEMM_PATH", "library")
    assert path(802816, 256, 64) == "library"
    monkeypatch.setenv("FUSED_RESIDUAL_GEMM_PATH", "cublas")
    with pytest.raises(ValueError, match="'cublas'"):
        path(8, 8, 8)
    with pytest.raises(ValueError, match="'fast'"):
        with _gemm_library.use_gemm_path("fast"):
            pass


# ---- the Triton kernel's configs --------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "triton"])
@pytest.mark.parametrize("tile", [(64, 64, 32), (32, 64, 16), (64, 32, 64)], ids=str)
@pytest.mark.parametrize("persistent", [0, 1, 3], ids=lambda p: f"persistent{p}")
@pytest.mark.parametrize("dual", [False, True], ids=["single", "dual"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_forced_config_covers_every_tile(device, backend, tile, persistent, dual, split):
    """The kernel launched with a given config (as benchmarks/sweep_gemm.py does) over M, N, K that no
    tile divides, one or two products, one program per tile or persistent programs stepping through the
    tiles (2 SMs under the interpreter: several tiles each), the epilogue whole or in two halves, poisoned
    output: within the accuracy rule."""
    from fused_residual import _triton

    bm, bn, bk = tile
    config = _triton.kernels("gemm_add_relu").make_config(bm, bn, bk, 2, 4, group=2, persistent=persistent,
                                                          split=split)
    m, n, k1, k2 = 3 * bm + 5, 2 * bn + 3, bk + 7, 2 * bk + 1
    x, s, b = torch.randn(m, k1, device=device), torch.randn(m, k2, device=device), torch.randn(n, device=device)
    w, ws = torch.randn(n, k1, device=device) / 6, torch.randn(n, k2, device=device) / 6
    with poisoned():
        out = _alloc.empty((m, n), x)
    if dual:
        args, ref = (x, w, s, ws, b), reference.dual_linear_add_relu
        _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w), _gemm_layout.Operand(s, ws)], b, None, out, config=config)
    else:
        r = torch.randn(m, n, device=device)
        args, ref = (x, w, r, b), reference.linear_add_relu
        _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w)], b, r, out, config=config)
    assert_close_to_ref(out, ref(*args), ref(*(a.double() for a in args)), f"tile {tile}")


def _aligned_rows(rows: int, cols: int, dtype, device, scale: float = 1.0) -> torch.Tensor:
    """A rows x cols view whose rows start 16 bytes apart or a multiple of it (TMA's requirement) while
    ``cols`` need not be a multiple of 8: a slice of wider random storage."""
    wide = cols + 8 + (-cols % 8)
    return (torch.randn(rows, wide, device=device) * scale).to(dtype)[:, :cols]


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] == "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("persistent", [0, 1], ids=lambda p: f"persistent{p}")
@pytest.mark.parametrize("form", ["single", "dual", "conv-nhwc"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_tma_configs_at_the_edges(device, backend, dtype, persistent, form, split):
    """TMA configs over M, N, K that no tile divides, on tensors whose rows are padded: the descriptors'
    zero fill past each matrix's edge must not leak into the products, their clipped stores must leave
    the output's padding alone (poisoned here), and the result must meet the accuracy rule."""
    from fused_residual import _triton

    config = _triton.kernels("gemm_add_relu").make_config(32, 32, 16, 2, 4, group=2, persistent=persistent,
                                                          split=split, tma=True)
    m, n, k1, k2 = 3 * 32 + 5, 2 * 32 + 3, 16 + 7, 2 * 16 + 1
    x, s = _aligned_rows(m, k1, dtype, device), _aligned_rows(m, k2, dtype, device)
    w, ws = _aligned_rows(n, k1, dtype, device, 1 / 6), _aligned_rows(n, k2, dtype, device, 1 / 6)
    r, b = _aligned_rows(m, n, dtype, device), torch.randn(n, device=device).to(dtype)
    storage = torch.full((m, n + 5), float("nan"), device=device, dtype=dtype)
    out = storage[:, :n]
    if form == "dual":
        operands, residual = [_gemm_layout.Operand(x, w), _gemm_layout.Operand(s, ws)], None
        args, ref = (x, w, s, ws, b), reference.dual_linear_add_relu
    elif form == "single":
        operands, residual = [_gemm_layout.Operand(x, w)], r
        args, ref = (x, w, r, b), reference.linear_add_relu
    else:  # dense NHWC 1x1 convolution: 101 pixels as 1 x 1 x 101 images; rows are pixels, padded
        nhwc = lambda t: t.unsqueeze(0).unsqueeze(0).permute(0, 3, 1, 2)  # [1, C, 1, P], channels last
        out, x4, r4 = nhwc(out), nhwc(x), nhwc(r)
        operands, residual = [_gemm_layout.Operand(x4, w.unsqueeze(-1).unsqueeze(-1))], r4
        args, ref = (x4, w.unsqueeze(-1).unsqueeze(-1), r4, b), reference.conv1x1_add_relu
    assert _gemm_triton.tma_descriptors(operands, residual, out, flat=True) is not None
    _gemm_triton.triton_gemm(operands, b, residual, out, config=config)
    assert storage[:, n:].isnan().all(), "a TMA store wrote past the output's edge"
    assert_close_to_ref(out, ref(*args), ref(*(a.double() for a in args)), f"{form} {config}")


def test_tma_applies_to_aligned_16_bit_matrices_only():
    """Descriptors exist exactly where TMA can address every tensor; elsewhere the launcher passes None
    (the autotuner then prunes the TMA configs) and a forced TMA config is refused by name."""
    from fused_residual import _triton

    def descs(x, w, r, out=None, flat=True):
        out = torch.empty(r.shape, dtype=r.dtype) if out is None else out
        return _gemm_triton.tma_descriptors([_gemm_layout.Operand(x, w)], r, out, flat)

    bf = dict(dtype=torch.bfloat16)
    x, w, r = torch.randn(40, 64, **bf), torch.randn(24, 64, **bf), torch.randn(40, 24, **bf)
    found = descs(x, w, r)
    assert found is not None and len(found) == 6 and found[2] is None and found[3] is None
    assert [d.shape for d in found if d is not None] == [[40, 64], [24, 64], [40, 24], [40, 24]]
    assert descs(x.float(), w.float(), r.float()) is None  # fp32: the TF32 / IEEE lists have no TMA configs
    assert descs(x, w, r, flat=False) is None  # pixel rows not evenly laid out (strided convolutions)
    assert descs(x[:, :60], w[:, :60], r) is not None  # sliced K: rows still 128 bytes apart
    assert descs(x[:, :7].contiguous(), w[:, :7].contiguous(), r) is None  # rows 14 bytes apart
    assert descs(x[:, 1:], w[:, 1:], r) is None  # data starts 2 bytes past an alignment boundary
    assert descs(x.t().contiguous().t(), w, r) is None  # K not the adjacent dimension
    assert descs(x, w, r, out=torch.empty(40, 25, **bf)[:, :24]) is None  # output rows 50 bytes apart
    cfg = _triton.kernels("gemm_add_relu").make_config(32, 32, 16, 2, 4, tma=True)
    with pytest.raises(ValueError, match="TMA"):
        _gemm_triton.triton_gemm([_gemm_layout.Operand(x[:, 1:], w[:, 1:])], None, r, torch.empty(40, 24, **bf),
                              config=cfg)


def _stand_in_tuner(monkeypatch, configs, bench):
    """An autotuner over ``configs`` in place of the 16-bit one, with ``bench(config)`` standing in for the
    timing (nothing runs while "timing"), and the compiled-kernel code path of the launcher taken with fp16
    tensors under the interpreter. Returns the tuner."""
    from fused_residual import _triton

    if not _triton.interpreting():
        pytest.skip("drives the autotuner under the Triton interpreter")
    gemm_kernels = _triton.kernels("gemm_add_relu")
    tuner = gemm_kernels._autotuned(configs)
    monkeypatch.setattr(tuner, "_bench", lambda *args, config, **meta: bench(config))
    monkeypatch.setitem(gemm_kernels.AUTOTUNED, "16-bit", tuner)
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    monkeypatch.setattr(_gemm_triton, "_CHOICES", {})
    return tuner


@pytest.mark.parametrize("winner", ["tma", "pointers"])
def test_autotuned_launch_builds_descriptors_only_while_tma_may_run(monkeypatch, winner):
    """The autotuned path (driven here under the interpreter with a stand-in for the timing): descriptors
    are built while the TMA configs are candidates, the chosen config runs correctly, and once a pointer
    config has won for a problem its later calls skip building descriptors. Tensors TMA cannot address
    never have the TMA configs timed."""
    from fused_residual import _triton

    gemm_kernels = _triton.kernels("gemm_add_relu")
    timed = []

    def fake_bench(config):  # the winner is the fastest
        timed.append(config.kwargs["TMA"])
        return [1.0 if config.kwargs["TMA"] == (winner == "tma") else 2.0] * 3

    tuner = _stand_in_tuner(monkeypatch, [gemm_kernels.make_config(32, 32, 16, 2, 4, group=2),
                                          gemm_kernels.make_config(32, 32, 16, 2, 4, group=2, split=True, tma=True)], fake_bench)
    monkeypatch.setattr(_gemm_triton, "_TUNED_WITHOUT_TMA", set())
    monkeypatch.setenv("FUSED_RESIDUAL_GEMM_TMA", "1")
    built = []
    real = _gemm_triton.tma_descriptors
    monkeypatch.setattr(_gemm_triton, "tma_descriptors", lambda *a: built.append(real(*a)) or built[-1])
    m, n, k = 70, 48, 40
    x, w = torch.randn(m, k).half(), (torch.randn(n, k) / 6).half()
    r, b = torch.randn(m, n).half(), torch.randn(n).half()
    for call in range(3):
        with poisoned():
            out = _alloc.empty((m, n), x)
        _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w)], b, r, out)
        args = (x, w, r, b)
        assert_close_to_ref(out, reference.linear_add_relu(*args),
                            reference.linear_add_relu(*(a.double() for a in args)), f"call {call}")
    assert sorted(timed) == [False, True]  # tuned once, both candidates
    assert gemm_kernels.last_launched_config()["TMA"] == (winner == "tma")
    assert len(built) == (3 if winner == "tma" else 1) and all(d is not None for d in built)
    assert len(_gemm_triton._TUNED_WITHOUT_TMA) == (winner == "pointers")
    # Rows 2 bytes off alignment, same problem size: after a TMA win, no descriptors, so a separate tuning
    # (autotuner key TMA_READY false) among the pointer configs only; after a pointer win, the same key.
    timed.clear()
    xs = torch.randn(m, k + 1).half()[:, 1:]
    _gemm_triton.triton_gemm([_gemm_layout.Operand(xs, w)], b, r, out)
    if winner == "tma":
        assert built[-1] is None and len(built) == 4 and True not in timed
    else:
        assert len(built) == 1 and timed == []
    args = (xs, w, r, b)
    assert_close_to_ref(out, reference.linear_add_relu(*args), reference.linear_add_relu(*(a.double() for a in args)))


def test_autotuned_launch_reads_its_own_choice_when_threads_race(monkeypatch):
    """A launch's pre-launch hook records the config it ran, which the launcher reads after the launch as
    the tuned choice (and, for a TMA problem, whether TMA won). Another thread's launch (another problem, where a pointer config wins) forced in between those two steps must
    wait, or the TMA problem would be recorded as tuned without TMA and later run a TMA config without
    descriptors."""
    import threading

    from fused_residual import _triton

    gemm_kernels = _triton.kernels("gemm_add_relu")
    tuner = _stand_in_tuner(monkeypatch, [gemm_kernels.make_config(32, 32, 16, 2, 4, group=2),
                                          gemm_kernels.make_config(32, 32, 16, 2, 4, group=2, split=True, tma=True)],
                            lambda config: [1.0 if config.kwargs["TMA"] else 2.0] * 3)
    monkeypatch.setattr(_gemm_triton, "_TUNED_WITHOUT_TMA", set())
    monkeypatch.setenv("FUSED_RESIDUAL_GEMM_TMA", "1")
    m, n, k = 48, 32, 32
    x, w, r = torch.randn(m, k).half(), (torch.randn(n, k) / 6).half(), torch.randn(m, n).half()
    xs = torch.randn(m, k + 1).half()[:, 1:]  # rows off 16-byte alignment: pointer configs only
    out, out_other = torch.empty(m, n).half(), torch.empty(m, n).half()
    other = threading.Thread(target=_gemm_triton.triton_gemm, args=([_gemm_layout.Operand(xs, w)], None, r, out_other))
    real_run, waited = tuner.run, []

    def run_then_race(*args, **kwargs):
        result = real_run(*args, **kwargs)
        if not other.is_alive() and not waited:  # the first launch: the other thread launches now
            other.start()
            other.join(timeout=1.0)
            waited.append(other.is_alive())  # still waiting for this launch's choice to be read
        return result

    monkeypatch.setattr(tuner, "run", run_then_race)
    _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w)], None, r, out)
    other.join()
    assert waited == [True]
    assert not _gemm_triton._TUNED_WITHOUT_TMA  # the problem whose choice was read chose TMA
    for o, a in ((out, x), (out_other, xs)):
        assert_close_to_ref(o, reference.linear_add_relu(a, w, r),
                            reference.linear_add_relu(a.double(), w.double(), r.double()))


def test_tma_configs_are_opt_in_for_the_autotuner(monkeypatch):
    """Until measured on a GPU the autotuner tries TMA configs only with FUSED_RESIDUAL_GEMM_TMA=1 (no
    descriptors are built otherwise); another value is an error that names it."""
    from fused_residual import _triton

    gemm_kernels = _triton.kernels("gemm_add_relu")
    timed = []
    tuner = _stand_in_tuner(monkeypatch, [gemm_kernels.make_config(32, 32, 16, 2, 4, group=2),
                                          gemm_kernels.make_config(32, 32, 16, 2, 4, tma=True)],
                            lambda config: timed.append(config.kwargs["TMA"]) or [1.0] * 3)
    monkeypatch.setattr(_gemm_triton, "tma_descriptors", lambda *a: pytest.fail("descriptors built"))
    monkeypatch.delenv("FUSED_RESIDUAL_GEMM_TMA", raising=False)
    x, w, r = torch.randn(64, 32).half(), torch.randn(32, 32).half(), torch.randn(64, 32).half()
    out = torch.empty(64, 32).half()
    _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w)], None, r, out)
    assert True not in timed and not gemm_kernels.last_launched_config()["TMA"]
    assert_close_to_ref(out, reference.linear_add_relu(x, w, r), reference.linear_add_relu(x.double(), w.double(),
                                                                                         r.double()))
    monkeypatch.setenv("FUSED_RESIDUAL_GEMM_TMA", "yes")
    with pytest.raises(ValueError, match="FUSED_RESIDUAL_GEMM_TMA"):
        _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w)], None, r, out)


def test_autotune_choices_lists_each_tuned_key(monkeypatch):
    """autotune_choices lists, from the launcher's own record (the configs' pre-launch hook), each problem
    tuned in this process and the config that won it; a problem tuned once is listed once."""
    from fused_residual import _triton

    gemm_kernels = _triton.kernels("gemm_add_relu")
    _stand_in_tuner(monkeypatch, [gemm_kernels.make_config(32, 32, 16, 2, 4, group=2),
                                  gemm_kernels.make_config(64, 32, 16, 3, 4, group=2)],
                    lambda config: [1.0 if config.kwargs["BLOCK_M"] == 64 else 2.0] * 3)
    assert _gemm_triton.autotune_choices() == []
    n, k = 48, 40
    w = (torch.randn(n, k) / 6).half()
    for m in (70, 100, 300):  # row-count classes 128, 128, 512
        x, r = torch.randn(m, k).half(), torch.randn(m, n).half()
        _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w)], None, r, torch.empty(m, n).half())
    lines = _gemm_triton.autotune_choices()
    assert len(lines) == 2
    assert lines[0].startswith(f"16-bit configs: key (128, {n}, {k}, 0,") and lines[1].startswith(
        f"16-bit configs: key (512, {n}, {k}, 0,")
    assert all("'BLOCK_M': 64" in line and "'num_stages': 3" in line and "'TMA': False" in line for line in lines)


def test_config_sets_follow_operand_size_and_precision():
    from fused_residual import _triton

    gemm_kernels = _triton.kernels("gemm_add_relu")
    assert gemm_kernels.config_set(2, "ieee") == "16-bit"
    assert gemm_kernels.config_set(4, "tf32") == "tf32"
    assert gemm_kernels.config_set(4, "ieee") == "ieee fp32"
    # TF32 tiles: the 16-bit tiles with half as deep K steps (fp32 operands take twice the shared memory)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 2 * c.kwargs["BLOCK_K"]) for c in gemm_kernels.TF32_CONFIGS] == \
        [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in gemm_kernels.CONFIGS
         if not (c.kwargs["PERSISTENT"] or c.kwargs["TMA"]) and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    # TMA configs only where the operands are 16-bit; every config has the pre-launch hook
    assert any(c.kwargs["TMA"] for c in gemm_kernels.CONFIGS)
    assert not any(c.kwargs["TMA"] for name in ("tf32", "ieee fp32") for c in gemm_kernels.CONFIG_SETS[name])
    assert all(c.pre_hook is gemm_kernels.before_launch
               for configs in gemm_kernels.CONFIG_SETS.values() for c in configs)


def test_hopper_only_configs_are_pruned_before_sm90(monkeypatch):
    from fused_residual import _triton

    gemm_kernels = _triton.kernels("gemm_add_relu")
    persistent = [c for c in gemm_kernels.CONFIGS if c.kwargs["PERSISTENT"]]
    wide = [c for c in gemm_kernels.CONFIGS if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128]
    tma = [c for c in gemm_kernels.CONFIGS if c.kwargs["TMA"]]
    hopper = {id(c) for c in persistent + wide + tma}
    assert persistent and wide and tma
    assert all(gemm_kernels.runs_on(c, (9, 0)) and not gemm_kernels.runs_on(c, (8, 6)) and not gemm_kernels.runs_on(c, (8, 0))
               for c in persistent + wide + tma)
    assert sum(gemm_kernels.runs_on(c, (8, 0)) for c in gemm_kernels.CONFIGS) == len(gemm_kernels.CONFIGS) - len(hopper) > 0
    args = {"M": 100000, "M_CLASS": 131072, "N": 256, "K1": 64, "K2": 0, "out_ptr": torch.empty(1, device="meta"),
            "TMA_READY": True}
    for cap, expect in (((8, 0), False), ((9, 0), True)):
        monkeypatch.setattr(gemm_kernels, "_capability", lambda t, cap=cap: cap)
        kept = gemm_kernels.prune_configs(gemm_kernels.CONFIGS, args)
        assert kept and any(c.kwargs["PERSISTENT"] for c in kept) == expect, cap
        assert any(c.kwargs["TMA"] for c in kept) == expect, cap
    # without descriptors (fp32, misaligned rows, strided convolutions) no TMA config is tried
    args["TMA_READY"] = False
    kept = gemm_kernels.prune_configs(gemm_kernels.CONFIGS, args)
    assert kept and not any(c.kwargs["TMA"] for c in kept) and any(c.kwargs["PERSISTENT"] for c in kept)
    args.update(M=8, N=8, K1=8)  # smaller than every tile: the smallest usable config
    monkeypatch.setattr(gemm_kernels, "_capability", lambda t: (8, 0))
    (only,) = gemm_kernels.prune_configs(gemm_kernels.CONFIGS, args)
    assert not only.kwargs["PERSISTENT"] and only.kwargs["BLOCK_M"] * only.kwargs["BLOCK_N"] == 64 * 64


def _all_configs():
    from fused_residual import _triton

    if not _triton.status()[0]:
        return []
    gemm_kernels = _triton.kernels("gemm_add_relu")
    return [pytest.param(name, i, id=f"{name}-{i}") for name, configs in gemm_kernels.CONFIG_SETS.items()
            for i in range(len(configs))]


@pytest.mark.cuda
@pytest.mark.parametrize("dual", [False, True], ids=["single", "dual"])
@pytest.mark.parametrize("config_set,index", _all_configs())
def test_every_shipped_config_is_accurate_on_cuda(config_set, index, dual):
    """The CUDA test run pins the first config (FUSED_RESIDUAL_GEMM_AUTOTUNE=0); the autotuner may pick any
    other, so each one runs here on a shape that no tile divides, within the accuracy rule."""
    from fused_residual import _triton

    gemm_kernels = _triton.kernels("gemm_add_relu")
    config = gemm_kernels.CONFIG_SETS[config_set][index]
    if not gemm_kernels.runs_on(config, torch.cuda.get_device_capability()):
        pytest.skip(f"{config} is not used on this GPU")
    dtype = torch.bfloat16 if config_set == "16-bit" else torch.float32
    precision = {"16-bit": "ieee", "tf32": "tf32", "ieee fp32": "ieee"}[config_set]
    m, n, k1, k2 = 1000, 300, 200, 72
    dev = "cuda"
    # rows 16-byte aligned (padded where N is not a multiple of 8), so that the TMA configs apply too
    x, s = torch.randn(m, k1, device=dev, dtype=dtype), torch.randn(m, k2, device=dev, dtype=dtype)
    w = (torch.randn(n, k1, device=dev) / 14).to(dtype)
    ws = (torch.randn(n, k2, device=dev) / 9).to(dtype)
    r, b = _aligned_rows(m, n, dtype, dev), torch.randn(n, device=dev, dtype=dtype)
    with _fp32_matmul_precision(precision):
        assert _gemm_layout.dot_precision(dtype, torch.device(dev)) == precision
        storage = torch.full((m, n + 4), float("nan"), device=dev, dtype=dtype)
        out = storage[:, :n]
        if dual:
            args, ref = (x, w, s, ws, b), reference.dual_linear_add_relu
            _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w), _gemm_layout.Operand(s, ws)], b, None, out, config=config)
        else:
            args, ref = (x, w, r, b), reference.linear_add_relu
            _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w)], b, r, out, config=config)
        torch.cuda.synchronize()
        assert storage[:, n:].isnan().all(), "stored past the output's edge"
        assert_close_to_ref(out, ref(*args), ref(*(a.double() for a in args)), f"{config_set} {config}")


def test_pixel_stride_recognises_evenly_laid_out_pixels():
    """Rows addressed with one multiply only where that gives every pixel's true offset."""
    def strides(t):  # (images, OH, OW, img, h, w strides) of an NCHW-shaped tensor
        return t.shape[0], t.shape[2], t.shape[3], t.stride(0), t.stride(2), t.stride(3)

    x = torch.empty(4, 8, 5, 6)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert _gemm_layout.pixel_stride(*strides(cl)) == 8  # dense NHWC: pixels 8 channels apart
    assert _gemm_layout.pixel_stride(*strides(x)) is None  # NCHW: images are C*H*W apart, pixels 1
    assert _gemm_layout.pixel_stride(*strides(x[:, :1])) is None  # one channel of an NCHW tensor: image gap
    assert _gemm_layout.pixel_stride(*strides(torch.empty(4, 1, 5, 6))) == 1  # NCHW with one channel
    assert _gemm_layout.pixel_stride(*strides(cl[:, :, ::2, ::2])) is None  # a stride-2 view
    assert _gemm_layout.pixel_stride(*strides(cl[:, :4])) == 8  # channel slice of NHWC: still even
    assert _gemm_layout.pixel_stride(*strides(cl[:1])) == 8  # a single image
    assert _gemm_layout.pixel_stride(*strides(cl[:, :, :, :1])) == 48  # one column: pixels one H row apart
    assert _gemm_layout.pixel_stride(*strides(cl[:, :, :, :3])) is None  # part of each H row
    assert _gemm_layout.pixel_stride(1, 1, 1, 0, 0, 0) == 0  # one pixel: any stride works
    m = torch.empty(10, 7)
    assert _gemm_layout.pixel_stride(10, 1, 1, m.stride(0), 0, 0) == 7  # a [M, N] matrix
    for t in (cl, x, cl[:, :, ::2, ::2], cl[:, :4], torch.empty(4, 1, 5, 6), cl[:, :, :, :1], cl[:1]):
        images, oh, ow, si, sh, sw = strides(t)
        p = _gemm_layout.pixel_stride(images, oh, ow, si, sh, sw)
        if p is not None:  # the claim itself, pixel by pixel
            for img in range(images):
                for h in range(oh):
                    for w in range(ow):
                        assert img * si + h * sh + w * sw == ((img * oh + h) * ow + w) * p


def test_autotuner_keys_on_the_row_count_class(monkeypatch):
    """The autotuner keys on M's class (the next power of two): row counts of one class are tuned once and
    run the config chosen for the class; another class is tuned anew; the configs the pruning keeps depend
    on the class alone (driven under the interpreter with a stand-in for the timing)."""
    from fused_residual import _triton

    gemm_kernels = _triton.kernels("gemm_add_relu")
    assert [gemm_kernels.m_class(m) for m in (1, 33, 64, 65, 802816)] == [1, 64, 64, 128, 1048576]
    timed = []

    def fake_bench(config):  # the 64-row tile wins
        timed.append(config.kwargs["BLOCK_M"])
        return [1.0 if config.kwargs["BLOCK_M"] == 64 else 2.0] * 3

    configs = [gemm_kernels.make_config(32, 32, 16, 2, 4, group=2), gemm_kernels.make_config(64, 32, 16, 2, 4, group=2)]
    tuner = _stand_in_tuner(monkeypatch, configs, fake_bench)
    n, k = 48, 40
    w, b = (torch.randn(n, k) / 6).half(), torch.randn(n).half()
    for m, tuned in ((70, [32, 64]), (100, []), (128, []), (129, [32, 64]), (200, [])):
        timed.clear()
        x, r = torch.randn(m, k).half(), torch.randn(m, n).half()
        with poisoned():
            out = _alloc.empty((m, n), x)
        _gemm_triton.triton_gemm([_gemm_layout.Operand(x, w)], b, r, out)
        assert sorted(timed) == tuned, m
        assert gemm_kernels.last_launched_config()["BLOCK_M"] == 64
        args = (x, w, r, b)
        assert_close_to_ref(out, reference.linear_add_relu(*args),
                            reference.linear_add_relu(*(a.double() for a in args)), f"M={m}")
    assert len(_gemm_triton.autotune_choices()) == 2  # tuned once per class
    named = dict(N=n, K1=k, K2=0, out_ptr=torch.empty(1), TMA_READY=False)
    kept = {m: gemm_kernels.prune_configs(gemm_kernels.CONFIGS, dict(named, M=m, M_CLASS=gemm_kernels.m_class(m))) for m in (65, 100, 128)}
    assert kept[65] == kept[100] == kept[128]
