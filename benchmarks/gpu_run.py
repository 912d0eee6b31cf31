"""The benchmark phase of the prepared GPU run (benchmarks/gpu_run.sh): verify and every benchmark, in
priority order, each only if it fits before the deadline. Results are merged into OUT/bench.csv after each
phase (so a run cut short keeps what it measured) and the plots packed into OUT/plots.tar.gz at the end."""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
import tarfile
import time
import traceback


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds by which to finish")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="quick sizes (a dry run of the driver)")
    p.add_argument("--phases", default="", help="comma-separated phase names to run (default: all, in order)")
    args = p.parse_args(argv)

    import torch

    from fused_residual import verify
    from fused_residual._benchmarks import (bench_add_relu, bench_conv1x1, bench_linear, bench_overhead, bench_resnet,
                                            profile_ops, sweep_gemm)

    work = os.path.join("/tmp", f"fused_residual_bench_{os.getpid()}")
    os.makedirs(args.out, exist_ok=True)
    dev, quick = args.device, args.quick

    def run_verify(out_dir):
        checks = verify.run(device=dev, quick=True, progress=lambda line: print(line, flush=True))
        print(verify.format_table([c for c in checks if not c.ok or "forward" in c.what]))
        failed = sum(not c.ok for c in checks)
        print(f"verify --quick on {dev}: {len(checks)} checks, {failed} failed", flush=True)

    # (name, seconds it needs at least, job)
    phases = [
        ("verify", 60, run_verify),
        ("profile", 40, lambda o: profile_ops.run(dev, quick, o)),
        ("overhead", 20, lambda o: bench_overhead.run(dev, quick, o)),
        ("add_relu", 90, lambda o: bench_add_relu.run(dev, quick, o)),
        ("linear", 100, lambda o: bench_linear.run(dev, quick, o, max_autotune="off")),
        ("conv1x1", 70, lambda o: bench_conv1x1.run(dev, quick, o)),
        ("sweep gemm", 90, lambda o: sweep_gemm.run(dev, quick, o)),
        ("resnet", 120, lambda o: bench_resnet.run(dev, quick, o, compile=False)),
        ("linear max-autotune", 150, lambda o: bench_linear.run(dev, quick, o, max_autotune="only")),
        ("resnet compile", 240, lambda o: bench_resnet.run(dev, quick, o, variants=("torch.compile", "compile + fused"),
                                                          check=False)),
    ]
    if args.phases:
        wanted = [w.strip() for w in args.phases.split(",") if w.strip()]
        unknown = set(wanted) - {name for name, _, _ in phases}
        if unknown:
            p.error(f"unknown phases {sorted(unknown)}; known: {[name for name, _, _ in phases]}")
        phases = [ph for ph in phases if ph[0] in wanted]
    merged = os.path.join(args.out, "bench.csv")
    for name, need, job in phases:
        left = args.deadline - time.time()
        if left < need:
            print(f"\n== {name}: SKIPPED, {left:.0f}s left, needs about {need}s", flush=True)
            continue
        print(f"\n== {name} ({left:.0f}s left)", flush=True)
        out_dir = os.path.join(work, name.replace(" ", "_"))
        t0 = time.time()
        try:
            job(out_dir)
        except Exception:
            traceback.print_exc()
            print(f"== {name}: FAILED", flush=True)
        print(f"== {name}: {time.time() - t0:.0f}s", flush=True)
        for path in sorted(glob.glob(os.path.join(out_dir, "*.csv"))):
            with open(path) as src:
                rows = list(csv.DictReader(src))
            if not rows:
                continue
            new = not os.path.exists(merged)
            with open(merged, "a", newline="") as dst:
                writer = csv.DictWriter(dst, fieldnames=list(rows[0]))
                if new:
                    writer.writeheader()
                writer.writerows(rows)
        if dev == "cuda":
            torch.cuda.empty_cache()
    pngs = sorted(glob.glob(os.path.join(work, "*", "*.png")))
    if pngs:
        with tarfile.open(os.path.join(args.out, "plots.tar.gz"), "w:gz") as tar:
            for path in pngs:
                tar.add(path, arcname=f"{os.path.basename(os.path.dirname(path))}-{os.path.basename(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
