"""ResNet-50 training step (b4, 112 px, fp32, channels_last) under torch.compile (default policy): the compiled
unconverted model against the compiled converted one, steps timed in pairs in alternating order (30 pairs);
prints the median times and the median of the pairs ratios. Usage: compile_alternating.py"""
import copy, statistics, sys, time
sys.path.insert(0, "benchmarks")
from common import steady_malloc
steady_malloc()
import torch, torch.nn.functional as F, torchvision
import fused_residual as fr
torch.manual_seed(0)
base = torchvision.models.resnet50().to(memory_format=torch.channels_last).train()
x = torch.randn(4, 3, 112, 112).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (4,))
def stepper(m):
    cm = torch.compile(m)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    def step():
        F.cross_entropy(cm(x), y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return step
a, b = stepper(base), stepper(fr.convert(copy.deepcopy(base)))
for s in (a, b, a, b): s()
ta, tb = [], []
for i in range(30):
    for s in ((a, b) if i % 2 == 0 else (b, a)):
        t0 = time.perf_counter(); s(); (ta if s is a else tb).append(time.perf_counter() - t0)
r = [p / q for p, q in zip(ta, tb)]
print(f"compiled eager {statistics.median(ta)*1e3:.1f} ms, compiled converted {statistics.median(tb)*1e3:.1f} ms, ratio {statistics.median(r):.3f}")
