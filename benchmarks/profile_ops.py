"""Where the time of a fused op's forward + backward goes: torch.profiler's device and host tables, and
the host-side Python profile, for add_relu and conv1x1_add_relu against eager.

    python benchmarks/profile_ops.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import cProfile
import io
import pstats

import torch
import torch.nn.functional as F

try:
    from . import common
except ImportError:  # run as a script
    from fused_residual._benchmarks import common

import fused_residual as fr


def _cases(device: str, quick: bool):
    cl = torch.channels_last
    n = 8 if quick or device == "cpu" else 256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    z = torch.randn(n, 2048, 7, 7, device=device, dtype=dtype).contiguous(memory_format=cl).requires_grad_()
    s = torch.randn_like(z).requires_grad_()
    g = torch.randn_like(z)
    yield "add_relu", (z, s), g, lambda a, b: torch.relu(a + b), fr.add_relu
    x = torch.randn(n, 1024, 14, 14, device=device, dtype=dtype).contiguous(memory_format=cl).requires_grad_()
    w = (torch.randn(2048, 1024, 1, 1, device=device) / 32).to(dtype).requires_grad_()
    r = torch.randn(n, 2048, 7, 7, device=device, dtype=dtype).contiguous(memory_format=cl).requires_grad_()
    b = torch.randn(2048, device=device, dtype=dtype).requires_grad_()
    yield ("conv1x1_add_relu", (x, w, r, b), torch.randn_like(r),
           lambda x, w, r, b: torch.relu(F.conv2d(x, w, b, stride=2) + r),
           lambda x, w, r, b: fr.conv1x1_add_relu(x, w, r, b, stride=2))


def run(device: str = "cpu", quick: bool = False, out_dir: str | None = None):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, inputs, grad, eager_fn, fused_fn in _cases(device, quick):
        for label, fn in (("eager", eager_fn), ("fused", fused_fn)):
            def step():
                return torch.autograd.grad(fn(*inputs), inputs, grad)

            for _ in range(3):
                step()
            common.sync(device)
            print(f"\n==== {name} fwd+bwd, {label}: {common.time_ms(step, device, quick):.4f} ms median", flush=True)
            with profile(activities=activities) as prof:
                for _ in range(5):
                    step()
                common.sync(device)
            key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60), flush=True)
            host = cProfile.Profile()
            host.enable()
            for _ in range(20):
                step()
            host.disable()
            common.sync(device)
            text = io.StringIO()
            pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(15)
            print("host-side Python, 20 iterations:\n" + text.getvalue()[-4000:], flush=True)


if __name__ == "__main__":
    common.main_guard(run, __doc__.splitlines()[0])
