"""GEMM + bias + residual + ReLU ops: accuracy against fp64 (forward and every gradient), layouts, the ReLU
kink, determinism, bad input, opcheck and torch.compile."""

import pytest
import torch

import fused_residual as fr
from fused_residual import reference
from fused_residual.ops import gemm_add_relu as gemm_ops
from fused_residual import verify
from helpers import DTYPES, assert_close_to_ref, device_backend_params, poisoned

CASES = verify.GEMM_CASES


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
    monkeypatch.setattr(gemm_ops, "CPU_BLOCK_BYTES", 64 * 24 * 4)  # N=24 fp32 rows -> 64-row blocks
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


def test_tf32_follows_torch_matmul_setting():
    cuda = torch.device("cuda")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert gemm_ops.dot_precision(torch.float32, cuda) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert gemm_ops.dot_precision(torch.float32, cuda) == "tf32"
        assert gemm_ops.dot_precision(torch.bfloat16, cuda) == "ieee"  # fp16/bf16 use tensor cores anyway
        assert gemm_ops.dot_precision(torch.float32, torch.device("cpu")) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.cuda
def test_fp32_without_tf32_is_ieee_accurate():
    assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's default
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
    with pytest.raises(ValueError, match=r"shortcut's stride-1 output \(2, 4, 14, 14\).*main output \(2, 4, 7, 7\)"):
        fr.dual_conv1x1_add_relu(xc, torch.randn(4, 8, 1, 1), torch.randn(2, 3, 14, 14), torch.randn(4, 3, 1, 1))


@pytest.mark.cuda
def test_device_mismatch_names_devices():
    with pytest.raises(ValueError, match="cpu.*cuda"):
        fr.linear_add_relu(torch.randn(4, 8), torch.randn(5, 8, device="cuda"), torch.randn(4, 5))


# ---- registration ----------------------------------------------------------------------------------------


def _op_samples(device):
    ops = torch.ops.fused_residual
    samples = []
    for name, ((fused_fn, _, _), build, _) in CASES.items():
        op = getattr(ops, fused_fn.__name__).default
        samples.append((op, tuple(verify.leaf_copies(build(torch.float32, device)))))
    g, o = torch.randn(6, 10, device=device), torch.randn(6, 10, device=device)
    samples.append((ops.relu_grad_colsum.default, (g, o, True)))
    g4, o4 = torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 3, 4, 5, device=device)
    samples.append((ops.relu_grad_colsum.default, (g4, o4, False)))
    return samples


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_opcheck(device, backend):
    with fr.use_backend(backend):
        for op, args in _op_samples(device):
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", ["linear-3d-bias", "dual-linear", "conv-cl-s2", "dual-conv-s2"])
def test_compile_fullgraph_forward_backward(device, backend, case):
    """Compiled (fullgraph) and uncompiled calls of the op give the same forward and gradients."""
    torch._dynamo.reset()
    (fused_fn, _, _), build, _ = CASES[case]
    args = verify.leaf_copies(build(torch.float32, device))
    plain_args = verify.leaf_copies(args)
    compiled = torch.compile(lambda *a: fused_fn(*a) * 2, fullgraph=True, backend="aot_eager")
    with fr.use_backend(backend):
        out = compiled(*args)
        out.sum().backward()
        ref = fused_fn(*plain_args) * 2
        ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, g_ref in zip(_grads(args), _grads(plain_args)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


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
    with gemm_ops.use_gemm_path("library"):
        checks = verify.check_gemm(case, dtype, device, backend)
    failed = [f"{c.what}: error {c.error:.3g}, eager {c.eager_error}" for c in checks if not c.ok]
    assert not failed, failed


def test_gemm_path_follows_arithmetic_intensity(monkeypatch):
    monkeypatch.delenv("FUSED_RESIDUAL_GEMM_PATH", raising=False)

    def path(m, n, k):  # bf16, as the intensities in gemm_add_relu.py are counted
        meta = dict(device="meta", dtype=torch.bfloat16)
        x, w, out = torch.empty(m, k, **meta), torch.empty(n, k, **meta), torch.empty(m, n, **meta)
        return gemm_ops.gemm_path([gemm_ops.Operand(x, w)], out, out)

    assert path(802816, 256, 64) == "triton"  # a ResNet shortcut: memory-bound
    assert path(50176, 1024, 512) == "triton"  # ResNet-50 layer-3 shortcut, 204 FLOP/B
    assert path(12544, 2048, 1024) == "library"  # 397 FLOP/B
    assert path(8192, 8192, 8192) == "library"  # compute-bound
    x = w = out = torch.empty(8192, 8192, device="meta", dtype=torch.bfloat16)
    assert gemm_ops.gemm_path([gemm_ops.Operand(x, w), gemm_ops.Operand(x, w)], None, out) == "triton"  # dual
    with gemm_ops.use_gemm_path("triton"):
        assert path(8192, 8192, 8192) == "triton"
    monkeypatch.setenv("FUSED_RESIDUAL_GEMM_PATH", "library")
    assert path(802816, 256, 64) == "library"
    monkeypatch.setenv("FUSED_RESIDUAL_GEMM_PATH", "cublas")
    with pytest.raises(ValueError, match="'cublas'"):
        path(8, 8, 8)
    with pytest.raises(ValueError, match="'fast'"):
        with gemm_ops.use_gemm_path("fast"):
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
        out = gemm_ops._alloc.empty((m, n), x)
    if dual:
        args, ref = (x, w, s, ws, b), reference.dual_linear_add_relu
        gemm_ops._triton_gemm([gemm_ops.Operand(x, w), gemm_ops.Operand(s, ws)], b, None, out, config=config)
    else:
        r = torch.randn(m, n, device=device)
        args, ref = (x, w, r, b), reference.linear_add_relu
        gemm_ops._triton_gemm([gemm_ops.Operand(x, w)], b, r, out, config=config)
    assert_close_to_ref(out, ref(*args), ref(*(a.double() for a in args)), f"tile {tile}")


def test_autotune_choices_lists_each_tuned_key(monkeypatch):
    from fused_residual import _triton

    K = _triton.kernels("gemm_add_relu")
    cfg = K.make_config(64, 128, 64, 2, 4)
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    monkeypatch.setattr(K.AUTOTUNED["16-bit"], "cache", {(802816, 256, 64, 0, "torch.bfloat16"): cfg})
    monkeypatch.setattr(K.AUTOTUNED["tf32"], "cache", {})
    monkeypatch.setattr(K.AUTOTUNED["ieee fp32"], "cache", {})
    lines = gemm_ops.autotune_choices()
    assert len(lines) == 1
    assert lines[0].startswith("16-bit configs: key (802816, 256, 64, 0")
    assert "BLOCK_N: 128" in lines[0] and "num_stages: 2" in lines[0]


def test_config_sets_follow_operand_size_and_precision():
    from fused_residual import _triton

    K = _triton.kernels("gemm_add_relu")
    assert K.config_set(2, "ieee") == "16-bit"
    assert K.config_set(4, "tf32") == "tf32"
    assert K.config_set(4, "ieee") == "ieee fp32"
    # TF32 tiles: the 16-bit tiles with half as deep K steps (fp32 operands take twice the shared memory)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 2 * c.kwargs["BLOCK_K"]) for c in K.TF32_CONFIGS] == \
        [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in K.CONFIGS
         if not c.kwargs["PERSISTENT"] and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]


def test_hopper_only_configs_are_pruned_before_sm90(monkeypatch):
    from fused_residual import _triton

    K = _triton.kernels("gemm_add_relu")
    persistent = [c for c in K.CONFIGS if c.kwargs["PERSISTENT"]]
    assert persistent and all(K.runs_on(c, (9, 0)) and not K.runs_on(c, (8, 0)) for c in persistent)
    wide = [c for c in K.CONFIGS if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128]
    assert wide and all(K.runs_on(c, (9, 0)) and not K.runs_on(c, (8, 6)) for c in wide)
    assert sum(K.runs_on(c, (8, 0)) for c in K.CONFIGS) == len(K.CONFIGS) - len(persistent) - len(wide)
    args = {"M": 100000, "N": 256, "K1": 64, "K2": 0, "out_ptr": torch.empty(1, device="meta")}
    for cap, expect in (((8, 0), False), ((9, 0), True)):
        monkeypatch.setattr(K, "_capability", lambda t, cap=cap: cap)
        kept = K.prune_configs(K.CONFIGS, args)
        assert kept and any(c.kwargs["PERSISTENT"] for c in kept) == expect, cap
    args.update(M=8, N=8, K1=8)  # smaller than every tile: the smallest usable config
    monkeypatch.setattr(K, "_capability", lambda t: (8, 0))
    (only,) = K.prune_configs(K.CONFIGS, args)
    assert not only.kwargs["PERSISTENT"] and only.kwargs["BLOCK_M"] * only.kwargs["BLOCK_N"] == 64 * 64


def _all_configs():
    from fused_residual import _triton

    if not _triton.status()[0]:
        return []
    K = _triton.kernels("gemm_add_relu")
    return [pytest.param(name, i, id=f"{name}-{i}") for name, configs in K.CONFIG_SETS.items()
            for i in range(len(configs))]


@pytest.mark.cuda
@pytest.mark.parametrize("dual", [False, True], ids=["single", "dual"])
@pytest.mark.parametrize("config_set,index", _all_configs())
def test_every_shipped_config_is_accurate_on_cuda(config_set, index, dual):
    """The CUDA test run pins the first config (FUSED_RESIDUAL_GEMM_AUTOTUNE=0); the autotuner may pick any
    other, so each one runs here on a shape that no tile divides, within the accuracy rule."""
    from fused_residual import _triton

    K = _triton.kernels("gemm_add_relu")
    config = K.CONFIG_SETS[config_set][index]
    if not K.runs_on(config, torch.cuda.get_device_capability()):
        pytest.skip(f"{config} is not used on this GPU")
    dtype = torch.bfloat16 if config_set == "16-bit" else torch.float32
    precision = {"16-bit": "ieee", "tf32": "tf32", "ieee fp32": "ieee"}[config_set]
    m, n, k1, k2 = 1000, 300, 200, 72
    dev = "cuda"
    x, s = torch.randn(m, k1, device=dev, dtype=dtype), torch.randn(m, k2, device=dev, dtype=dtype)
    w = (torch.randn(n, k1, device=dev) / 14).to(dtype)
    ws = (torch.randn(n, k2, device=dev) / 9).to(dtype)
    r, b = torch.randn(m, n, device=dev, dtype=dtype), torch.randn(n, device=dev, dtype=dtype)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        assert gemm_ops.dot_precision(dtype, torch.device(dev)) == precision
        with poisoned():
            out = gemm_ops._alloc.empty((m, n), x)
        if dual:
            args, ref = (x, w, s, ws, b), reference.dual_linear_add_relu
            gemm_ops._triton_gemm([gemm_ops.Operand(x, w), gemm_ops.Operand(s, ws)], b, None, out, config=config)
        else:
            args, ref = (x, w, r, b), reference.linear_add_relu
            gemm_ops._triton_gemm([gemm_ops.Operand(x, w)], b, r, out, config=config)
        torch.cuda.synchronize()
        assert_close_to_ref(out, ref(*args), ref(*(a.double() for a in args)), f"{config_set} {config}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_pixel_stride_recognises_evenly_laid_out_pixels():
    """Rows addressed with one multiply only where that gives every pixel's true offset."""
    def strides(t):  # (images, OH, OW, img, h, w strides) of an NCHW-shaped tensor
        return t.shape[0], t.shape[2], t.shape[3], t.stride(0), t.stride(2), t.stride(3)

    x = torch.empty(4, 8, 5, 6)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert gemm_ops.pixel_stride(*strides(cl)) == 8  # dense NHWC: pixels 8 channels apart
    assert gemm_ops.pixel_stride(*strides(x)) is None  # NCHW: images are C*H*W apart, pixels 1
    assert gemm_ops.pixel_stride(*strides(x[:, :1])) is None  # one channel of an NCHW tensor: image gap
    assert gemm_ops.pixel_stride(*strides(torch.empty(4, 1, 5, 6))) == 1  # NCHW with one channel
    assert gemm_ops.pixel_stride(*strides(cl[:, :, ::2, ::2])) is None  # a stride-2 view
    assert gemm_ops.pixel_stride(*strides(cl[:, :4])) == 8  # channel slice of NHWC: still even
    assert gemm_ops.pixel_stride(*strides(cl[:1])) == 8  # a single image
    assert gemm_ops.pixel_stride(*strides(cl[:, :, :, :1])) == 48  # one column: pixels one H row apart
    assert gemm_ops.pixel_stride(*strides(cl[:, :, :, :3])) is None  # part of each H row
    assert gemm_ops.pixel_stride(1, 1, 1, 0, 0, 0) == 0  # one pixel: any stride works
    m = torch.empty(10, 7)
    assert gemm_ops.pixel_stride(10, 1, 1, m.stride(0), 0, 0) == 7  # a [M, N] matrix
    for t in (cl, x, cl[:, :, ::2, ::2], cl[:, :4], torch.empty(4, 1, 5, 6), cl[:, :, :, :1], cl[:1]):
        images, oh, ow, si, sh, sw = strides(t)
        p = gemm_ops.pixel_stride(images, oh, ow, si, sh, sw)
        if p is not None:  # the claim itself, pixel by pixel
            for img in range(images):
                for h in range(oh):
                    for w in range(ow):
                        assert img * si + h * sh + w * sw == ((img * oh + h) * ow + w) * p
