"""ResNet-50 inference on CPU (fp32, channels_last): eager, eager with conv+BN folded by PyTorch's FX pass,
and fused_residual.freeze, timed alternately in one process (medians of 8 calls per block, 4 blocks)."""
import copy, sys, time
import torch, torchvision
from torch.fx.experimental.optimization import fuse
import fused_residual as fr

batch, size = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = torchvision.models.resnet50()
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
        torch.nn.init.uniform_(m.weight, 0.5, 1.5); torch.nn.init.uniform_(m.bias, -0.3, 0.3)
model = model.eval().to(memory_format=torch.channels_last)
variants = {"eager": model, "eager, BN folded": fuse(copy.deepcopy(model)), "frozen": fr.freeze(model)}
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    ref = model(x)
    for name, m in variants.items():
        print(f"{name}: rel err {((m(x) - ref).abs().max() / ref.abs().max()).item():.2e}")
    times = {k: [] for k in variants}
    for block in range(4):
        for name, m in variants.items():
            ts = []
            for _ in range(8):
                t0 = time.perf_counter(); m(x); ts.append(time.perf_counter() - t0)
            times[name].append(sorted(ts)[4] * 1e3)
for name, ts in times.items():
    print(f"{name:18s} " + " ".join(f"{t:7.2f}" for t in ts) + f"   mean {sum(ts) / len(ts):7.2f} ms   "
          f"{sum(times['eager']) / sum(ts):.3f}x eager")
