"""The fused ops under torch.compile, each in a small graph with neighbours, against the same graph written
with plain PyTorch ops.

    python benchmarks/bench_compile.py [--device cpu|cuda] [--quick] [--out DIR]

Providers: ``eager`` (the plain graph), ``torch.compile`` (the plain graph compiled), ``compile + fused``
(the graph written with the fused functions, compiled under the default policy, which traces them as
the plain expressions: it should time as ``torch.compile``), ``compile + fused [kernels]`` (the same under
``set_compile_policy("kernels")``: the custom ops stay in the graph as extern calls and Inductor fuses
around them) and ``fused`` (the fused graph in eager mode). This is the measurement behind the default
policy: the kernels policy pays only where its rows beat ``torch.compile``.

Graphs: ``bn_add_relu + conv1x1`` (a block tail and the next block's first 1x1 convolution; eval forward
and train forward+backward) and ``linear_add_relu + linear`` (the MLP residual block; forward and
forward+backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from . import common
except ImportError:  # run as a script
    from fused_residual._benchmarks import common

import fused_residual as fr


def _tail(fused: bool, training: bool):
    def graph(x, s, rm, rv, w, b, w_next):
        if fused:
            y = fr.batch_norm_add_relu(x, s, rm, rv, w, b, training)
        else:
            y = torch.relu(F.batch_norm(x, rm, rv, w, b, training) + s)
        return F.conv2d(y, w_next)
    return graph


def _mlp(fused: bool):
    def graph(x, w, r, b, w_next):
        y = fr.linear_add_relu(x, w, r, b) if fused else torch.relu(F.linear(x, w, b) + r)
        return F.linear(y, w_next)
    return graph


def cases(device: str, quick: bool):
    if device == "cuda":
        if quick:
            return [("tail", (32, 256, 28, 28), "bf16"), ("mlp", (8192, 512), "bf16")]
        return [("tail", (256, 256, 56, 56), "bf16"), ("tail", (256, 1024, 14, 14), "bf16"),
                ("mlp", (200704, 512), "bf16")]
    if quick:
        return [("tail", (2, 32, 8, 8), "fp32"), ("mlp", (256, 64), "fp32")]
    return [("tail", (8, 256, 28, 28), "fp32"), ("mlp", (4096, 512), "fp32")]


def _compiled(fn, policy: str):
    """``fn`` compiled under ``policy`` (the policy is read while tracing: trace now, on first call)."""
    compiled = torch.compile(fn, dynamic=False)

    def call(*args):
        previous = fr.compile_policy()
        fr.set_compile_policy(policy)
        try:
            return compiled(*args)
        finally:
            fr.set_compile_policy(previous)
    return call


def run(device: str = "cpu", quick: bool = False, out_dir: str | None = None):
    bench = common.Bench("compile", device, quick, out_dir)
    for kind, shape, dname in cases(device, quick):
        dtype = common.DTYPES[dname]
        if kind == "tail":
            C = shape[1]
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            s = torch.randn_like(x)
            params = [torch.rand(C, device=device), torch.randn(C, device=device)]
            rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
            w_next = torch.randn(C // 4, C, 1, 1, device=device, dtype=dtype) / C ** 0.5
            modes = [("eval fwd", False), ("train fwd+bwd", True)]
            op = "bn_add_relu + conv1x1"

            def args(grad):
                xs = (x.detach().requires_grad_(grad), s.detach().requires_grad_(grad))
                ps = [p.detach().requires_grad_(grad) for p in params]
                return (*xs, rm, rv, *ps, w_next), [*xs, *ps]

            build = _tail
        else:
            M, K = shape
            x = torch.randn(M, K, device=device, dtype=dtype)
            r = torch.randn(M, K, device=device, dtype=dtype)
            w = torch.randn(K, K, device=device, dtype=dtype) / K ** 0.5
            b = torch.randn(K, device=device, dtype=dtype)
            w_next = torch.randn(K, K, device=device, dtype=dtype) / K ** 0.5
            modes = [("fwd", False), ("fwd+bwd", True)]
            op = "linear_add_relu + linear"

            def args(grad):
                leaves = [t.detach().requires_grad_(grad) for t in (x, w, r, b)]
                return (*leaves, w_next), leaves

            build = None
        for mode, grad in modes:
            training = grad
            plain = build(False, training) if build else _mlp(False)
            fused = build(True, training) if build else _mlp(True)
            torch._dynamo.reset()
            providers = [("eager", plain), ("torch.compile", _compiled(plain, "inductor")),
                         ("compile + fused", _compiled(fused, "inductor")),
                         ("compile + fused [kernels]", _compiled(fused, "kernels")), ("fused", fused)]
            call_args, leaves = args(grad)
            for provider, fn in providers:
                if grad:
                    def step(fn=fn):
                        out = fn(*call_args)
                        return torch.autograd.grad(out.sum(), leaves)
                else:
                    def step(fn=fn):
                        with torch.no_grad():
                            return fn(*call_args)
                bench.measure(op, shape, dname, provider, mode, step)
    return bench.finish()


if __name__ == "__main__":
    common.main_guard(run, __doc__.splitlines()[0])
