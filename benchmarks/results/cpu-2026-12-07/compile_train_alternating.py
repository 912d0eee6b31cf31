import copy, time, torch, torchvision, fused_residual as fr
import torch.nn.functional as F
torch.manual_seed(0)
base = torchvision.models.resnet50().to(memory_format=torch.channels_last)
fused = fr.convert(copy.deepcopy(base))
x = torch.randn(4, 3, 112, 112).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 1000, (4,))
cb, cf = torch.compile(base), torch.compile(fused)
def step(m, c):
    loss = F.cross_entropy(c(x), y); loss.backward()
    for p in m.parameters(): p.grad = None
for _ in range(3): step(base, cb); step(fused, cf)
for rep in range(4):
    for name, m, c in (("compile", base, cb), ("compile+fused", fused, cf)):
        ts = []
        for _ in range(6):
            t0 = time.perf_counter(); step(m, c); ts.append(time.perf_counter() - t0)
        ts.sort(); print(name, "%.1f" % (ts[3]*1e3), end="  ")
    print()
# guard cost: forward only no grad
with torch.no_grad():
    for name, c in (("compile", cb), ("compile+fused", cf)):
        xs = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
