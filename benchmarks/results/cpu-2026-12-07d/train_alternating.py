"""ResNet-50 training step (SGD, fp32, channels_last), eager against the converted model in one process, with
glibc malloc held steady: steps timed in pairs (one eager, one converted; the order alternates), so that the
VM's drifting speed cancels in each pair's ratio. Prints the median step times and the median and quartiles
of the per-pair speedups. Usage: train_alternating.py BATCH SIZE PAIRS."""
import copy, statistics, sys, time

sys.path.insert(0, "benchmarks")
from common import steady_malloc  # noqa: E402

steady_malloc()
import torch, torch.nn.functional as F, torchvision  # noqa: E402
import fused_residual as fr  # noqa: E402

batch, size, pairs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
base = torchvision.models.resnet50().to(memory_format=torch.channels_last).train()
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (batch,))


def stepper(m):
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def step():
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


eager, fused = stepper(base), stepper(fr.convert(copy.deepcopy(base)))
for s in (eager, fused, eager, fused):
    s()
times = {eager: [], fused: []}
for i in range(pairs):
    for s in ((eager, fused) if i % 2 == 0 else (fused, eager)):
        t0 = time.perf_counter()
        s()
        times[s].append((time.perf_counter() - t0) * 1e3)
ratio = [e / f for e, f in zip(times[eager], times[fused])]
q = statistics.quantiles(ratio, n=4)
print(f"b{batch} {size}px, torch {torch.__version__}, {torch.get_num_threads()} threads, {pairs} pairs: "
      f"eager {statistics.median(times[eager]):.1f} ms, fused {statistics.median(times[fused]):.1f} ms, "
      f"speedup {statistics.median(ratio):.3f}x (quartiles {q[0]:.3f}-{q[2]:.3f})")
