"""batch_norm_add_relu on 2-D (N, C) activations (the MLP block), fp32 training: eager (F.batch_norm, add, ReLU)
against fused, forward and forward + backward, medians of 200 calls. Run from the repository root:
python mlp_shapes.py (the first line printed says which fused_residual was imported)."""
import sys, time, statistics
sys.path.insert(0, "benchmarks")
from common import steady_malloc
steady_malloc()
import torch, torch.nn.functional as F
import fused_residual as fr
print("fused_residual from", fr.__file__)
def med(fn, n=200):
    for _ in range(20): fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6
for shape in [(64, 4096), (256, 2048), (128, 8192), (4096, 1024), (1024, 512)]:
    C = shape[1]
    x = torch.randn(shape, requires_grad=True); s = torch.randn(shape); g = torch.randn(shape)
    w = torch.rand(C, requires_grad=True); b = torch.randn(C, requires_grad=True); rm, rv = torch.zeros(C), torch.ones(C)
    e = lambda: torch.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5) + s)
    f = lambda: fr.batch_norm_add_relu(x, s, rm, rv, w, b, True, 0.1, 1e-5)
    fb = lambda fn: (lambda: torch.autograd.grad(fn(), (x, w, b), g))
    r = [med(e), med(f), med(fb(e)), med(fb(f))]
    print(f"{shape!s:14s} add_relu fwd eager {r[0]:7.1f} fused {r[1]:7.1f} ({r[0]/r[1]:.2f}x) | f+b eager {r[2]:7.1f} fused {r[3]:7.1f} ({r[2]/r[3]:.2f}x)")
