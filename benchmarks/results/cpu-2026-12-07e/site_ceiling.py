"""How much of a ResNet-50 training step (SGD, fp32, channels_last) the 48 fused BN sites cost, and so the most
any BN + ReLU / BN + add + ReLU fusion can gain. Three models in one process, with glibc malloc held steady:

  eager   the torchvision model as it is;
  fused   fr.convert() of it;
  zero    fr.convert() of it with batch_norm_relu / batch_norm_add_relu replaced by a stand-in that costs
          nothing: it returns a fixed ReLU'd random tensor of the right shape (the values stay sane, so the
          convolutions run on the same kind of data) and passes the gradient straight back to x (and skip).

Steps run in rounds of three, the order rotating and reversing every round so the VM's drifting speed cancels.
A site's cost in the step is (model step - zero step), paired within a round; "ceiling" is eager / zero.
Usage: site_ceiling.py BATCH SIZE ROUNDS."""
import copy, statistics, sys, time

sys.path.insert(0, "benchmarks")
from common import steady_malloc  # noqa: E402

steady_malloc()
import torch, torch.nn.functional as F, torchvision  # noqa: E402
import fused_residual as fr  # noqa: E402
import fused_residual.functional as FF  # noqa: E402  (the integrations call the functions through it)

batch, size, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
_fixed = {}


def _stand_in(x):
    if x.shape not in _fixed:
        _fixed[x.shape] = torch.randn(x.shape).relu_().contiguous(memory_format=torch.channels_last)
    return _fixed[x.shape]


class _Free(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skip):
        ctx.has_skip = skip is not None
        return _stand_in(x)

    @staticmethod
    def backward(ctx, g):
        return g, (g if ctx.has_skip else None)


real = (FF.batch_norm_relu, FF.batch_norm_add_relu)
free = (lambda x, *a, **k: _Free.apply(x, None), lambda x, s, *a, **k: _Free.apply(x, s))
torch.manual_seed(0)
base = torchvision.models.resnet50().to(memory_format=torch.channels_last).train()
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (batch,))


def stepper(m, fns):
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

    def step():
        FF.batch_norm_relu, FF.batch_norm_add_relu = fns
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


steps = {"eager": stepper(base, real), "fused": stepper(fr.convert(copy.deepcopy(base)), real),
         "zero": stepper(fr.convert(copy.deepcopy(base)), free)}
for s in list(steps.values()) * 2:
    s()
times = {k: [] for k in steps}
names = list(steps)
for i in range(rounds):
    order = names[i % 3:] + names[:i % 3]
    for k in (order[::-1] if (i // 3) % 2 else order):
        t0 = time.perf_counter()
        steps[k]()
        times[k].append((time.perf_counter() - t0) * 1e3)
E, Fu, Z = times["eager"], times["fused"], times["zero"]
med = statistics.median
print(f"b{batch} {size}px, torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds: "
      f"median step eager {med(E):.1f} ms, fused {med(Fu):.1f} ms, zero-cost sites {med(Z):.1f} ms")
print(f"  site cost in the step: eager {med([e - z for e, z in zip(E, Z)]):.2f} ms, "
      f"fused {med([f - z for f, z in zip(Fu, Z)]):.2f} ms")
print(f"  speedup over eager: fused {med([e / f for e, f in zip(E, Fu)]):.3f}x, "
      f"ceiling (zero-cost sites) {med([e / z for e, z in zip(E, Z)]):.3f}x")
