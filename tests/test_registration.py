"""torch.library registration: opcheck, torch.compile(fullgraph=True) and torch.export."""

import pytest
import torch

import fused_residual as fr
from helpers import assert_bitwise_equal, device_backend_params

OPS = torch.ops.fused_residual


def _add_relu_samples(device):
    z = torch.randn(3, 4, 5, 6, device=device, requires_grad=True)
    s = torch.randn(3, 4, 5, 6, device=device, requires_grad=True)
    zc = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last).requires_grad_()
    sc = torch.randn(2, 3, 4, 5, device=device).requires_grad_()
    g = torch.randn(3, 4, 5, 6, device=device)
    out = torch.relu(z.detach() + s.detach())
    mask = fr.reference.pack_mask(out)
    return [
        (OPS.add_relu.default, (z, s)),
        (OPS.add_relu.default, (zc, sc)),
        (OPS.add_relu_with_mask.default, (z, s)),
        (OPS.add_relu_.default, (z.detach().clone(), s.detach())),
        (OPS.add_relu_backward.default, (g, out)),
        (OPS.add_relu_mask_backward.default, (g, mask, list(out.stride()))),
    ]


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_opcheck(device, backend):
    with fr.use_backend(backend):
        for op, args in _add_relu_samples(device):
            torch.library.opcheck(op, args)


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


def test_compile_inplace_with_autograd():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(a, skip):
        return fr.add_relu_(a * 2, skip)

    a, skip = torch.randn(50, requires_grad=True), torch.randn(50, requires_grad=True)
    out = block(a, skip)
    out.backward(torch.ones_like(out))
    ae, se = a.detach().clone().requires_grad_(), skip.detach().clone().requires_grad_()
    ref = torch.relu_(ae * 2 + se)
    ref.backward(torch.ones_like(ref))
    assert_bitwise_equal(out.detach(), ref.detach())
    assert_bitwise_equal(a.grad, ae.grad)
    assert_bitwise_equal(skip.grad, se.grad)


def test_export_round_trip():
    class Block(torch.nn.Module):
        def forward(self, z, skip):
            return fr.add_relu(z, skip)

    z, skip = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ep = torch.export.export(Block(), (z, skip))
    assert "fused_residual.add_relu" in str(ep.graph)
    assert_bitwise_equal(ep.module()(z, skip), torch.relu(z + skip))
