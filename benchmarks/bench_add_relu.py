"""add_relu: fused kernels against eager and torch.compile, forward, backward and both together.

    python benchmarks/bench_add_relu.py [--device cpu|cuda] [--quick] [--out DIR]

Bytes counted per element (fused minimum): forward 3 (read z, skip; write out) + 1/8 with the mask;
backward 3 from the output (read grad, out; write grad_in), 2 + 1/8 from the mask. GB/s are those bytes
over the time, for every provider, and "of copy" compares with a copy kernel on the same tensors.
"""

from __future__ import annotations

import torch

try:
    from . import common
except ImportError:  # run as a script
    from fused_residual._benchmarks import common

import fused_residual as fr

OPS = torch.ops.fused_residual


def cases(device: str, quick: bool):
    """(shape, dtype name, memory format) to measure."""
    if device == "cuda":
        if quick:
            return [((1 << 24,), "bf16", None)]
        flat = [((128 << 20,), "bf16", None), ((64 << 20,), "fp32", None)]  # 256 MiB per tensor
        stages = [((256, c, hw, hw), "bf16", torch.channels_last)  # ResNet-50 block outputs, batch 256
                  for c, hw in ((256, 56), (512, 28), (1024, 14), (2048, 7))]
        return flat + stages
    if quick:
        return [((1 << 20,), "fp32", None)]
    return [((8 << 20,), "fp32", None), ((8 << 20,), "bf16", None), ((16, 256, 56, 56), "fp32", torch.channels_last)]


def _make(shape, dtype, fmt, device):
    t = torch.randn(shape, dtype=dtype, device=device)
    return t.contiguous(memory_format=fmt) if fmt is not None else t


def run(device: str = "cpu", quick: bool = False, out_dir: str | None = None):
    bench = common.Bench("add_relu", device, quick, out_dir)
    eager_fn = lambda z, s: torch.relu(z + s)  # noqa: E731
    for shape, dname, fmt in cases(device, quick):
        # compiled per case for static shapes: one compile reused across cases goes dynamic from the second
        # shape on, and its generic kernels ran at 75-81% of the copy kernel (H200 run 2) on stage shapes
        torch._dynamo.reset()
        compiled_fn = torch.compile(eager_fn, dynamic=False)
        dtype = common.DTYPES[dname]
        z, s, g = (_make(shape, dtype, fmt, device) for _ in range(3))
        n, es = z.numel(), z.element_size()
        copy_gbs = bench.copy_baseline("add_relu", shape, dname, z)

        def m(provider, mode, fn, nbytes):
            bench.measure("add_relu", shape, dname, provider, mode, fn, nbytes=nbytes, copy=copy_gbs)

        fwd_bytes = 3 * n * es
        m("eager", "fwd", lambda: eager_fn(z, s), fwd_bytes)
        m("torch.compile", "fwd", lambda: compiled_fn(z, s), fwd_bytes)
        m("fused", "fwd", lambda: fr.add_relu(z, s), fwd_bytes)
        # (the mask rows time the registered ops: the mask backward needs the mask only its forward makes,
        # so its bwd row is not comparable with eager's alone; compare the fwd+bwd rows)
        m("fused (mask)", "fwd", lambda: OPS.add_relu_with_mask(z, s), fwd_bytes + n / 8)

        out = eager_fn(z, s)
        _, mask = OPS.add_relu_with_mask(z, s)
        stride = list(out.stride())
        m("eager", "bwd", lambda: torch.ops.aten.threshold_backward(g, out, 0), 3 * n * es)
        m("fused", "bwd", lambda: OPS.add_relu_backward(g, out), 3 * n * es)
        m("fused (mask)", "bwd", lambda: OPS.add_relu_mask_backward(g, mask, stride), 2 * n * es + n / 8)

        zg, sg = z.detach().requires_grad_(), s.detach().requires_grad_()

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(zg, sg), (zg, sg), g)

        both = 6 * n * es
        m("eager", "fwd+bwd", fwd_bwd(eager_fn), both)
        m("torch.compile", "fwd+bwd", fwd_bwd(compiled_fn), both)
        m("fused", "fwd+bwd", fwd_bwd(fr.add_relu), both)
        m("fused (mask)", "fwd+bwd", fwd_bwd(lambda a, b: fr.add_relu(a, b, save="mask")), both - n * es + n / 4)
        del z, s, g, out, mask, zg, sg
        if device == "cuda":
            torch.cuda.empty_cache()
    return bench.finish()


if __name__ == "__main__":
    common.main_guard(run, __doc__.splitlines()[0])
