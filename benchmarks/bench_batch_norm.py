"""batch_norm_add_relu / batch_norm_relu in training mode: fused against eager and torch.compile.

    python benchmarks/bench_batch_norm.py [--device cpu|cuda] [--quick] [--out DIR]

Eager is ``relu(F.batch_norm(x, ..., training=True) + skip)`` (and without the add); torch.compile compiles
that expression per case with static shapes. Bytes counted per element (the fused minimum, e = element
size): forward 4e with the add (read x twice: statistics, then normalise; read skip; write out) + 1/8 for
the mask, 3e without; forward+backward adds the backward's 3 passes (read dy, x and the mask twice: the
reductions, then dx; write dx and dskip) = 5e + 1/4 with the add, 4e + 1/4 without. GB/s are those bytes
over the time for every provider; "of copy" compares with a copy kernel over x in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from . import common
except ImportError:  # run as a script
    from fused_residual._benchmarks import common

import fused_residual as fr


def cases(device: str, quick: bool):
    """(shape, dtype name, memory format): ResNet-50 stage shapes (block outputs and inner widths); on CPU
    also a 2-D (N, C) case."""
    cl = torch.channels_last
    if device == "cuda":
        if quick:
            return [((32, 256, 56, 56), "bf16", cl)]
        return [((256, c, hw, hw), "bf16", cl) for c, hw in ((256, 56), (64, 56), (512, 28), (1024, 14),
                                                               (2048, 7))]
    if quick:
        return [((2, 64, 14, 14), "fp32", cl)]
    # then block outputs of ResNet-50 at batch 4, 112 px (layers 1 and 3), and a wide 2-D (N, C) activation
    # as an MLP block has it
    return [((8, 256, 28, 28), "fp32", cl), ((8, 256, 28, 28), "fp32", None), ((8, 256, 28, 28), "bf16", cl),
            ((4, 64, 56, 56), "fp32", cl), ((4, 256, 28, 28), "fp32", cl), ((4, 1024, 7, 7), "fp32", cl),
            ((128, 8192), "fp32", None)]


def _eager(with_skip: bool):
    if with_skip:
        return lambda x, s, rm, rv, w, b: torch.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) + s)
    return lambda x, s, rm, rv, w, b: torch.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))


def _fused(with_skip: bool, save: str = "mask"):
    if with_skip:
        return lambda x, s, rm, rv, w, b: fr.batch_norm_add_relu(x, s, rm, rv, w, b, True, 0.1, 1e-5, save=save)
    return lambda x, s, rm, rv, w, b: fr.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5, save=save)


def run(device: str = "cpu", quick: bool = False, out_dir: str | None = None):
    bench = common.Bench("batch_norm", device, quick, out_dir)
    for shape, dname, fmt in cases(device, quick):
        dtype = common.DTYPES[dname]
        C = shape[1]

        def make():
            t = torch.randn(shape, dtype=dtype, device=device)
            return t.contiguous(memory_format=fmt) if fmt is not None else t

        x, s, g = make(), make(), make()
        # parameters and statistics in float32, as AMP models keep them
        w = torch.rand(C, device=device, requires_grad=True)
        b = torch.randn(C, device=device, requires_grad=True)
        rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
        n, es = x.numel(), x.element_size()
        layout = "nhwc" if fmt is not None else "nchw" if len(shape) == 4 else "nc"
        copy_gbs = bench.copy_baseline("batch_norm", shape, f"{dname} {layout}", x)
        xg, sg = x.detach().requires_grad_(), s.detach().requires_grad_()
        for with_skip in (True, False):
            op = "batch_norm_add_relu" if with_skip else "batch_norm_relu"
            eager_fn = _eager(with_skip)
            torch._dynamo.reset()  # compiled per case: static shapes
            compiled_fn = torch.compile(eager_fn, dynamic=False)
            providers = [("eager", eager_fn), ("torch.compile", compiled_fn), ("fused", _fused(with_skip)),
                         ("fused (save output)", _fused(with_skip, "output"))]
            fwd_bytes = (4 if with_skip else 3) * n * es + n / 8
            both = fwd_bytes + (5 if with_skip else 4) * n * es + n / 8
            inputs = (xg, sg) if with_skip else (xg,)

            def m(provider, mode, fn, nbytes):
                bench.measure(op, shape, f"{dname} {layout}", provider, mode, fn, nbytes=nbytes, copy=copy_gbs)

            for provider, fn in providers:
                if provider != "fused (save output)":
                    with torch.no_grad():
                        m(provider, "fwd", lambda fn=fn: fn(x, s, rm, rv, w, b), fwd_bytes)
                m(provider, "fwd+bwd", lambda fn=fn: torch.autograd.grad(fn(xg, sg, rm, rv, w, b),
                                                                          (*inputs, w, b), g), both)
        del x, s, g, xg, sg
        if device == "cuda":
            torch.cuda.empty_cache()
    return bench.finish()


if __name__ == "__main__":
    common.main_guard(run, __doc__.splitlines()[0])
