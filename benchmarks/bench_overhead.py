"""Host overhead per call: the fused ops on tiny tensors, where the time is all Python and dispatch.

    python benchmarks/bench_overhead.py [--device cpu|cuda] [--quick] [--out DIR]

Providers (same tensors, one process):
  eager            the eager PyTorch formula
  fused            the public function (``fused_residual.linear_add_relu`` ...): in plain eager mode it runs
                   the op's implementation through a ``torch.autograd.Function`` (fused_residual.ops._direct)
  fused [torch.ops]  the registered ``torch.ops.fused_residual.*`` op, the path compiled and exported code and
                   tracers take (custom_op dispatch: Python -> dispatcher -> autograd kernel -> implementation)
Modes: ``fwd`` without autograd, ``fwd+bwd`` (inputs requiring grad, ``torch.autograd.grad``). A kernel on
tensors this small takes microseconds, so the times measure what each call costs the host: wall-clock time
per call of calls made back to back (``common.wall_ms``; on CUDA, do_bench's cache flush before each call
would hide up to its own duration of host time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from . import common
except ImportError:  # run as a script
    from fused_residual._benchmarks import common

import fused_residual as fr
from fused_residual import verify

OPS = torch.ops.fused_residual


def cases(device: str):
    """(op, shape label, args, eager formula, public function, registered op)."""
    def t(*shape):
        return torch.randn(*shape, device=device)

    z, s = t(16, 64), t(16, 64)
    yield "add_relu", "16x64", (z, s), lambda z, s: torch.relu(z + s), fr.add_relu, OPS.add_relu
    x, w, r, b = t(16, 64), t(32, 64), t(16, 32), t(32)
    yield ("linear_add_relu", "M16 N32 K64", (x, w, r, b), lambda x, w, r, b: torch.relu(F.linear(x, w, b) + r),
           fr.linear_add_relu, OPS.linear_add_relu)
    x, w, r, b = t(2, 16, 4, 4), t(32, 16, 1, 1), t(2, 32, 4, 4), t(32)
    yield ("conv1x1_add_relu", "2x16x4x4 -> 32", (x, w, r, b),
           lambda x, w, r, b: torch.relu(F.conv2d(x, w, b) + r), fr.conv1x1_add_relu, OPS.conv1x1_add_relu)
    x, s, w, b = t(4, 16, 3, 3), t(4, 16, 3, 3), t(16), t(16)
    mean, var = torch.zeros(16, device=device), torch.ones(16, device=device)
    yield ("batch_norm_add_relu", "4x16x3x3 train", (x, s, w, b),
           lambda x, s, w, b: torch.relu(F.batch_norm(x, mean, var, w, b, True) + s),
           lambda x, s, w, b: fr.batch_norm_add_relu(x, s, mean, var, w, b, True),
           # the op alone: it returns the batch statistics, the public function updates the running ones
           lambda x, s, w, b: OPS.batch_norm_add_relu(x, s, w, b, mean, var, True, 1e-5, True)[0])


def run(device: str = "cpu", quick: bool = False, out_dir: str | None = None):
    bench = common.Bench("overhead", device, quick, out_dir, total=4 * 3 * 2)
    dtype = "fp32"
    for op, shape, args, eager_fn, fused_fn, registered in cases(device):
        providers = [("eager", eager_fn), ("fused", fused_fn), ("fused [torch.ops]", registered)]
        for provider, fn in providers:
            bench.measure(op, shape, dtype, provider, "fwd", lambda fn=fn: fn(*args), wall=True)
        leaves = verify.leaf_copies(args)
        g = torch.ones_like(eager_fn(*args))
        for provider, fn in providers:
            bench.measure(op, shape, dtype, provider, "fwd+bwd",
                          lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, g), wall=True)
    return bench.finish()


if __name__ == "__main__":
    common.main_guard(run, __doc__.splitlines()[0])
