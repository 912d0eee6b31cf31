"""The ``fused-residual`` command."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args) -> int:
    import torch

    from . import __version__, _backend

    print(f"fused_residual {__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__}")
    ok, interpreting, why = _backend.triton_status()
    print(f"triton   {why}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"device   cuda: {names} (CUDA {torch.version.cuda})")
    else:
        print(f"device   cpu only ({torch.backends.cpu.get_cpu_capability()}, "
              f"{torch.get_num_threads()} threads); no CUDA device")
    cpp_ok, cpp_why = _backend.cpp_status()
    print(f"C++      {'built: ' if cpp_ok else 'NOT available: '}{cpp_why}")
    try:
        print(f"backend  {_backend.current_backend()} (FUSED_RESIDUAL_BACKEND / use_backend)")
        status = 0
    except ValueError as exc:  # a bad FUSED_RESIDUAL_BACKEND: say so, and still list the backends
        print(f"backend  INVALID: {exc}")
        status = 1
    print("backends that can run here:")
    for name in _backend.BACKENDS[1:]:
        for device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            with _backend.use_backend(name):
                try:
                    _backend.resolve(torch.device(device))
                    verdict = "yes"
                except _backend.BackendUnavailable as exc:
                    verdict = f"no ({exc})"
            print(f"  {name:7s} on {device}: {verdict}")
    return status


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fused-residual: --device cuda but no CUDA device is available")
    return name


def _verify(args) -> int:
    from . import verify

    device = _device(args.device)
    print(f"verifying fused_residual on {device} (backend {args.backend or 'auto'}, "
          f"{'quick grid' if args.quick else 'full grid'})", flush=True)
    checks = verify.run(device=device, backend=args.backend, quick=args.quick,
                        progress=lambda line: print(line, flush=True))
    failed = [c for c in checks if not c.ok]
    shown = checks if args.all else [c for c in checks if not c.ok or "forward" in c.what]
    print(verify.format_table(shown))
    ops = sorted({c.op for c in checks})
    print(f"\n{len(checks)} checks over {', '.join(ops)}: {len(checks) - len(failed)} passed, {len(failed)} failed"
          + ("" if args.all else " (forward rows and failures shown; --all for every gradient row)"))
    return 1 if failed else 0


BENCHES = ("add_relu", "batch_norm", "compile", "linear", "conv1x1", "overhead", "resnet")


def _bench(args) -> int:
    import importlib

    device = _device(args.device)
    module = importlib.import_module(f"fused_residual._benchmarks.bench_{args.which}")
    from ._benchmarks import common

    failed = len(common.FAILURES)
    rows = module.run(device=device, quick=args.quick, out_dir=args.out)
    return common.exit_status(rows, failed)  # a provider failed, or a parity row is off (bench resnet)


def _resnet(args) -> int:
    from ._benchmarks import bench_resnet, common

    device = _device(args.device)
    try:
        bench_resnet.check_model(args.model)
    except ValueError as exc:
        raise SystemExit(f"fused-residual resnet: {exc}") from None
    failed = len(common.FAILURES)
    rows = bench_resnet.run(device=device, quick=args.quick, out_dir=args.out, model=args.model, batch=args.batch,
                            dtype=args.dtype, image_size=args.image_size, steps=args.steps,
                            compile=not args.no_compile)
    return common.exit_status(rows, failed)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-residual",
        description="Fused residual-block kernels: versions, numerics verification and benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("info", help="versions, device, and which backends can run here")
    p.set_defaults(func=_info)

    from ._backend import BACKENDS

    p = sub.add_parser("verify", help="check every op against eager and float64 references; exit 1 on failure")
    p.add_argument("--quick", action="store_true", help="a smaller grid (under a minute on CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--backend", choices=BACKENDS, help="default: the backend in effect (auto)")
    p.add_argument("--all", action="store_true", help="print every check, not only forward rows and failures")
    p.set_defaults(func=_verify)

    p = sub.add_parser("bench", help="time eager, torch.compile and the fused ops side by side")
    p.add_argument("which", choices=BENCHES)
    p.add_argument("--quick", action="store_true", help="small sizes and short timing")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--out", help="folder for the CSV and PNG")
    p.set_defaults(func=_bench)

    p = sub.add_parser("resnet", help="the main job: convert a torchvision ResNet, check it, time training and "
                                      "inference for eager, fused, compile and compile + fused")
    p.add_argument("--model", default=None,
                   help="a torchvision ResNet: resnet18/34/50/101/152, resnext*, wide_resnet* (default: resnet50; "
                        "--quick: resnet18)")
    p.add_argument("--batch", type=_positive_int, default=None, help="default: 256 on CUDA, 8 on CPU (--quick: 32 / 2)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--image-size", type=_positive_int, default=None, help="default: 224 (--quick: 64 on CPU)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="timed iterations per variant (default: 10 on CUDA, 3 on CPU; --quick: 3 / 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--quick", action="store_true",
                   help="smaller defaults: resnet18, batch 32 on CUDA and 2 on CPU, 64-px images on CPU, fewer "
                        "steps (options given explicitly still apply)")
    p.add_argument("--out", help="folder for the CSV and PNG")
    p.set_defaults(func=_resnet)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
