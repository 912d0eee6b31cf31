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
    print(f"backend  {_backend.current_backend()} (FUSED_RESIDUAL_BACKEND / use_backend)")
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-residual",
        description="Fused residual-block kernels: versions, numerics verification and benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("info", help="versions, device, and which backends can run here")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
