"""The benchmark phase of the prepared GPU run (benchmarks/gpu_run.sh): verify and every benchmark, in
priority order, each only if it fits before the deadline. Each phase runs in a process of its own, with
what is left of the budget as its time limit: a CUDA error (sticky for its process), a hang or a crash ends
that phase only, and no state (autotuner choices, compiled graphs, allocator) carries into the next one.
Results are merged into OUT/bench.csv and the plots packed into OUT/plots.tar.gz after each phase, so a run
cut short keeps what it measured."""

from __future__ import annotations

import argparse
import csv
import glob
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

# (name, seconds it needs at least), in priority order. Estimates from the H200 runs' logs (runs 1 and 2:
# verify 35-45 s, overhead ~5 s, add_relu 17-20 s, linear 23-25 s, conv1x1 10-12 s, resnet 17-33 s, linear
# max-autotune ~60-90 s, resnet compile 121 s) with margin; the sweep (34 configs x 5 shapes, each compiled
# once) and the profile (printed only, no rows) last.
PHASES = [
    ("verify", 60),
    ("overhead", 15),
    ("add_relu", 30),
    ("batch_norm", 60),
    ("linear", 40),
    ("conv1x1", 25),
    ("resnet", 45),
    ("linear max-autotune", 100),
    ("resnet compile", 150),
    ("compile", 90),
    ("sweep gemm", 120),
    ("profile", 15),
]


def run_phase(name: str, dev: str, quick: bool, out_dir: str) -> int:
    """One phase, in this process; exit status 1 when a check or a measurement failed."""
    from fused_residual._benchmarks import (bench_add_relu, bench_batch_norm, bench_compile, bench_conv1x1,
                                            bench_linear, bench_overhead, bench_resnet, common, profile_ops,
                                            sweep_gemm)

    if name == "verify":
        from fused_residual import verify

        checks = verify.run(device=dev, quick=True, progress=lambda line: print(line, flush=True))
        print(verify.format_table([c for c in checks if not c.ok or "forward" in c.what]))
        failed = sum(not c.ok for c in checks)
        print(f"verify --quick on {dev}: {len(checks)} checks, {failed} failed", flush=True)
        return 1 if failed else 0
    jobs = {
        "overhead": lambda: bench_overhead.run(dev, quick, out_dir),
        "add_relu": lambda: bench_add_relu.run(dev, quick, out_dir),
        "batch_norm": lambda: bench_batch_norm.run(dev, quick, out_dir),
        "linear": lambda: bench_linear.run(dev, quick, out_dir, max_autotune="off"),
        "conv1x1": lambda: bench_conv1x1.run(dev, quick, out_dir),
        "resnet": lambda: bench_resnet.run(dev, quick, out_dir, compile=False),
        "linear max-autotune": lambda: bench_linear.run(dev, quick, out_dir, max_autotune="only"),
        # eager again beside the compiled variants: the phase's speed-ups then need no other phase
        "resnet compile": lambda: bench_resnet.run(dev, quick, out_dir, variants=("eager", "torch.compile",
                                                                                  "compile + fused",
                                                                                  "compile + frozen"),
                                                  check=False),
        "compile": lambda: bench_compile.run(dev, quick, out_dir),
        "sweep gemm": lambda: sweep_gemm.run(dev, quick, out_dir),
        "profile": lambda: profile_ops.run(dev, quick, out_dir),
    }
    return common.exit_status(jobs[name]())


def _stream(proc: subprocess.Popen) -> threading.Thread:
    """Copy the child's output to ours line by line (so that it lands in run.log as it comes)."""
    def pump():
        for line in proc.stdout:
            print(line, end="", flush=True)
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _merge(out_dir: str, merged: str) -> None:
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


def _pack(work: str, out: str) -> None:
    pngs = sorted(glob.glob(os.path.join(work, "*", "*.png")))
    if pngs:
        with tarfile.open(os.path.join(out, "plots.tar.gz"), "w:gz") as tar:
            for path in pngs:
                tar.add(path, arcname=f"{os.path.basename(os.path.dirname(path))}-{os.path.basename(path)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds by which to finish")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="quick sizes (a dry run of the driver)")
    p.add_argument("--phases", default="", help="comma-separated phase names to run (default: all, in order)")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run this one phase here, into --work
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        return run_phase(args.phase, args.device, args.quick, args.work)

    names = [name for name, _ in PHASES]
    phases = PHASES
    if args.phases:
        wanted = [w.strip() for w in args.phases.split(",") if w.strip()]
        unknown = set(wanted) - set(names)
        if unknown:
            p.error(f"unknown phases {sorted(unknown)}; known: {names}")
        phases = [ph for ph in PHASES if ph[0] in wanted]
    work = os.path.join("/tmp", f"fused_residual_bench_{os.getpid()}")
    os.makedirs(args.out, exist_ok=True)
    merged = os.path.join(args.out, "bench.csv")
    running = []

    def stop(signum, frame):  # terminated from outside (a timeout): the phase's process group goes too
        for proc in running:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        _run_phases(args, phases, work, merged, running)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _run_phases(args, phases, work: str, merged: str, running: list) -> None:
    for name, need in phases:
        left = args.deadline - time.time()
        if left < need:
            print(f"\n== {name}: SKIPPED, {left:.0f}s left, needs about {need}s", flush=True)
            continue
        print(f"\n== {name} ({left:.0f}s left)", flush=True)
        out_dir = os.path.join(work, name.replace(" ", "_"))
        cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--work", out_dir, "--out", args.out,
               "--deadline", str(args.deadline), "--device", args.device] + (["--quick"] if args.quick else [])
        t0 = time.time()
        # its own process group: at the deadline the phase goes with its helpers (compile workers)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        running[:] = [proc]
        pump = _stream(proc)
        try:
            status = proc.wait(timeout=max(1.0, args.deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "killed at the deadline"
        pump.join(timeout=10)
        verdict = "" if status == 0 else f" FAILED (exit status {status})" if isinstance(status, int) else f" {status}"
        print(f"== {name}: {time.time() - t0:.0f}s{verdict}", flush=True)
        _merge(out_dir, merged)
        _pack(work, args.out)


if __name__ == "__main__":
    sys.exit(main())
