"""add_relu / add_relu_: bit-exact with eager, forward and backward, on every backend, dtype and layout."""

import pytest
import torch

import fused_residual as fr
from fused_residual.ops import add_relu as add_relu_ops
from fused_residual import verify
from cases import (DTYPES, EMPTY_AND_SINGLE_SHAPES, device_backend_params, elementwise_layout_cases,
                   layout)
from helpers import assert_bitwise_equal, with_specials


def _eager(z, skip, grad):
    ze, se = z.detach().clone().requires_grad_(), skip.detach().clone().requires_grad_()
    out = torch.relu(ze + se)
    out.backward(grad)
    return out.detach(), ze.grad, se.grad


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layouts", list(elementwise_layout_cases()))
@pytest.mark.parametrize("mode", ["output", "mask", "inplace"])
def test_bit_exact_with_eager(device, backend, dtype, shape, layouts, mode):
    """Forward, both gradients and the output layout, bit for bit (fused_residual.verify's check)."""
    checks = verify.check_add_relu(shape, layouts, dtype, device, backend, mode)
    assert len(checks) == 3 and [c.what for c in checks] == ["forward", "grad z", "grad skip"]
    failed = [f"{c.what}: {c.note}" for c in checks if not c.ok]
    assert not failed, failed


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", EMPTY_AND_SINGLE_SHAPES, ids=str)
def test_empty_and_single_element(device, backend, shape):
    z = torch.randn(shape, device=device, requires_grad=True)
    skip = torch.randn(shape, device=device, requires_grad=True)
    ref_out, ref_gz, _ = _eager(z, skip, torch.ones(shape, device=device))
    with fr.use_backend(backend):
        for save in ("output", "mask"):
            z.grad = None
            out = fr.add_relu(z, skip, save=save)
            out.backward(torch.ones_like(out))
            assert_bitwise_equal(out.detach(), ref_out, f"forward save={save}")
            assert_bitwise_equal(z.grad, ref_gz, f"grad save={save}")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_signed_zero_convention_matches_eager(device, backend):
    """Eager's relu(-0.0) depends on the device; the kernels must agree with it on each."""
    for z, s in [(-0.0, -0.0), (-0.0, 0.0), (0.0, -0.0)]:
        zt, st = torch.full((9,), z, device=device), torch.full((9,), s, device=device)
        eager = torch.relu(zt + st)
        with fr.use_backend(backend):
            out = fr.add_relu(zt, st)
        assert torch.equal(torch.signbit(out), torch.signbit(eager)), (z, s, out, eager)


# ---- what backward keeps ---------------------------------------------------------------------------------


def _saved_bytes(fn):
    """Bytes of tensors autograd saves while running ``fn`` (packed tensors counted once each)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    unique = {id(t): t for t in saved}
    return result, sum(t.numel() * t.element_size() for t in unique.values()), list(unique.values())


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("numel", [1, 13, 4096, 100003])
def test_mask_mode_saves_one_bit_per_element(device, backend, numel):
    z = torch.randn(numel, device=device, requires_grad=True)
    skip = torch.randn(numel, device=device)
    with fr.use_backend(backend):
        out, nbytes, saved = _saved_bytes(lambda: fr.add_relu(z, skip, save="mask"))
        assert nbytes <= numel / 8 + 1, f"saved {nbytes} bytes for {numel} elements"
        assert all(t.dtype == torch.uint8 for t in saved)
        _, out_bytes, _ = _saved_bytes(lambda: fr.add_relu(z, skip, save="output"))
        assert out_bytes == numel * 4  # the output itself, as eager keeps it


def test_mask_not_computed_without_grad(monkeypatch):
    calls = []
    monkeypatch.setattr(add_relu_ops, "mask_numel", lambda n: calls.append(n) or (n + 7) // 8)
    z, skip = torch.randn(10), torch.randn(10)
    fr.add_relu(z, skip, save="mask")
    with torch.no_grad():
        fr.add_relu(z.requires_grad_(), skip, save="mask")
    assert calls == []


# ---- in place --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zl,sl", [("contiguous", "contiguous"), ("channels_last", "contiguous"),
                                   ("sliced", "transposed")])
def test_inplace_matches_eager_inplace(device, backend, dtype, zl, sl):
    shape = (2, 8, 5, 3)
    base = with_specials(torch.randn(shape, dtype=dtype, device=device)).requires_grad_()
    skip = layout(with_specials(torch.randn(shape, dtype=dtype, device=device)), sl).requires_grad_()
    grad = with_specials(torch.randn(shape, dtype=dtype, device=device))

    be, se = base.detach().clone().requires_grad_(), skip.detach().clone().requires_grad_()
    ze = layout(be * 1, zl)
    torch.relu_(ze.add_(se))
    ze.backward(grad)

    z = layout(base * 1, zl)  # a non-leaf in the wanted layout
    version = z._version
    surrounding = z._base.clone() if z._base is not None else None
    with fr.use_backend(backend):
        result = fr.add_relu_(z, skip)
    assert result is z and z._version > version
    assert_bitwise_equal(z.detach(), ze.detach(), "in-place result")
    if surrounding is not None:  # elements of the buffer outside the view are untouched
        outside = torch.ones_like(surrounding, dtype=torch.bool)
        outside[tuple(slice(1, 1 + 2 * s, 2) for s in shape)] = False
        assert torch.equal(z._base.detach()[outside], surrounding.detach()[outside])
    z.backward(grad)
    assert_bitwise_equal(base.grad, be.grad, "grad z")
    assert_bitwise_equal(skip.grad, se.grad, "grad skip")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_inplace_without_grad(device, backend):
    z, skip = torch.randn(100, device=device), torch.randn(100, device=device)
    expected = torch.relu(z + skip)
    with fr.use_backend(backend), torch.no_grad():
        fr.add_relu_(z, skip)
    assert_bitwise_equal(z, expected)


def test_inplace_on_leaf_requiring_grad_raises_and_writes_nothing():
    z = torch.randn(10, requires_grad=True)
    before = z.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fr.add_relu_(z, torch.randn(10))
    assert torch.equal(z.detach(), before)
    view = z[2:]
    with pytest.raises(RuntimeError, match="view of a leaf"):
        fr.add_relu_(view, torch.randn(8))
    assert torch.equal(z.detach(), before)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_inplace_rejects_overlap_and_writes_nothing(device, backend):
    buf = torch.randn(20, device=device)
    before = buf.clone()
    with fr.use_backend(backend):
        with pytest.raises(ValueError, match="partially overlaps"):
            fr.add_relu_(buf[:10], buf[5:15])
        with pytest.raises(ValueError, match="overlapping elements"):
            fr.add_relu_(buf[:1].expand(10), buf[10:])
        with pytest.raises(ValueError, match="shapes differ"):
            fr.add_relu_(buf[:10], buf[10:19])
    assert torch.equal(buf, before)
    with fr.use_backend(backend):  # the same view on both sides is fine: relu(2 z)
        fr.add_relu_(buf[:10], buf[:10])
    assert_bitwise_equal(buf[:10], torch.relu(before[:10] + before[:10]))


# ---- double backward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("save", ["output", "mask"])
def test_double_backward_matches_eager(device, backend, save):
    z = torch.randn(6, 7, device=device, requires_grad=True)
    skip = torch.randn(6, 7, device=device, requires_grad=True)
    v = torch.randn(6, 7, device=device, requires_grad=True)

    def run(fn):
        out = fn(z, skip)
        (gz,) = torch.autograd.grad(out, z, v, create_graph=True)
        (gv,) = torch.autograd.grad((gz * gz).sum(), v)
        return gz.detach(), gv

    ref = run(lambda a, b: torch.relu(a + b))
    with fr.use_backend(backend):
        got = run(lambda a, b: fr.add_relu(a, b, save=save))
    assert_bitwise_equal(got[0], ref[0], "first grad")
    assert_bitwise_equal(got[1], ref[1], "second grad")


# ---- bad input -------------------------------------------------------------------------------------------


def test_bad_input_names_the_problem():
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        fr.add_relu(z, torch.randn(3, 2))
    with pytest.raises(TypeError, match="float32.*float16"):
        fr.add_relu(z, torch.randn(2, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="skip must be a torch.Tensor, got float"):
        fr.add_relu(z, 1.0)
    with pytest.raises(TypeError, match="z must be a torch.Tensor, got list"):
        fr.add_relu([1.0], z)
    for dtype in (torch.int32, torch.int64, torch.bool, torch.float64, torch.complex64):
        with pytest.raises(TypeError, match=str(dtype)):
            fr.add_relu(torch.zeros(2, 3, dtype=dtype), torch.zeros(2, 3, dtype=dtype))
        with pytest.raises(TypeError, match=str(dtype)):
            fr.add_relu_(torch.zeros(2, 3, dtype=dtype), torch.zeros(2, 3, dtype=dtype))
    with pytest.raises(ValueError, match="save must be one of .*'bits'"):
        fr.add_relu(z, z, save="bits")
    with pytest.raises(ValueError, match="add_relu_: shapes differ"):
        fr.add_relu_(z, torch.randn(3))


@pytest.mark.cuda
def test_device_mismatch_names_both_devices():
    with pytest.raises(ValueError, match="cpu.*cuda"):
        fr.add_relu(torch.randn(4), torch.randn(4, device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int64_offsets_past_2_pow_31_elements(dtype):
    n = 2**31 + 4099  # past int32 range, and not a multiple of the block
    z = torch.randn(n, dtype=dtype, device="cuda")
    skip = torch.randn(n, dtype=dtype, device="cuda")
    out = fr.add_relu(z, skip)
    tail = slice(n - 100_000, n)
    assert_bitwise_equal(out[tail], torch.relu(z[tail] + skip[tail]), "tail past 2**31")
    assert_bitwise_equal(out[:100_000], torch.relu(z[:100_000] + skip[:100_000]), "head")


@pytest.mark.cuda
def test_strided_kernel_past_2_pow_31_elements():
    """Mismatched layouts (a transposed z, a contiguous skip) take the strided kernel, with int64 element
    indices past 2**31 elements (int32 below)."""
    a, b = 65539, 32771  # a * b = 2**31 + 327721
    z = torch.randn(b, a, dtype=torch.float16, device="cuda").t()
    skip = torch.randn(a, b, dtype=torch.float16, device="cuda")
    out = fr.add_relu(z, skip)
    assert out.stride() == z.stride()
    for rows in (slice(0, 64), slice(a - 64, a)):
        assert_bitwise_equal(out[rows], torch.relu(z[rows] + skip[rows]), f"rows {rows}")
