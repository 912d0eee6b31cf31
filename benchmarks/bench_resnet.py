"""ResNet end to end: a torchvision ResNet converted with fused_residual.convert, checked against the
unconverted model, then a training step and inference timed for eager, fused, torch.compile and
torch.compile + fused, with images/s and peak memory. Inference also times eager with conv+BN folded by
PyTorch's own FX pass, since the converted model folds them too ("fused" over that row is what the fused
tails add beyond BN folding), and the model frozen by fused_residual.freeze (BN folded once), eager and
compiled.

    python benchmarks/bench_resnet.py [--device cpu|cuda] [--quick] [--out DIR]
    fused-residual resnet [--model resnet50] [--batch N] [--dtype bf16] [--device cuda] [--no-compile]

Defaults: CUDA: resnet50, batch 256, bf16, channels_last; CPU: resnet50, batch 8, fp32, channels_last.
The BN layers get non-trivial statistics and affine parameters first, so that folding is exercised.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

try:
    from . import common
except ImportError:  # run as a script
    from fused_residual._benchmarks import common

import fused_residual as fr


def _bn_folded(model):
    """An eval-mode copy of ``model`` with each conv+BN pair folded by PyTorch's FX pass, or None where that
    pass cannot trace the model."""
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(copy.deepcopy(model).eval())
    except Exception as exc:  # noqa: BLE001 (a model FX cannot trace: no such baseline)
        print(f"no BN-folded eager baseline: {type(exc).__name__}: {exc}", flush=True)
        return None
    return folded.to(memory_format=torch.channels_last)


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.3, 0.3)
    return model


def defaults(device: str, quick: bool) -> dict:
    if device == "cuda":
        return dict(model="resnet18", batch=32, dtype="bf16", image_size=224, steps=3) if quick else \
            dict(model="resnet50", batch=256, dtype="bf16", image_size=224, steps=10)
    return dict(model="resnet18", batch=2, dtype="fp32", image_size=64, steps=2) if quick else \
        dict(model="resnet50", batch=8, dtype="fp32", image_size=224, steps=3)


def _timed(step, steps: int, device: str) -> tuple[float, float | None, float | None]:
    """(median ms per call, peak MiB during the timed calls (CUDA), minor page faults per call (CPU)) after
    warm-up calls (compilation happens there)."""
    for _ in range(2):
        step()
    common.sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    faults = common.minor_faults()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 + base / 2**20 if device == "cuda" else None
    faults = (common.minor_faults() - faults) / steps if device == "cpu" else None
    return statistics.median(times) * 1e3, peak, faults


def parity(base, fused, x, frozen=None) -> dict:
    """Relative max error of the converted model against the unconverted one (eval, then train forward),
    and of the frozen model in eval."""
    out = {}
    for mode in ("eval", "train"):
        a, b = copy.deepcopy(base).train(mode == "train"), copy.deepcopy(fused).train(mode == "train")
        with torch.no_grad():
            ref, got = a(x).float(), b(x).float()
        out[mode] = ((got - ref).abs().max() / ref.abs().max()).item()
    if frozen is not None:
        with torch.no_grad():
            ref, got = copy.deepcopy(base).eval()(x).float(), frozen(x).float()
        out["frozen"] = ((got - ref).abs().max() / ref.abs().max()).item()
    return out


def models() -> list[str]:
    """The torchvision ResNet builders (resnet18 ... wide_resnet101_2): the models whose blocks convert."""
    import torchvision

    return [name for name in torchvision.models.resnet.__all__ if name[0].islower()]


def check_model(model: str | None) -> None:
    if model is not None and model not in models():
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(models())}")


def run(device: str = "cpu", quick: bool = False, out_dir: str | None = None, model: str | None = None,
        batch: int | None = None, dtype: str | None = None, image_size: int | None = None, steps: int | None = None,
        compile: bool = True, train: bool = True, infer: bool = True, variants: tuple[str, ...] | None = None,
        check: bool = True):
    """``variants``: a subset of eager, fused, torch.compile, compile + fused (default: all four, or the first
    two with ``compile=False``); ``check=False`` skips the parity check against the unconverted model."""
    import torchvision

    check_model(model)
    cfg = defaults(device, quick)
    model = model if model is not None else cfg["model"]
    batch = batch if batch is not None else cfg["batch"]
    dname = dtype if dtype is not None else cfg["dtype"]
    image_size = image_size if image_size is not None else cfg["image_size"]
    steps = steps if steps is not None else cfg["steps"]
    tdtype = common.DTYPES[dname]
    cl = torch.channels_last
    bench = common.Bench("resnet", device, quick, out_dir)
    base = _randomize_bn(getattr(torchvision.models.resnet, model)()).to(device=device, dtype=tdtype, memory_format=cl)
    fused = fr.convert(copy.deepcopy(base))
    print(fr.conversion_report(fused), flush=True)
    x = torch.randn(batch, 3, image_size, image_size, device=device, dtype=tdtype).contiguous(memory_format=cl)
    y = torch.randint(0, 1000, (batch,), device=device)
    shape = f"b{batch} {image_size}px"

    frozen = fr.freeze(base) if infer else None
    if frozen is not None:
        print(frozen.report.__str__().splitlines()[0], flush=True)
    err = parity(base, fused, x[: min(batch, 8)], frozen) if check else {}
    tol = 1e-4 if tdtype == torch.float32 else 5e-2
    for mode, e in err.items():
        verdict = "ok" if e <= tol else "MISMATCH"
        which = "frozen" if mode == "frozen" else "converted"
        print(f"parity {mode}: {which} vs unconverted max relative error {e:.2e} ({verdict}, tolerance {tol:g})",
              flush=True)
        bench.add(common.Row(f"{model} parity", shape, dname, f"{'frozen' if mode == 'frozen' else 'fused'} vs eager",
                             mode, 0.0, e, "rel err"))

    # Inference baseline with conv+BN folded by PyTorch (torch.fx.experimental.optimization.fuse): the
    # converted model folds them too, so the "fused" speed-up over it is what the fused tails add on top.
    timed = variants is None or "eager, BN folded" in variants
    folded = _bn_folded(base) if infer and timed else None  # (a third model in memory: only when timed)
    runs = [("eager", base, False), ("eager, BN folded", folded, False), ("fused", fused, False),
            ("frozen", frozen, False)]
    if compile:
        runs += [("torch.compile", base, True), ("compile + fused", fused, True), ("compile + frozen", frozen, True)]
    if variants is not None:
        runs = [r for r in runs if r[0] in variants]
    for mode in [m for m, on in (("train", train), ("infer", infer)) if on]:
        for name, module, compiled in runs:
            if module is None or (module in (folded, frozen) and mode == "train"):  # (inference only)
                continue
            net = copy.deepcopy(module).train(mode == "train")
            fn = torch.compile(net) if compiled else net
            if mode == "train":
                opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

                def step():
                    loss = F.cross_entropy(fn(x).float(), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            else:
                def step():
                    with torch.inference_mode():
                        fn(x)
            t0 = time.perf_counter()
            try:
                ms, peak, faults = _timed(step, steps, device)
            except Exception as exc:  # e.g. a compile failure: report it and go on with the others
                bench.fail(f"{model} {mode} {name}", exc)
                continue
            bench.add(common.Row(f"{model} {mode}", shape, dname, name, mode, ms, batch / ms * 1e3, "img/s",
                                 peak_mem_mb=peak, faults_per_call=faults))
            print(f"    ({time.perf_counter() - t0:.0f}s including warm-up/compilation)", flush=True)
            del net, fn
            if device == "cuda":
                torch.cuda.empty_cache()
    return bench.finish()


if __name__ == "__main__":
    common.main_guard(run, __doc__.splitlines()[0])
