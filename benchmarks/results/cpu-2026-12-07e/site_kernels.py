"""The four C++ kernels of the fused BN sites of ResNet-50 at batch 4, 112 px (fp32, channels_last), warm, one
shape at a time: statistics, normalise (+ add) + ReLU, the backward's per-channel sums and its elementwise
pass (dx, and dskip at the add sites), medians of 300 calls, with a copy of x for scale; the last line weighs
each shape by its count in the model. Run from the repository root: python site_kernels.py"""
import statistics, sys, time

sys.path.insert(0, "benchmarks")
from common import steady_malloc  # noqa: E402

steady_malloc()
import torch  # noqa: E402
from fused_residual.ops import batch_norm as B  # noqa: E402

K = B._cpp_kernels()


def median_us(fn, n=300):
    for _ in range(30):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


# (with the add, shape, calls per step)
SITES = [(0, (4, 64, 28, 28), 6), (1, (4, 256, 28, 28), 3), (0, (4, 128, 28, 28), 1), (0, (4, 128, 14, 14), 7),
         (1, (4, 512, 14, 14), 4), (0, (4, 256, 14, 14), 1), (0, (4, 256, 7, 7), 11), (1, (4, 1024, 7, 7), 6),
         (0, (4, 512, 7, 7), 1), (0, (4, 512, 4, 4), 5), (1, (4, 2048, 4, 4), 3)]
total = 0.0
for add, shape, count in SITES:
    C = shape[1]
    x, dy, s = (torch.randn(shape).contiguous(memory_format=torch.channels_last) for _ in range(3))
    out, dx, ds = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    skip, dskip = (s, ds) if add else (None, None)
    mask = torch.randint(0, 256, ((x.numel() + 7) // 8,), dtype=torch.uint8)
    mean, var, sg, sgx, a, b, d = (torch.rand(C) for _ in range(7))
    t = [median_us(lambda: K.bn_stats(x, C, 1, mean, var)),
         median_us(lambda: K.bn_apply(x, skip, mean, a, b, out, mask, C, 1)),
         median_us(lambda: K.bn_bwd_reduce(dy, x, None, mask, mean, C, 1, sg, sgx)),
         median_us(lambda: K.bn_bwd_apply(dy, x, None, mask, mean, a, b, d, dx, dskip, C, 1)),
         median_us(lambda: out.copy_(x))]
    total += sum(t[:4]) * count
    print(f"add={add} {shape!s:18s} x{count:2d} stats {t[0]:6.1f} apply {t[1]:6.1f} bwd sums {t[2]:6.1f} "
          f"bwd apply {t[3]:6.1f} us | copy {t[4]:6.1f} us")
print(f"per step: {total / 1e3:.2f} ms of kernels")
