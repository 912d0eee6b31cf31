"""ResNet-50 training step (SGD, fp32, channels_last), eager against the converted model, timed alternately
in one process (8 rounds of 4 steps each) with glibc malloc held steady. Usage: train_alternating.py BATCH
SIZE. (At commit c08b3df it also took BN-fusion size thresholds: train_alternating_thresholds.txt.)"""
import copy, statistics, sys, time

sys.path.insert(0, "benchmarks")
from common import steady_malloc  # noqa: E402

steady_malloc()
import torch, torch.nn.functional as F, torchvision  # noqa: E402
import fused_residual as fr  # noqa: E402

batch, size = int(sys.argv[1]), int(sys.argv[2])
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


steps = {"eager": stepper(base), "fused": stepper(fr.convert(copy.deepcopy(base)))}
times = {k: [] for k in steps}
for s in steps.values():
    s(), s()
for _ in range(8):
    for k, s in steps.items():
        s()
        for _ in range(4):
            t0 = time.perf_counter()
            s()
            times[k].append((time.perf_counter() - t0) * 1e3)
med = {k: statistics.median(v) for k, v in times.items()}
print(f"b{batch} {size}px, torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {len(times['eager'])}")
for k, v in med.items():
    print(f"  {k:6s} {v:7.1f} ms  {med['eager'] / v:.3f}x eager")
