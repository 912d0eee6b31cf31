"""A/B host overhead and CPU op timings for the package found first on sys.path."""
import ctypes, sys, time, statistics
libc = ctypes.CDLL(None); libc.mallopt(-3, 1 << 30); libc.mallopt(-1, 2**31 - 1)
import torch, torch.nn.functional as F
import fused_residual as fr
print(fr.__file__)
def wall(fn, calls=200, reps=7):
    for _ in range(5): fn()
    s=[]
    for _ in range(reps):
        t0=time.perf_counter()
        for _ in range(calls): fn()
        s.append((time.perf_counter()-t0)/calls)
    return statistics.median(s)*1e6
t = lambda *s: torch.randn(*s)
z, sk = t(16, 64), t(16, 64)
zg, sg = z.clone().requires_grad_(), sk.clone().requires_grad_()
x, w, r, b = t(16, 64), t(32, 64), t(16, 32), t(32)
xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
bx, bs, bw, bb = t(4, 16, 3, 3), t(4, 16, 3, 3), t(16), t(16)
rm, rv = torch.zeros(16), torch.ones(16)
bxg = bx.clone().requires_grad_()
res = {
 "add_relu fwd": wall(lambda: fr.add_relu(z, sk)),
 "add_relu fwd+bwd": wall(lambda: torch.autograd.grad(fr.add_relu(zg, sg).sum(), (zg, sg))),
 "add_relu_ fwd": wall(lambda: fr.add_relu_(z.clone(), sk)),
 "linear fwd": wall(lambda: fr.linear_add_relu(x, w, r, b)),
 "linear fwd+bwd": wall(lambda: torch.autograd.grad(fr.linear_add_relu(xg, wg, r, b).sum(), (xg, wg))),
 "bn_add_relu fwd": wall(lambda: fr.batch_norm_add_relu(bx, bs, rm, rv, bw, bb, True)),
 "bn_add_relu fwd+bwd": wall(lambda: torch.autograd.grad(fr.batch_norm_add_relu(bxg, bs, rm, rv, bw, bb, True).sum(), (bxg,))),
}
for k, v in res.items(): print(f"{k:22s} {v:8.2f} us")
