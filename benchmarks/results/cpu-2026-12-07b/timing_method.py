"""ResNet-50 inference (fp32, channels_last): eager, FX-folded, frozen; timed sequentially (each model's calls
back to back) or alternately (blocks of calls, models in turn), with glibc malloc as is or held steady
(mallopt: no trimming, no mmap for large blocks). Reports median ms and minor page faults per call."""
import copy, ctypes, resource, sys, time
mode, malloc = sys.argv[1], sys.argv[2]
batch, size = int(sys.argv[3]), int(sys.argv[4])
if malloc == "steady":
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    assert libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
import torch, torchvision
from torch.fx.experimental.optimization import fuse
import fused_residual as fr
torch.manual_seed(0)
model = torchvision.models.resnet50()
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
        torch.nn.init.uniform_(m.weight, 0.5, 1.5); torch.nn.init.uniform_(m.bias, -0.3, 0.3)
model = model.eval().to(memory_format=torch.channels_last)
variants = {"eager": model, "fx-folded": fuse(copy.deepcopy(model)), "frozen": fr.freeze(model)}
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times = {k: [] for k in variants}; flt = {k: 0 for k in variants}; calls = {k: 0 for k in variants}
def block(name, n):
    m = variants[name]; m(x)  # one untimed call per block
    f0 = faults()
    for _ in range(n):
        t0 = time.perf_counter(); m(x); times[name].append((time.perf_counter() - t0) * 1e3)
    flt[name] += faults() - f0; calls[name] += n
with torch.inference_mode():
    for m in variants.values(): m(x); m(x)
    if mode == "sequential":
        for name in variants: block(name, 32)
    else:
        for _ in range(4):
            for name in variants: block(name, 8)
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(f"{mode:11s} malloc={malloc:7s} b{batch} {size}px  " + "  ".join(
    f"{k} {med[k]:6.1f} ms ({flt[k] / calls[k]:5.0f} flt)" for k in variants)
    + f"  frozen {med['eager'] / med['frozen']:.2f}x eager, {med['fx-folded'] / med['frozen']:.2f}x folded")
