"""Every config of the Triton GEMM kernel, timed one by one on the target shapes of linear_add_relu.

    python benchmarks/sweep_gemm.py [--device cuda] [--quick] [--out DIR]

The autotuner keeps only its winner; this sweep records how far each tile shape, pipeline depth and warp
count is from the memory roofline (fraction of the copy kernel's bandwidth for the fused op's bytes) and
from cuBLAS (``torch.mm``), so that config lists are chosen from measurements. Rows: one per config
(provider ``BMxBNxBK sS wW``, ``pP`` for P persistent programs per SM, ``split`` for a split
epilogue, ``tma`` for TMA copies), plus ``torch.mm``, ``eager`` and the autotuned kernel (``autotuned``), whose
choice is printed at the end. On CPU it runs under the Triton interpreter on tiny shapes (a smoke test).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from . import common
except ImportError:  # run as a script
    from fused_residual._benchmarks import common

from fused_residual import _triton
from fused_residual.ops import _gemm_layout, _gemm_triton

# Configs timed besides the shipped list (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, persistent programs per
# SM, split epilogue, TMA): deeper or shallower variants of it, wider N tiles, persistent and TMA variants.
EXTRA = [(64, 256, 64, 2, 8, 0, False, False), (128, 128, 64, 2, 8, 0, True, False),
         (128, 256, 64, 4, 8, 0, True, False), (128, 128, 32, 4, 8, 0, False, False),
         (64, 64, 64, 3, 4, 0, False, False), (128, 64, 32, 3, 4, 0, False, False),
         (128, 128, 64, 4, 8, 1, True, False), (64, 128, 64, 3, 4, 2, False, False),
         (64, 64, 64, 2, 4, 4, False, False), (128, 256, 64, 4, 8, 0, True, True),
         (128, 256, 64, 3, 8, 1, True, True), (128, 128, 64, 3, 8, 0, False, True),
         (64, 256, 64, 3, 8, 0, False, True), (128, 64, 64, 3, 4, 2, False, True)]


def shapes(device: str, quick: bool):
    """(label, M, N, K, K2 or 0)."""
    if device != "cuda":
        return [("interpreter smoke", 96, 48, 40, 0)]
    if quick:
        return [("shortcut", 65536, 256, 64, 0)]
    return [
        ("rn50 shortcut l1", 802816, 256, 64, 0),
        ("rn50 shortcut l2", 200704, 512, 256, 0),
        ("compute 12544", 12544, 2048, 1024, 0),
        ("dual rn50 l2", 200704, 512, 128, 256),
        ("rn50 l3 shortcut", 50176, 1024, 512, 0),
    ]


def configs(device: str):
    K = _triton.kernels("gemm_add_relu")
    if device != "cuda":
        return [K.make_config(32, 32, 16, 2, 4, group=2), K.make_config(32, 32, 16, 2, 4, group=2, persistent=1),
                K.make_config(32, 32, 16, 2, 4, group=2, split=True),
                K.make_config(32, 32, 16, 2, 4, group=2, tma=True)]
    extra = [K.make_config(bm, bn, bk, s, w, persistent=p, split=x, tma=t) for bm, bn, bk, s, w, p, x, t in EXTRA]
    capability = torch.cuda.get_device_capability()
    return [c for c in list(K.CONFIG_SETS["16-bit"]) + extra if K.runs_on(c, capability)]


def label(cfg) -> str:
    k = cfg.kwargs
    persistent = f" p{k['PERSISTENT']}" if k["PERSISTENT"] else ""
    split = " split" if k["EPILOGUE_SPLIT"] else ""
    tma = " tma" if k["TMA"] else ""
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} s{cfg.num_stages} w{cfg.num_warps}{persistent}{split}{tma}"


def run(device: str = "cuda", quick: bool = False, out_dir: str | None = None):
    if device == "cpu" and not _triton.interpreting():
        raise RuntimeError("sweep_gemm on CPU needs TRITON_INTERPRET=1 (set before triton is imported)")
    # fp16 on CPU (the interpreter's bf16 is raw bits; fp16 keeps the TMA config in the smoke test)
    dtype, dname = (torch.bfloat16, "bf16") if device == "cuda" else (torch.float16, "fp16")
    cfgs = configs(device)
    cases = shapes(device, quick)
    bench = common.Bench("sweep_gemm", device, quick, out_dir, total=len(cases) * (len(cfgs) + 4))
    for name, M, N, K, K2 in cases:
        es = torch.empty((), dtype=dtype).element_size()
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
        b = torch.randn(N, device=device, dtype=dtype)
        out = torch.empty(M, N, device=device, dtype=dtype)
        if K2:
            s = torch.randn(M, K2, device=device, dtype=dtype)
            ws = (torch.randn(N, K2, device=device) / K2**0.5).to(dtype)
            operands, residual = [_gemm_layout.Operand(x, w), _gemm_layout.Operand(s, ws)], None
            eager = lambda: torch.relu(F.linear(x, w, b) + F.linear(s, ws))  # noqa: E731
            nbytes = es * (M * K + N * K + M * K2 + N * K2 + N + M * N)
        else:
            r = torch.randn(M, N, device=device, dtype=dtype)
            operands, residual = [_gemm_layout.Operand(x, w)], r
            eager = lambda: torch.relu(F.linear(x, w, b) + r)  # noqa: E731
            nbytes = es * (M * K + N * K + 2 * M * N + N)
        flops = 2.0 * M * N * (K + K2)
        op, shape = name, f"M{M} N{N} K{K}" + (f"+{K2}" if K2 else "")
        copy = bench.copy_baseline(op, shape, dname, out)

        def m(provider, fn):
            bench.measure(op, shape, dname, provider, "fwd", fn, flops=flops, nbytes=nbytes, copy=copy)

        if K2:  # both products, as the fused kernel computes them
            m("torch.mm", lambda: torch.mm(x, w.t(), out=out).addmm_(s, ws.t()))
        else:
            m("torch.mm", lambda: torch.mm(x, w.t(), out=out))
        m("eager", eager)
        m("autotuned", lambda: _gemm_triton.triton_gemm(operands, b, residual, out))
        for cfg in cfgs:
            m(label(cfg), lambda cfg=cfg: _gemm_triton.triton_gemm(operands, b, residual, out, config=cfg))
        del x, w, b, out, operands, residual
        if device == "cuda":
            torch.cuda.empty_cache()
    return bench.finish()


if __name__ == "__main__":
    common.main_guard(run, __doc__.splitlines()[0])
