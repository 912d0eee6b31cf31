"""linear_add_relu / dual_linear_add_relu against cuBLAS, eager and torch.compile.

    python benchmarks/bench_linear.py [--device cpu|cuda] [--quick] [--out DIR]

Providers (same tensors, one process):
  torch.mm           the GEMM alone (cuBLAS / MKL; dual: both products, the second accumulated by addmm_):
                     the floor for compute-bound shapes
  _addmm_activation  cuBLASLt with the residual as the C matrix and its ReLU epilogue (no bias)
  eager              relu(F.linear(x, w, b) + r)  (dual: relu(F.linear(x, w, b) + F.linear(s, ws)))
  torch.compile      the eager function compiled (and mode="max-autotune" for the compute-bound shapes)
  fused              fused_residual.linear_add_relu / dual_linear_add_relu (on CUDA also each GEMM path
                     forced: the Triton kernel, and the library path: cuBLAS product + fused add+ReLU pass)
Metrics: TFLOP/s, and for every provider the fraction of the copy kernel's bandwidth that the fused op's
minimal bytes (inputs read once, output written once) would take: 100% is the memory roofline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from . import common
except ImportError:  # run as a script
    from fused_residual._benchmarks import common

import fused_residual as fr
from fused_residual.ops import use_gemm_path


def cases(device: str, quick: bool):
    """(label, M, N, K, K2 or 0 for a single product, dtype name, with backward, max-autotune)."""
    if device == "cuda":
        if quick:
            return [("shortcut", 65536, 256, 64, 0, "bf16", True, False)]
        return [
            ("rn50 shortcut l1", 802816, 256, 64, 0, "bf16", True, False),
            ("rn50 shortcut l2", 200704, 512, 256, 0, "bf16", True, False),
            ("compute 12544", 12544, 2048, 1024, 0, "bf16", False, True),
            ("compute 8192^3", 8192, 8192, 8192, 0, "bf16", False, True),
            ("dual rn50 l2", 200704, 512, 128, 256, "bf16", True, False),
        ]
    if quick:
        return [("cpu", 512, 256, 256, 0, "fp32", True, False)]
    return [("cpu", 4096, 512, 512, 0, "fp32", True, False), ("cpu dual", 4096, 512, 256, 256, "fp32", True, False)]


def run(device: str = "cpu", quick: bool = False, out_dir: str | None = None, max_autotune: str = "on"):
    """``max_autotune``: "on" (also time compile max-autotune on the compute-bound shapes), "off", or "only"
    (just that provider, plus the references it is compared with: a separate, slow phase)."""
    bench = common.Bench("linear" if max_autotune != "only" else "linear_max_autotune", device, quick, out_dir)
    for label, M, N, K, K2, dname, backward, autotune in cases(device, quick):
        if max_autotune == "only" and not (autotune and device == "cuda"):
            continue
        dtype = common.DTYPES[dname]
        es = torch.empty((), dtype=dtype).element_size()
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
        b = torch.randn(N, device=device, dtype=dtype)
        dual = K2 > 0
        op = "dual_linear_add_relu" if dual else "linear_add_relu"
        shape = f"M{M} N{N} K{K}" + (f"+{K2}" if dual else "")
        if dual:
            s = torch.randn(M, K2, device=device, dtype=dtype)
            ws = (torch.randn(N, K2, device=device) / K2**0.5).to(dtype)
            args = (x, w, s, ws, b)
            eager_fn = lambda x, w, s, ws, b: torch.relu(F.linear(x, w, b) + F.linear(s, ws))  # noqa: E731
            fused_fn = fr.dual_linear_add_relu
            flops = 2.0 * M * N * (K + K2)
            nbytes = es * (M * K + N * K + M * K2 + N * K2 + N + M * N)
        else:
            r = torch.randn(M, N, device=device, dtype=dtype)
            args = (x, w, r, b)
            eager_fn = lambda x, w, r, b: torch.relu(F.linear(x, w, b) + r)  # noqa: E731
            fused_fn = fr.linear_add_relu
            flops = 2.0 * M * N * K
            nbytes = es * (M * K + N * K + 2 * M * N + N)
        out_buf = torch.empty(M, N, device=device, dtype=dtype)
        copy_gbs = bench.copy_baseline(op, shape, dname, out_buf)

        def m(provider, mode, fn, fl=flops, nb=nbytes):
            bench.measure(op, shape, dname, provider, mode, fn, flops=fl, nbytes=nb, copy=copy_gbs)

        if dual:  # both products, as the fused kernel computes them
            m("torch.mm", "fwd", lambda: torch.mm(x, w.t(), out=out_buf).addmm_(s, ws.t()),
              nb=es * (M * K + N * K + M * K2 + N * K2 + M * N))
        else:
            m("torch.mm", "fwd", lambda: torch.mm(x, w.t(), out=out_buf), nb=es * (M * K + N * K + M * N))
        if not dual and max_autotune != "only":
            m("_addmm_activation", "fwd", lambda: torch._addmm_activation(r, x, w.t()))
        m("eager", "fwd", lambda: eager_fn(*args))
        torch._dynamo.reset()  # per case: the lambdas' cache entries would reach dynamo's recompile limit
        if max_autotune != "only":
            compiled = torch.compile(eager_fn, dynamic=False)
            m("torch.compile", "fwd", lambda: compiled(*args))
        if autotune and max_autotune != "off" and device == "cuda":
            tuned = torch.compile(eager_fn, dynamic=False, mode="max-autotune-no-cudagraphs")
            m("compile max-autotune", "fwd", lambda: tuned(*args))
        m("fused", "fwd", lambda: fused_fn(*args))
        if device == "cuda" and max_autotune != "only":  # both CUDA paths, whichever "auto" picked
            for path in ("triton", "library"):
                with use_gemm_path(path):
                    m(f"fused [{path} path]", "fwd", lambda: fused_fn(*args))

        if backward and max_autotune != "only":
            leaves = [a.detach().requires_grad_() for a in args]
            g = torch.randn(M, N, device=device, dtype=dtype)

            def fwd_bwd(fn):
                return lambda: torch.autograd.grad(fn(*leaves), leaves, g)

            m("eager", "fwd+bwd", fwd_bwd(eager_fn), fl=3 * flops, nb=None)
            m("torch.compile", "fwd+bwd", fwd_bwd(compiled), fl=3 * flops, nb=None)
            m("fused", "fwd+bwd", fwd_bwd(fused_fn), fl=3 * flops, nb=None)
        del x, w, b, args, out_buf
        if device == "cuda":
            torch.cuda.empty_cache()
    return bench.finish()


if __name__ == "__main__":
    common.main_guard(run, __doc__.splitlines()[0])
