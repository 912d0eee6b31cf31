"""ResNet-50 training step (SGD, fp32, channels_last), eager against the converted model with the fused
BN ops used from `threshold` elements per call on CPU, the variants timed alternately in one process with
glibc malloc held steady. Usage: train_alternating.py BATCH SIZE [THRESHOLD ...] (default: 0 and 1M)."""
import copy, statistics, sys, time

sys.path.insert(0, "benchmarks")
from common import steady_malloc  # noqa: E402

steady_malloc()
import torch, torch.nn.functional as F, torchvision  # noqa: E402
import fused_residual as fr  # noqa: E402
from fused_residual.integrations import _common  # noqa: E402

batch, size = int(sys.argv[1]), int(sys.argv[2])
thresholds = [int(t) for t in sys.argv[3:]] or [0, 1 << 20]
torch.manual_seed(0)
base = torchvision.models.resnet50().to(memory_format=torch.channels_last).train()
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (batch,))


def stepper(m, threshold=None):
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def step():
        if threshold is not None:
            _common.CPU_BN_MIN_ELEMENTS = threshold
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


steps = {"eager": stepper(base)}
for t in thresholds:
    steps[f"fused (BN from {t} elements)"] = stepper(fr.convert(copy.deepcopy(base)), t)
times = {k: [] for k in steps}
for s in steps.values():
    s(), s()
for _ in range(4):
    for k, s in steps.items():
        s()
        for _ in range(4):
            t0 = time.perf_counter()
            s()
            times[k].append((time.perf_counter() - t0) * 1e3)
med = {k: statistics.median(v) for k, v in times.items()}
print(f"b{batch} {size}px, torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {len(times['eager'])}")
for k, v in med.items():
    print(f"  {k:34s} {v:7.1f} ms  {med['eager'] / v:.3f}x eager")
