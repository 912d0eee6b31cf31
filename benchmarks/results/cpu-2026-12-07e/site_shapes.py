"""The 48 BN sites of ResNet-50 at batch 4, 112 px (fp32, channels_last, training), one shape at a time on warm
data: eager (F.batch_norm, in-place add and ReLU, as the torchvision blocks) against the fused op, forward
and forward + backward (torch.autograd.grad for x, weight and bias), medians of 200 calls; the last line
weighs each shape by its count in the model. Run from the repository root: python site_shapes.py"""
import sys, time, statistics
sys.path.insert(0, "benchmarks")
from common import steady_malloc
steady_malloc()
import torch, torch.nn.functional as F
import fused_residual as fr
def t(fn, n=200):
    for _ in range(20): fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6
# (with the add, shape, calls per step)
SH = [(0,(4,64,28,28),6),(1,(4,256,28,28),3),(0,(4,128,28,28),1),(0,(4,128,14,14),7),(1,(4,512,14,14),4),(0,(4,256,14,14),1),
      (0,(4,256,7,7),11),(1,(4,1024,7,7),6),(0,(4,512,7,7),1),(0,(4,512,4,4),5),(1,(4,2048,4,4),3)]
tot = [0]*4
for add, shape, cnt in SH:
    C = shape[1]
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    s = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    w = torch.rand(C, requires_grad=True); b = torch.randn(C, requires_grad=True); rm, rv = torch.zeros(C), torch.ones(C)
    if add:
        e = lambda: torch.relu_(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5).add_(s))
        f = lambda: fr.batch_norm_add_relu(x, s, rm, rv, w, b, True, 0.1, 1e-5)
    else:
        e = lambda: torch.relu_(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
        f = lambda: fr.batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5)
    def fb(fn):
        def r():
            o = fn(); torch.autograd.grad(o, (x, w, b), g)
        return r
    r = [t(e), t(f), t(fb(e)), t(fb(f))]
    for i in range(4): tot[i] += r[i] * cnt
    print(f"add={add} {shape!s:18s} x{cnt:2d} fwd eager {r[0]:6.1f} fused {r[1]:6.1f} | f+b eager {r[2]:6.1f} fused {r[3]:6.1f}")
print("per step (ms): fwd eager %.2f fused %.2f | f+b eager %.2f fused %.2f" % tuple(v / 1e3 for v in tot))
