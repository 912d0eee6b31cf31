"""The C++ BatchNorm(+add)+ReLU primitives (kernels/csrc/batch_norm.h): bn_stats, bn_apply, bn_bwd_reduce,
bn_bwd_apply, against float64 torch formulas, on every dtype and on NCHW / channels_last / 2-D storage."""

import math

import pytest
import torch

from fused_residual import _cpp
from fused_residual.reference import pack_mask, storage_order, unpack_mask
from cases import BN_CASES, DTYPES, RESNET_STAGE, shape_id

if not _cpp.status()[0]:
    pytest.skip(f"C++ extension not built: {_cpp.status()[1]}", allow_module_level=True)

M = _cpp.module()
if not hasattr(M, "bn_stats"):
    pytest.skip("C++ extension built without the bn_* kernels (rebuild it)", allow_module_level=True)


def _kind(shape, fmt):
    return "cl" if fmt == "channels_last" else "2d" if len(shape) == 2 else "nchw"


# (shape, layout): "nchw" (contiguous), "cl" (channels_last, 4-D), "2d" (N, C contiguous). The shared
# BatchNorm cases, and geometries that walk these kernels' vectors and reduction units.
CASES = [(s, _kind(s, f)) for s, f in BN_CASES] + [
    ((2, 3, 7, 5), "cl"),                             # C = 3: rows shorter than a vector
    ((5, 17, 3, 3), "cl"),                            # C = 17: whole vectors and a tail
    ((4, 40, 1, 1), "nchw"),                          # 1x1 planes
    (RESNET_STAGE, "nchw"), (RESNET_STAGE, "cl"),
    ((1, 3, 150, 130), "nchw"),                       # one plane spans several reduction units
    ((9, 40, 9, 11), "cl"),                           # several row blocks, C not a multiple of 32
    ((37, 1), "2d"), ((3000, 70), "2d"),
    # rows wider than 512 channels: units of 64 rows by 512-channel groups (RowUnits)
    ((130, 1000), "2d"),                              # 3 row blocks (64, 64, 2), groups of 512 and 488 channels
    ((3, 2051, 2, 2), "cl"),                          # one row block, 5 groups (the last 3 channels), C % 8 != 0
    ((70, 4096), "2d"),                               # 2 row blocks, 8 whole groups
]
IDS = [f"{shape_id(s)}-{k}" for s, k in CASES]


def make(shape, kind, dtype, scale=1.0, offset=0.0):
    t = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    if kind == "cl":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def like(t):
    return torch.empty_like(t).fill_(float("nan"))  # poisoned: an unwritten element shows as NaN


def layout_args(shape, kind):
    C = shape[1]
    inner = math.prod(shape[2:]) if kind == "nchw" else 1
    return C, inner


def per_channel(v, t):
    """A [C] vector broadcast over t's logical shape (dim 1 is C)."""
    return v.view([1, -1] + [1] * (t.dim() - 2))


def dims(t):
    return [0] + list(range(2, t.dim()))


def ulp(dtype):
    return {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]


def nan_vec(C):
    return torch.full((C,), float("nan"))


# ---- bn_stats ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=IDS)
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["mean0", "mean1e4"])
def test_stats_against_fp64(shape, kind, dtype, offset):
    if offset and dtype != torch.float32:
        offset = 100.0  # the large-mean case in a dtype that can hold it with a spread
    x = make(shape, kind, dtype, offset=offset)
    C, inner = layout_args(shape, kind)
    mean, var = nan_vec(C), nan_vec(C)
    M.bn_stats(x, C, inner, mean, var)
    rv, rm = torch.var_mean(x.double(), dim=dims(x), correction=0)
    assert torch.allclose(mean.double(), rm, rtol=1e-5, atol=1e-5 * (1 + abs(offset))), (mean, rm)
    assert torch.allclose(var.double(), rv, rtol=1e-3, atol=1e-9), (var, rv)


def test_stats_large_mean_fp32_tight():
    """mean 1e4, std 1: float32 data, var within 1e-3 relative of fp64 (the naive E[x^2]-E[x]^2 fails)."""
    for shape, kind in [((8, 64, 28, 28), "nchw"), ((8, 64, 28, 28), "cl"), ((20000, 5), "2d")]:
        x = make(shape, kind, torch.float32, offset=1e4)
        C, inner = layout_args(shape, kind)
        mean, var = nan_vec(C), nan_vec(C)
        M.bn_stats(x, C, inner, mean, var)
        rv, rm = torch.var_mean(x.double(), dim=dims(x), correction=0)
        assert ((var.double() - rv).abs() / rv).max() < 1e-3
        assert ((mean.double() - rm).abs()).max() < 1e-2


# ---- bn_apply ----------------------------------------------------------------------------------------------


def params(C):
    return torch.randn(C), torch.rand(C) + 0.5, torch.randn(C)


def apply_ref(x, skip, mean, scale, shift):
    y = (x.double() - per_channel(mean.double(), x)) * per_channel(scale.double(), x) + per_channel(
        shift.double(), x)
    if skip is not None:
        y = y + skip.double()
    return torch.relu(y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=IDS)
@pytest.mark.parametrize("with_skip", [True, False], ids=["skip", "noskip"])
def test_apply_against_fp64_and_mask(shape, kind, dtype, with_skip):
    x = make(shape, kind, dtype)
    skip = make(shape, kind, dtype) if with_skip else None
    C, inner = layout_args(shape, kind)
    mean, scale, shift = params(C)
    out = like(x)
    numel = x.numel()
    mask = torch.full(((numel + 7) // 8,), 0xA5, dtype=torch.uint8)
    M.bn_apply(x, skip, mean, scale, shift, out, mask, C, inner)
    ref = apply_ref(x, skip, mean, scale, shift)
    assert not out.isnan().any(), "unwritten or NaN elements"
    err = (out.double() - ref).abs()
    tol = 2 * ulp(dtype) * ref.abs() + (1e-6 if dtype == torch.float32 else 1e-3) * (1 + ref.abs().max())
    assert (err <= tol).all(), f"max error {err.max().item():.3g}"
    assert out.stride() == x.stride()
    assert torch.equal(mask, pack_mask(out)), "mask differs from the gate of the stored out"
    out2 = like(x)
    M.bn_apply(x, skip, mean, scale, shift, out2, None, C, inner)
    assert torch.equal(out2, out)


# Channel counts that take each path of the channels-last kernels: the generic one (C = 1, 5), one vector
# per step (C = 8, 16 for 16-bit dtypes) and four vectors per step (C = 32, 64).
PATH_CHANNELS = [1, 5, 8, 16, 32, 64]


@pytest.mark.parametrize("C", PATH_CHANNELS)
def test_apply_relu_semantics_nan_and_signed_zero(C):
    values = torch.tensor([float("nan"), 0.0, -1.0, 2.0, -0.0, 3.0, float("inf"), -float("inf"), 1.0])
    x = values[torch.randint(0, len(values), (9 * C,))].view(9, C)
    mean, scale, shift = torch.zeros(C), torch.ones(C), torch.full((C,), -0.0)  # y = x exactly, -0.0 too
    out = like(x)
    mask = torch.zeros((x.numel() + 7) // 8, dtype=torch.uint8)
    M.bn_apply(x, None, mean, scale, shift, out, mask, C, 1)
    expect = torch.relu(x)  # CPU eager: NaN passes, relu(-0.0) = -0.0
    assert torch.equal(out.isnan(), expect.isnan())
    ok = ~expect.isnan()
    assert torch.equal(out[ok], expect[ok]) and torch.equal(torch.signbit(out[ok]), torch.signbit(expect[ok]))
    assert torch.equal(mask, pack_mask(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", PATH_CHANNELS)
def test_apply_mask_of_rounded_value(C, dtype):
    """A positive float32 result that rounds to 0 in 16 bits must get gate 0: the mask is of the stored value."""
    x = torch.where(torch.rand(64, C) < 0.5, 0.0, 1.0).to(dtype)  # y = 1e-45 where x = 0: stored as +0
    mean, scale, shift = torch.zeros(C), torch.ones(C), torch.full((C,), 1e-45)
    out = like(x)
    mask = torch.zeros(8 * C, dtype=torch.uint8)
    M.bn_apply(x, None, mean, scale, shift, out, mask, C, 1)
    assert (out == 0).any() and (out > 0).any()
    assert torch.equal(mask, pack_mask(out))


# ---- backward ----------------------------------------------------------------------------------------------


def fwd_for_bwd(shape, kind, dtype):
    x = make(shape, kind, dtype)
    skip = make(shape, kind, dtype)
    C, inner = layout_args(shape, kind)
    mean, scale, shift = params(C)
    out = like(x)
    mask = torch.empty(((x.numel() + 7) // 8,), dtype=torch.uint8)
    M.bn_apply(x, skip, mean, scale, shift, out, mask, C, inner)
    dy = make(shape, kind, dtype)
    return x, out, mask, mean, dy, C, inner


def gate_of(out):
    return ~(out <= 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=IDS)
def test_bwd_reduce_against_fp64(shape, kind, dtype):
    x, out, mask, mean, dy, C, inner = fwd_for_bwd(shape, kind, dtype)
    g = torch.where(gate_of(out), dy.double(), 0.0)
    rg = g.sum(dims(x))
    rgx = (g * (x.double() - per_channel(mean.double(), x))).sum(dims(x))
    n = x.numel() // C
    results = []
    for o, m in [(out, None), (None, mask), (out, mask)]:
        sg, sgx = nan_vec(C), nan_vec(C)
        M.bn_bwd_reduce(dy, x, o, m, mean, C, inner, sg, sgx)
        atol_g = 1e-6 * math.sqrt(n) * (g.abs().sum(dims(x)) / n + 1)
        gx_abs = (g * (x.double() - per_channel(mean.double(), x))).abs().sum(dims(x))
        assert ((sg.double() - rg).abs() <= 1e-5 * g.abs().sum(dims(x)) + atol_g).all(), (sg, rg)
        assert ((sgx.double() - rgx).abs() <= 1e-5 * gx_abs + atol_g).all(), (sgx, rgx)
        results.append((sg, sgx))
    for sg, sgx in results[1:]:  # mask-gated and out-gated are identical
        assert torch.equal(sg, results[0][0]) and torch.equal(sgx, results[0][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=IDS)
@pytest.mark.parametrize("with_dskip", [True, False], ids=["dskip", "nodskip"])
def test_bwd_apply_against_fp64(shape, kind, dtype, with_dskip):
    x, out, mask, mean, dy, C, inner = fwd_for_bwd(shape, kind, dtype)
    a, b, d = torch.rand(C) + 0.5, torch.randn(C) * 0.1, torch.randn(C) * 0.1
    gate = gate_of(out)
    g64 = torch.where(gate, dy.double(), 0.0)
    ref = (g64 - per_channel(b.double(), x) - (x.double() - per_channel(mean.double(), x)) *
           per_channel(d.double(), x)) * per_channel(a.double(), x)
    results = []
    for o, m in [(out, None), (None, mask)]:
        dx = like(x)
        dskip = like(x) if with_dskip else None
        M.bn_bwd_apply(dy, x, o, m, mean, a, b, d, dx, dskip, C, inner)
        assert not dx.isnan().any()
        err = (dx.double() - ref).abs()
        scale = (g64.abs() + per_channel(b.double().abs(), x) + (x.double() - per_channel(mean.double(), x)).abs()
                 * per_channel(d.double().abs(), x)) * per_channel(a.double(), x)
        tol = 4 * ulp(dtype) * scale + 2 * ulp(dtype) * ref.abs() + 1e-30
        assert (err <= tol).all(), f"max error {err.max().item():.3g}"
        assert dx.stride() == x.stride()
        if with_dskip:
            expect = torch.where(gate, dy, torch.zeros((), dtype=dtype))
            assert torch.equal(dskip.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               expect.view(torch.int16 if dtype != torch.float32 else torch.int32))
        results.append((dx, dskip))
    assert torch.equal(results[0][0], results[1][0])
    if with_dskip:
        assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", [((3, 5, 7, 5), "nchw"), ((3, 5, 7, 5), "cl"), ((3, 16, 7, 5), "cl"),
                                        ((3, 64, 7, 5), "cl")])
def test_bwd_nan_inf_where_gate_is_off(dtype, shape, kind):
    x, out, mask, mean, dy, C, inner = fwd_for_bwd(shape, kind, dtype)
    gate = gate_of(out)
    assert (~gate).any() and gate.any()
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    dy = dy.clone()
    idx = torch.randint(0, 3, dy.shape)
    dy = torch.where(gate, dy, specials[idx])
    a, b, d = torch.rand(C) + 0.5, torch.randn(C), torch.randn(C)
    for o, m in [(out, None), (None, mask)]:
        sg, sgx = nan_vec(C), nan_vec(C)
        M.bn_bwd_reduce(dy, x, o, m, mean, C, inner, sg, sgx)
        assert sg.isfinite().all() and sgx.isfinite().all()
        dx, dskip = like(x), like(x)
        M.bn_bwd_apply(dy, x, o, m, mean, a, b, d, dx, dskip, C, inner)
        assert dx.isfinite().all()
        assert torch.equal(dskip, torch.where(gate, dy, torch.zeros((), dtype=dtype)))
        assert not torch.signbit(dskip[~gate]).any()  # +0 where off


# ---- determinism -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,kind", [((8, 64, 28, 28), "nchw"), ((8, 64, 28, 28), "cl"), ((20001, 33), "2d"),
                                        ((2, 3, 200, 150), "nchw"), ((130, 1000), "2d")],
                         ids=["nchw", "cl", "2d", "bigplane", "2d-wide"])
def test_reductions_deterministic_across_runs_and_threads(shape, kind, dtype):
    x, out, mask, mean, dy, C, inner = fwd_for_bwd(shape, kind, dtype)

    def run():
        m, v, sg, sgx = nan_vec(C), nan_vec(C), nan_vec(C), nan_vec(C)
        M.bn_stats(x, C, inner, m, v)
        M.bn_bwd_reduce(dy, x, None, mask, mean, C, inner, sg, sgx)
        return torch.stack([m, v, sg, sgx])

    threads = torch.get_num_threads()
    try:
        first = run()
        assert torch.equal(first, run())
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, one) and torch.equal(first, two)


# ---- empty and bad inputs ----------------------------------------------------------------------------------


def test_empty_is_a_no_op():
    x = torch.empty(0, 4)
    C = 4
    mean, var = nan_vec(C), nan_vec(C)
    M.bn_stats(x, C, 1, mean, var)
    assert mean.isnan().all()
    M.bn_apply(x, None, mean, var, var, torch.empty_like(x), torch.empty(0, dtype=torch.uint8), C, 1)
    M.bn_bwd_reduce(x, x, x, None, mean, C, 1, mean, var)
    M.bn_bwd_apply(x, x, x, None, mean, mean, mean, mean, torch.empty_like(x), None, C, 1)


def test_bad_inputs_are_refused_with_clear_errors():
    C = 4
    x = torch.randn(2, C, 3, 3)
    v = torch.zeros(C)
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="bn_apply: skip is BFloat16, expected Float"):
        M.bn_apply(x, x.bfloat16(), v, v, v, out, None, C, 9)
    with pytest.raises(RuntimeError, match="bn_apply: out must have x's storage layout"):
        M.bn_apply(x, None, v, v, v, out.contiguous(memory_format=torch.channels_last), None, C, 9)
    with pytest.raises(RuntimeError, match="bn_stats: x must be dense"):
        M.bn_stats(x[:, :, :, :2], C, 6, v, v.clone())
    with pytest.raises(RuntimeError, match="bn_stats: mean must be a contiguous float32"):
        M.bn_stats(x, C, 9, v.double(), v)
    with pytest.raises(RuntimeError, match="bn_stats: numel 72 is not a multiple"):
        M.bn_stats(x, 5, 9, torch.zeros(5), torch.zeros(5))
    with pytest.raises(RuntimeError, match="bn_stats: unsupported dtype"):
        M.bn_stats(x.double(), C, 9, v, v.clone())
    with pytest.raises(RuntimeError, match="bn_bwd_reduce: pass out or mask"):
        M.bn_bwd_reduce(x, x, None, None, v, C, 9, v.clone(), v.clone())
    with pytest.raises(RuntimeError, match="bn_bwd_reduce: mask must hold 9"):
        M.bn_bwd_reduce(x, x, None, torch.zeros(8, dtype=torch.uint8), v, C, 9, v.clone(), v.clone())
    with pytest.raises(RuntimeError, match="bn_bwd_apply: dy is Half, expected Float"):
        M.bn_bwd_apply(x.half(), x, x, None, v, v, v, v, out, None, C, 9)
    with pytest.raises(RuntimeError, match="bn_bwd_apply: dskip has shape"):
        M.bn_bwd_apply(x, x, x, None, v, v, v, v, out, torch.empty(3), C, 9)


def test_instruction_sets_agree():
    """The DEFAULT and AVX2 builds agree to rounding (not bit for bit: GCC contracts a*b+c into FMA in the
    AVX2 build), and their masks are of their own stored outputs."""
    import importlib

    mods = []
    for name in ["fused_residual._C", "fused_residual._C_avx2"]:
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    if len(mods) < 2:
        pytest.skip("only one instruction-set build on this machine")
    shape, kind = (3, 19, 7, 5), "cl"
    x, out, mask, mean, dy, C, inner = fwd_for_bwd(shape, kind, torch.float32)
    skip = make(shape, kind, torch.float32)
    _, scale, shift = params(C)
    outs = []
    for mod in mods:
        o = like(x)
        mk = torch.empty_like(mask)
        mod.bn_apply(x, skip, mean, scale, shift, o, mk, C, inner)
        outs.append((o, mk))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=2 ** -22, atol=1e-6)
    for o, mk in outs:
        assert torch.equal(mk, pack_mask(o))


# ---- the whole ops: bn_forward, bn_backward, bn_update_running ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", [CASES[i] for i in (0, 1, 4, 8, 9)], ids=[IDS[i] for i in (0, 1, 4, 8, 9)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_whole_ops_equal_the_primitives_composed(shape, kind, dtype, training, monkeypatch):
    """bn_forward and bn_backward (one C++ call each, the per-channel arithmetic in C++) give bit for bit
    what the four primitives give with that arithmetic as float32 tensor operations, outputs and
    statistics, gradients and dw / db, with a skip or not, a mask or the output as the gate, parameters in
    float32 or the activation dtype (AMP)."""
    import fused_residual as fr
    from fused_residual.ops import batch_norm as bn

    C = shape[1]
    x, skip, dy = make(shape, kind, dtype, 2.0, 0.5), make(shape, kind, dtype), make(shape, kind, dtype)
    w = (torch.rand(C) + 0.5).to(dtype if dtype != torch.float32 else torch.float32)
    b, rm, rv = torch.randn(C), torch.randn(C), torch.rand(C) + 0.5

    def both(run, *args):
        """run(*args) with the cpp backend's whole ops, then with its primitives composed."""
        got = run(*args)
        with monkeypatch.context() as m:
            m.setitem(bn.FORWARD, "cpp", bn._forward_by_primitives)
            m.setitem(bn.BACKWARD, "cpp", bn._backward_by_primitives)
            return got, run(*args)

    with fr.use_backend("cpp"):
        for s, weight, bias in ((skip, w, b), (None, None, None)):
            for save_mask in (True, False):
                got, ref = both(bn._forward, x, s, weight, bias, rm, rv, training, 1e-5, save_mask)
                for name, g, r in zip(("out", "mask", "mean", "invstd", "var"), got, ref):
                    assert g.dtype == r.dtype and torch.equal(g, r), name
                out, mask, mean, invstd, _ = got
                gate = dict(out=None, mask=mask) if save_mask else dict(out=out, mask=None)
                got, ref = both(bn._batch_norm_relu_backward, dy, x, gate["out"], gate["mask"], mean, invstd, weight,
                                training, s is not None, True)
                for name, g, r in zip(("dx", "dskip", "dw", "db"), got, ref):
                    assert torch.equal(g, r), name


def test_update_running_matches_the_tensor_formula():
    """bn_update_running: F.batch_norm's update (unbiased variance), in place, within float32 rounding of
    the tensor formula (the compiler may fuse a multiply and an add)."""
    C, count, momentum = 37, 50, 0.1
    rm, rv, mean, var = torch.randn(C), torch.rand(C) + 0.5, torch.randn(C), torch.rand(C)
    exp_m = rm.double() * (1 - momentum) + mean.double() * momentum
    exp_v = rv.double() * (1 - momentum) + var.double() * (count / (count - 1)) * momentum
    versions = (rm._version, rv._version)
    M.bn_update_running(rm, rv, mean, var, count, momentum)
    assert rm._version > versions[0] and rv._version > versions[1]  # written in place: the counters move
    assert (rm.double() - exp_m).abs().max() <= 4 * 2 ** -24 * exp_m.abs().max()
    assert (rv.double() - exp_v).abs().max() <= 4 * 2 ** -24 * exp_v.abs().max()
    with pytest.raises(RuntimeError, match="bn_update_running: running_var must be a contiguous float32"):
        M.bn_update_running(rm, rv.half(), mean, var, count, momentum)


def test_whole_ops_refuse_bad_inputs():
    x = torch.randn(4, 6, 3, 3)
    v = torch.empty(6)
    with pytest.raises(RuntimeError, match="bn_forward: eval mode needs the running statistics"):
        M.bn_forward(x, None, None, None, None, None, False, 1e-5, torch.empty_like(x), None, v, v.clone(),
                     v.clone(), 6, 9)
    with pytest.raises(RuntimeError, match="bn_forward: weight must be a CPU tensor of 6 elements"):
        M.bn_forward(x, None, torch.ones(5), None, None, None, True, 1e-5, torch.empty_like(x), None, v,
                     v.clone(), v.clone(), 6, 9)
    with pytest.raises(RuntimeError, match="bn_backward: grad_bias must be a contiguous float32"):
        M.bn_backward(x, x, x, None, v, v, None, True, True, torch.empty_like(x), None, v, torch.empty(5), 6, 9)
