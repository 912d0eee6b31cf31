"""The Triton BatchNorm primitives (fused_residual.ops._bn_triton) against float64 formulas and the eager
primitives of fused_residual.ops.batch_norm, which define them.

Every output is poisoned (NaN) before the call, so an element a kernel skips shows up. Shapes cover NCHW,
channels_last and 2-D storage, awkward sizes (numel not a multiple of 8 or of a block, C = 1, C = 3, 7x5
planes) and, with a small TARGET_PROGRAMS, splits that walk several tiles.
"""

import math

import pytest
import torch

from fused_residual import _triton, reference
from fused_residual.ops import batch_norm as B
from cases import BN_CASES, DTYPES, bn_case_ids, devices
from helpers import assert_bitwise_equal, assert_close_to_ref

triton_ok = _triton.status()[0] and (_triton.interpreting() or torch.cuda.is_available())
pytestmark = pytest.mark.skipif(not triton_ok, reason="needs triton (interpreter on CPU or a CUDA GPU)")

if triton_ok:
    from fused_residual.ops import _bn_triton as T


def _devices():
    # Under the interpreter the kernels serve CPU tensors; compiled, CUDA ones.
    return ["cpu"] if _triton.interpreting() else [d for d in devices() if d == "cuda"]


# (shape, memory format): the shared BatchNorm cases, and geometries that walk these kernels' tiles
CASES = BN_CASES + [
    ((3, 3, 7, 5), "channels_last"),  # C = 3, 7x5 planes, numel 315 (not a multiple of 8)
    ((7, 1), "contiguous"),  # 2-D, C = 1, numel 7
    ((2, 4, 30, 40), "contiguous"),  # planes of 1200 (several inner blocks per tile row... and tiles)
    ((3, 70, 2, 3), "channels_last"),  # C = 70: two channel blocks, the second partial
]
IDS = bn_case_ids(CASES)
F32 = torch.float32


def _make(shape, fmt, dtype, device, scale=2.0, offset=0.5):
    x = (torch.randn(shape, device=device) * scale + offset).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x.contiguous()


def _geometry(x):
    fmt = B.canonical_format(x)
    assert x.is_contiguous(memory_format=fmt)
    return x.shape[1], B.inner_size(x, fmt)


def _nan(*shape, device, dtype=F32):
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def _poisoned_like(t):
    return torch.full_like(t, math.nan)


def _channels(t, C, inner):
    return reference.storage_order(t).view(-1, C, inner)


def _vec(C, device, lo=0.5):
    return torch.rand(C, device=device) + lo


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of ``t``'s dtype at |t| (float64)."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def _assert_apply_close(out, expected, x, mean, C, inner, scale):
    """``out`` within 2 ulp of eager's (NaN exactly where eager's is), plus, for compiled kernels, the
    rounding a fused multiply-add skips: ``(x - mean) * scale + shift`` contracted into one FMA differs
    from eager's two roundings by up to half an ulp of the product, which is many ulps of a result that
    cancels."""
    assert torch.equal(out.isnan(), expected.isnan()), "out: NaN positions differ"
    prod = ((_channels(x, C, inner).double() - mean.double().view(1, -1, 1)) * scale.double().view(1, -1, 1))
    fma = 0.0 if _triton.interpreting() else 2.0**-24
    exp3, out3 = _channels(expected, C, inner), _channels(out, C, inner)
    fin = ~exp3.isnan() & prod.isfinite()
    tol = 2 * _ulp(exp3) + fma * prod.abs()
    err = (out3.double() - exp3.double()).abs()
    bad = (err > tol) & fin
    assert not bad.any(), f"out: {int(bad.sum())} elements beyond the bound, max error {err[fin].max().item():.3g}"


def _gate_inputs(x, C, inner):
    """A forward output (with exact zeros and a few NaN) and its packed mask, as the backward receives."""
    device = x.device
    out = torch.empty_like(x)
    mean = torch.randn(C, device=device) * 0.1
    T.apply(x, None, mean, _vec(C, device), torch.randn(C, device=device) * 0.1, out, None, C, inner)
    flat = reference.storage_order(out)
    if flat.numel() > 4:
        flat[torch.randperm(flat.numel(), device=device)[:2]] = math.nan  # NaN passes the gate
    return out, reference.pack_mask(out), mean


# ---- stats -------------------------------------------------------------------------------------------------


def _ref_stats(x, C, inner):
    var, mean = torch.var_mean(_channels(x, C, inner).double(), dim=(0, 2), correction=0)
    return mean, var


def _check_stats(x, mean, var, what=""):
    C, inner = _geometry(x)
    m64, v64 = _ref_stats(x, C, inner)
    spread = v64.sqrt()
    n = x.numel() // C
    # float32 mean: a few ulps of |mean| plus a rounding of the spread; biased variance: relative 1e-5
    assert ((mean.double() - m64).abs() <= 4e-7 * (m64.abs() + spread) * max(1.0, math.log2(n)) + 1e-30).all(), \
        (what, (mean.double() - m64).abs().max().item())
    assert ((var.double() - v64).abs() <= 1e-5 * v64 + 1e-30).all(), (what, ((var.double() - v64) / v64).abs().max())


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=IDS)
def test_stats_match_float64(device, dtype, shape, fmt):
    x = _make(shape, fmt, dtype, device)
    C, inner = _geometry(x)
    mean, var = _nan(C, device=device), _nan(C, device=device)
    assert T.stats(x, C, inner, mean, var) is None
    _check_stats(x, mean, var)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("shape,fmt", [((32, 3, 16, 16), "contiguous"), ((32, 3, 16, 16), "channels_last"),
                                       ((8192, 3), "contiguous")], ids=["nchw", "channels_last", "2d"])
@pytest.mark.parametrize("target", [None, 2], ids=["default-splits", "long-splits"])
def test_stats_far_from_zero(device, shape, fmt, target, monkeypatch):
    """Mean 1e4, std 1: a float32 sum of squares would lose every digit; the (count, mean, M2) merge keeps
    the variance within 1e-3 relative (far better in practice), with one split per tile or few long ones."""
    if target is not None:
        monkeypatch.setattr(T, "TARGET_PROGRAMS", target)
    x = _make(shape, fmt, F32, device, scale=1.0, offset=1e4)
    C, inner = _geometry(x)
    mean, var = _nan(C, device=device), _nan(C, device=device)
    T.stats(x, C, inner, mean, var)
    m64, v64 = _ref_stats(x, C, inner)
    assert ((var.double() - v64).abs() <= 1e-3 * v64).all(), ((var.double() - v64) / v64)
    assert ((mean.double() - m64).abs() <= 2e-3).all(), (mean.double() - m64)  # ~2 ulp of 1e4 in fp32
    _check_stats(x, mean, var)


def test_reduction_plan_splits_and_bounds():
    """Splits: none empty, together exactly the tiles; NCHW tiles run along planes, channels_last ones
    across channels; enough programs for a large GPU on a ResNet stage."""
    K = _triton.kernels("batch_norm")
    for numel, C, inner in [(256 * 64 * 56 * 56, 64, 56 * 56), (256 * 2048 * 49, 2048, 1), (7, 1, 1),
                            (315, 3, 35), (480, 8, 1), (256 * 512 * 28 * 28, 512, 28 * 28)]:
        p = T._reduce_plan(K, numel, C, inner)
        assert (p["splits"] - 1) * p["tiles_per_split"] < p["tiles"] <= p["splits"] * p["tiles_per_split"]
        assert p["BLOCK_O"] * p["BLOCK_C"] * p["BLOCK_J"] <= K.TILE
        assert (p["BLOCK_J"] == 1) == (inner == 1) and (inner == 1 or p["BLOCK_C"] == 1)
        assert p["outer"] * C * inner == numel and not p["INDEX64"]
        if numel > 2**20:
            assert p["grid"][0] * p["grid"][1] >= 512, p
    assert T._reduce_plan(K, 2**31, 64, 1)["INDEX64"]


# ---- apply --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=IDS)
@pytest.mark.parametrize("with_skip", [True, False], ids=["add", "noadd"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
def test_apply_matches_eager(device, dtype, shape, fmt, with_skip, with_mask):
    x = _make(shape, fmt, dtype, device)
    skip = _make(shape, fmt, dtype, device) if with_skip else None
    C, inner = _geometry(x)
    mean, scale, shift = torch.randn(C, device=device), _vec(C, device), torch.randn(C, device=device)
    out = _poisoned_like(x)
    mask = torch.full((B.mask_numel(x.numel()),), 0xA5, dtype=torch.uint8, device=device) if with_mask else None
    assert T.apply(x, skip, mean, scale, shift, out, mask, C, inner) is None
    assert out.stride() == x.stride()
    expected = _poisoned_like(x)
    B._eager_apply(x, skip, mean, scale, shift, expected, None, C, inner)
    _assert_apply_close(out, expected, x, mean, C, inner, scale)
    assert (out >= 0).all() or out.isnan().any()
    if with_mask:
        assert torch.equal(mask, reference.pack_mask(out)), "mask is not the gate of the stored out"


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_specials_and_gate_after_rounding(device, dtype):
    """NaN propagates (relu(NaN) = NaN, gate on); +-Inf; values that round to zero in the storage dtype
    gate off, as the stored output says."""
    shape = (3, 4, 5, 7)
    x = _make(shape, "contiguous", dtype, device)
    flat = x.view(-1)
    flat[:5] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0], dtype=dtype)
    C, inner = _geometry(x)
    mean = torch.zeros(C, device=device)
    # Scales every finite value to a float32 value that is nonzero but below half the storage dtype's
    # smallest subnormal (fp16: 6e-8, bf16: 9e-41), so that it is stored as zero; float32 has no such range.
    tiny = torch.full((C,), {torch.float16: 1e-30, torch.bfloat16: 1e-42}.get(dtype, 1e-30), device=device)
    for scale, shift in [(_vec(C, device), torch.randn(C, device=device)), (tiny, torch.zeros(C, device=device))]:
        out, mask = _poisoned_like(x), torch.zeros(B.mask_numel(x.numel()), dtype=torch.uint8, device=device)
        T.apply(x, None, mean, scale, shift, out, mask, C, inner)
        expected = _poisoned_like(x)
        B._eager_apply(x, None, mean, scale, shift, expected, None, C, inner)
        _assert_apply_close(out, expected, x, mean, C, inner, scale)
        assert torch.equal(out.isinf(), expected.isinf())
        if scale is tiny and dtype != F32:  # finite values round to zero: the gate is off exactly there
            assert torch.equal(out == 0, x.isfinite() | (x == -math.inf))
        assert torch.equal(mask, reference.pack_mask(out))


# ---- bwd_reduce ---------------------------------------------------------------------------------------------


def _ref_bwd_sums(dy, x, keep, mean, C, inner):
    g = torch.where(keep.view(-1, C, inner), _channels(dy, C, inner).double(), 0.0)
    t = g * (_channels(x, C, inner).double() - mean.double().view(1, -1, 1))
    return g.sum(dim=(0, 2)), t.sum(dim=(0, 2)), g.abs().sum(dim=(0, 2)), t.abs().sum(dim=(0, 2))


def _run_bwd_reduce(dy, x, out, mask, mean, C, inner):
    sum_g, sum_gx = _nan(C, device=x.device), _nan(C, device=x.device)
    assert T.bwd_reduce(dy, x, out, mask, mean, C, inner, sum_g, sum_gx) is None
    return sum_g, sum_gx


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=IDS)
def test_bwd_reduce_matches_float64(device, dtype, shape, fmt):
    x = _make(shape, fmt, dtype, device)
    dy = _make(shape, fmt, dtype, device, offset=0.0)
    C, inner = _geometry(x)
    out, mask, mean = _gate_inputs(x, C, inner)
    keep = ~(reference.storage_order(out) <= 0)
    rg, rgx, ag, agx = _ref_bwd_sums(dy, x, keep, mean, C, inner)
    n = x.numel() // C
    rel = 4 * torch.finfo(F32).eps * (math.log2(n) + 2)  # float32 sums of n terms in a shallow tree
    by_mask = _run_bwd_reduce(dy, x, None, mask, mean, C, inner)
    by_out = _run_bwd_reduce(dy, x, out, None, mean, C, inner)
    for got, ref, mag, what in ((by_mask[0], rg, ag, "sum_g"), (by_mask[1], rgx, agx, "sum_gx")):
        assert ((got.double() - ref).abs() <= rel * mag + 1e-30).all(), (what, (got.double() - ref).abs().max())
    for a, b, what in zip(by_mask, by_out, ("sum_g", "sum_gx")):
        assert_bitwise_equal(a, b, f"{what}: mask-gated vs out-gated")


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bwd_reduce_ignores_nonfinite_gradients_gated_off(device, dtype):
    shape = (3, 4, 7, 5)
    x = _make(shape, "contiguous", dtype, device)
    dy = _make(shape, "contiguous", dtype, device, offset=0.0)
    C, inner = _geometry(x)
    out, mask, mean = _gate_inputs(x, C, inner)
    keep = ~(reference.storage_order(out) <= 0)
    assert not keep.all() and keep.any()
    clean = _run_bwd_reduce(dy, x, None, mask, mean, C, inner)
    off = (~keep).nonzero().view(-1)
    specials = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype, device=device)
    reference.storage_order(dy)[off] = specials[torch.arange(off.numel(), device=device) % 3]
    for gate in ({"out": None, "mask": mask}, {"out": out, "mask": None}):
        dirty = _run_bwd_reduce(dy, x, gate["out"], gate["mask"], mean, C, inner)
        for a, b in zip(dirty, clean):
            assert_bitwise_equal(a, b, "specials where gated off changed the sums")


# ---- bwd_apply ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=IDS)
@pytest.mark.parametrize("with_dskip", [True, False], ids=["dskip", "nodskip"])
def test_bwd_apply(device, dtype, shape, fmt, with_dskip):
    x = _make(shape, fmt, dtype, device)
    dy = _make(shape, fmt, dtype, device, offset=0.0)
    C, inner = _geometry(x)
    out, mask, mean = _gate_inputs(x, C, inner)
    keep = ~(reference.storage_order(out) <= 0)
    # gated-off gradients may be anything: NaN / Inf there must not leak into dx or dskip
    off = (~keep).nonzero().view(-1)[:3]
    reference.storage_order(dy)[off] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype,
                                                    device=device)[:off.numel()]
    a, b, d = _vec(C, device), torch.randn(C, device=device), torch.randn(C, device=device) * 0.1
    results = []
    for gate_out, gate_mask in ((None, mask), (out, None)):
        dx, dskip = _poisoned_like(x), (_poisoned_like(x) if with_dskip else None)
        assert T.bwd_apply(dy, x, gate_out, gate_mask, mean, a, b, d, dx, dskip, C, inner) is None
        results.append((dx, dskip))
    (dx, dskip), (dx_o, dskip_o) = results
    assert_bitwise_equal(dx, dx_o, "dx: mask-gated vs out-gated")
    if with_dskip:
        expected = torch.where(keep, reference.storage_order(dy), torch.zeros((), dtype=dtype, device=device))
        assert_bitwise_equal(reference.storage_order(dskip), expected, "dskip")
        assert_bitwise_equal(dskip_o, dskip, "dskip: mask-gated vs out-gated")
    g = torch.where(keep.view(-1, C, inner), _channels(dy, C, inner).double(), 0.0)
    xmu = _channels(x, C, inner).double() - mean.double().view(1, -1, 1)
    ref64 = (g - b.double().view(1, -1, 1) - xmu * d.double().view(1, -1, 1)) * a.double().view(1, -1, 1)
    eager = _poisoned_like(x)
    B._eager_bwd_apply(dy, x, None, mask, mean, a, b, d, eager, None, C, inner)
    assert_close_to_ref(_channels(dx, C, inner), _channels(eager, C, inner), ref64, "dx")


# ---- determinism, empty tensors -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("target", [None, 3], ids=["default-splits", "long-splits"])
def test_reductions_are_deterministic(device, fmt, target, monkeypatch):
    if target is not None:
        monkeypatch.setattr(T, "TARGET_PROGRAMS", target)
    shape = (16, 5, 24, 24)
    x = _make(shape, fmt, torch.bfloat16, device)
    dy = _make(shape, fmt, torch.bfloat16, device, offset=0.0)
    C, inner = _geometry(x)
    out, mask, mean = _gate_inputs(x, C, inner)
    runs = []
    for _ in range(2):
        m, v = _nan(C, device=device), _nan(C, device=device)
        T.stats(x, C, inner, m, v)
        runs.append((m, v) + _run_bwd_reduce(dy, x, None, mask, mean, C, inner))
    for a, b, what in zip(runs[0], runs[1], ("mean", "var", "sum_g", "sum_gx")):
        assert_bitwise_equal(a, b, f"{what} differs run to run")
    _check_stats(x, runs[0][0], runs[0][1])


@pytest.mark.parametrize("device", _devices())
def test_empty_tensors_write_nothing(device):
    x = torch.empty((0, 4, 3, 3), device=device)
    C, inner = 4, 9
    vecs = [_nan(C, device=device) for _ in range(4)]
    T.stats(x, C, inner, vecs[0], vecs[1])
    T.apply(x, x, vecs[0], vecs[1], vecs[2], torch.empty_like(x), torch.empty(0, dtype=torch.uint8), C, inner)
    T.bwd_reduce(x, x, x, None, vecs[0], C, inner, vecs[2], vecs[3])
    T.bwd_apply(x, x, x, None, vecs[0], vecs[1], vecs[2], vecs[3], torch.empty_like(x), None, C, inner)
    assert all(v.isnan().all() for v in vecs)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_int64_indexing_path(device, fmt, monkeypatch):
    """The INDEX64 kernels (taken past 2**31 elements, too large to test here) on a small tensor: same
    results as the 32-bit ones, bit for bit."""
    shape = (3, 5, 7, 5)
    x = _make(shape, fmt, torch.float16, device)
    skip = _make(shape, fmt, torch.float16, device)
    dy = _make(shape, fmt, torch.float16, device, offset=0.0)
    C, inner = _geometry(x)
    mean, scale, shift = torch.randn(C, device=device), _vec(C, device), torch.randn(C, device=device)
    a, b, d = _vec(C, device), torch.randn(C, device=device), torch.randn(C, device=device)

    def run_all():
        m, v = _nan(C, device=device), _nan(C, device=device)
        T.stats(x, C, inner, m, v)
        out, mask = _poisoned_like(x), torch.zeros(B.mask_numel(x.numel()), dtype=torch.uint8, device=device)
        T.apply(x, skip, mean, scale, shift, out, mask, C, inner)
        sums = _run_bwd_reduce(dy, x, None, mask, mean, C, inner)
        dx, dskip = _poisoned_like(x), _poisoned_like(x)
        T.bwd_apply(dy, x, None, mask, mean, a, b, d, dx, dskip, C, inner)
        return (m, v, out, mask) + sums + (dx, dskip)

    narrow = run_all()
    monkeypatch.setattr(T, "_index64", lambda numel, slack: True)
    assert T._reduce_plan(_triton.kernels("batch_norm"), x.numel(), C, inner)["INDEX64"]
    wide = run_all()
    for i, (p, q) in enumerate(zip(narrow, wide)):
        if p.dtype == torch.uint8:
            assert torch.equal(p, q)
        else:
            assert_bitwise_equal(p, q, f"result {i}")
