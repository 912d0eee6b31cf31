"""Eval-mode parity of converted torchvision / timm ResNets against the unconverted models (fp32, CPU).

    .venv/bin/python benchmarks/results/cpu-2026-11-30-run2/parity.py > benchmarks/results/cpu-2026-11-30-run2/parity.txt

The error is bench_resnet.parity's: max |converted - unconverted| / max |unconverted| over the logits, after
bench_resnet._randomize_bn (non-trivial BN statistics and affine parameters, so that folding is exercised).
Input 2x3x64x64, default 1000 classes, three seeds, channels_last (as bench_resnet) and contiguous.
torchvision's and timm's resnet18 / resnet50 draw the same initial weights from the same seed and differ
only in the last BN weight of each block (timm zero-initialises it), which _randomize_bn overwrites: so the
two libraries' rows agree, while each runs its own converted block classes.
"""

import copy
import datetime
import subprocess
import sys

import timm
import torch
import torchvision

import fused_residual as fr
from fused_residual._benchmarks.bench_resnet import _randomize_bn

MODELS = {
    "torchvision resnet18": lambda: torchvision.models.resnet18(),
    "torchvision resnet50": lambda: torchvision.models.resnet50(),
    "timm resnet18": lambda: timm.create_model("resnet18"),
    "timm resnet50": lambda: timm.create_model("resnet50"),
}


def main():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.split("\n")
    print(f"# {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, commit {commit} "
          f"({sum(bool(x) for x in dirty)} tracked files modified), python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} threads, backend on CPU: {fr._backend.resolve(torch.device('cpu'))}")
    print("# command: .venv/bin/python benchmarks/results/cpu-2026-11-30-run2/parity.py")
    print(f"{'model':22s} {'format':17s} {'seed':>4s} {'rel err':>10s}")
    worst = {}
    for name, make in MODELS.items():
        for fmt in (torch.channels_last, torch.contiguous_format):
            for seed in range(3):
                torch.manual_seed(seed)
                base = _randomize_bn(make()).eval().to(memory_format=fmt)
                fused = fr.convert(copy.deepcopy(base)).eval()
                if fmt is torch.channels_last and seed == 0:
                    print(f"# {name}: {fr.conversion_report(fused)}")
                x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
                with torch.no_grad():
                    ref, got = base(x).float(), fused(x).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                worst[name] = max(worst.get(name, 0.0), err)
                print(f"{name:22s} {str(fmt).split('.')[-1]:17s} {seed:4d} {err:10.3e}", flush=True)
    print()
    for name, err in worst.items():
        print(f"max over seeds and formats: {name:22s} {err:.3e}")
    print(f"range of the maxima: {min(worst.values()):.2e} to {max(worst.values()):.2e}")


if __name__ == "__main__":
    main()
