"""conv1x1_add_relu (the ResNet projection shortcut with its residual and ReLU) against eager and
torch.compile, channels_last.

    python benchmarks/bench_conv1x1.py [--device cpu|cuda] [--quick] [--out DIR]

eager is relu(conv2d(x, w, b, stride) + residual) (cuDNN / mkldnn for the convolution).
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
    """(batch, Cin, H, Cout, stride, dtype): ResNet-50's projection shortcuts at their stage sizes."""
    if device == "cuda":
        if quick:
            return [(32, 64, 56, 256, 1, "bf16")]
        return [(256, 64, 56, 256, 1, "bf16"), (256, 256, 56, 512, 2, "bf16"), (256, 512, 28, 1024, 2, "bf16"),
                (256, 1024, 14, 2048, 2, "bf16")]
    if quick:
        return [(2, 64, 28, 256, 1, "fp32")]
    return [(8, 64, 56, 256, 1, "fp32"), (8, 256, 56, 512, 2, "fp32")]


def run(device: str = "cpu", quick: bool = False, out_dir: str | None = None):
    bench = common.Bench("conv1x1", device, quick, out_dir)
    eager_fn = lambda x, w, r, b, s: torch.relu(F.conv2d(x, w, b, stride=s) + r)  # noqa: E731
    cl = torch.channels_last
    for batch, cin, hw, cout, stride, dname in cases(device, quick):
        torch._dynamo.reset()  # per case: static shapes, and no case past dynamo's recompile limit
        compiled = torch.compile(eager_fn, dynamic=False)
        dtype = common.DTYPES[dname]
        ohw = (hw - 1) // stride + 1
        x = torch.randn(batch, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=cl)
        w = (torch.randn(cout, cin, 1, 1, device=device) / cin**0.5).to(dtype).contiguous(memory_format=cl)
        r = torch.randn(batch, cout, ohw, ohw, device=device, dtype=dtype).contiguous(memory_format=cl)
        b = torch.randn(cout, device=device, dtype=dtype)
        es = x.element_size()
        M = batch * ohw * ohw
        flops = 2.0 * M * cout * cin
        nbytes = es * (M * cin + cout * cin + 2 * M * cout + cout)  # x read at the strided pixels only
        shape = f"{batch}x{cin}x{hw}x{hw}->{cout} s{stride}"
        copy_gbs = bench.copy_baseline("conv1x1_add_relu", shape, dname, r)

        def m(provider, mode, fn, fl=flops, nb=nbytes):
            bench.measure("conv1x1_add_relu", shape, dname, provider, mode, fn, flops=fl, nbytes=nb, copy=copy_gbs)

        m("conv2d alone", "fwd", lambda: F.conv2d(x, w, stride=stride), nb=None)
        m("eager", "fwd", lambda: eager_fn(x, w, r, b, stride))
        m("torch.compile", "fwd", lambda: compiled(x, w, r, b, stride))
        m("fused", "fwd", lambda: fr.conv1x1_add_relu(x, w, r, b, stride))
        if device == "cuda":  # both CUDA paths, whichever "auto" picked
            for path in ("triton", "library"):
                with use_gemm_path(path):
                    m(f"fused [{path} path]", "fwd", lambda: fr.conv1x1_add_relu(x, w, r, b, stride))

        leaves = [t.detach().requires_grad_() for t in (x, w, r, b)]
        g = torch.randn_like(r)

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(*leaves, stride), leaves, g)

        m("eager", "fwd+bwd", fwd_bwd(eager_fn), fl=3 * flops, nb=None)
        m("fused", "fwd+bwd", fwd_bwd(fr.conv1x1_add_relu), fl=3 * flops, nb=None)
        del x, w, r, b, leaves, g
        if device == "cuda":
            torch.cuda.empty_cache()
    return bench.finish()


if __name__ == "__main__":
    common.main_guard(run, __doc__.splitlines()[0])
