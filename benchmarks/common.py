"""Benchmark machinery shared by the scripts in this folder (installed as ``fused_residual._benchmarks``).

Providers run side by side in one process on the same tensors. CUDA timings are the median of
``triton.testing.do_bench`` (CUDA events); CPU timings are the median of repeated wall-clock runs. Every
result row carries its device, library versions and date; :meth:`Bench.finish` prints a table and writes
``<name>.csv`` and ``<name>.png`` into the output folder.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from fused_residual._checks import DTYPES_BY_NAME

FIELDS = ["op", "shape", "dtype", "provider", "mode", "median_ms", "metric", "unit", "frac_of_copy",
          "speedup_vs_eager", "peak_mem_mb", "faults_per_call", "device", "versions", "date"]
DTYPES = DTYPES_BY_NAME  # the library's one table of dtype names


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    cuda = f" cuda={torch.version.cuda}" if torch.cuda.is_available() else ""
    return f"python={platform.python_version()} torch={torch.__version__} triton={tv}{cuda}"


# ---------------------------------------------------------------------------------------------------------
# The CPU allocator. PyTorch's CPU tensors come from glibc malloc, which serves large blocks by mmap and
# trims the heap's top on free: then every call that allocates a large tensor touches fresh pages, and a
# page fault per 4 KiB page costs more than the kernels it feeds. How often that happens depends on the
# order of earlier allocations, so it differs from process to process and between two models timed in
# turn: ResNet-50 inference (b8, 224 px) measured 42,000 minor faults per call in one run and 0 in
# another, 215 against 168 ms (benchmarks/results/cpu-2026-12-07b). The CPU benchmarks therefore hold the
# allocator steady (no mmap for large blocks, no trimming: freed memory is reused, as a caching allocator
# would) and report the faults per call left; FUSED_RESIDUAL_BENCH_MALLOC=default keeps glibc's defaults.

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_malloc_note: str | None = None


def steady_malloc() -> str:
    """Hold glibc malloc steady for the rest of the process (idempotent); returns what was done, for the
    versions column."""
    global _malloc_note
    if _malloc_note is not None:
        return _malloc_note
    if os.environ.get("FUSED_RESIDUAL_BENCH_MALLOC", "steady") == "default":
        _malloc_note = "malloc=default"
        return _malloc_note
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc
        ok = False
    _malloc_note = "malloc=steady" if ok else "malloc=default (mallopt unavailable)"
    return _malloc_note


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the OS does not report them)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:
        return 0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, quick: bool = False, stats: dict | None = None) -> float:
    """Median time of ``fn()`` in milliseconds; on CPU, ``stats["faults_per_call"]`` gets the minor page
    faults per timed call."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median"))
    for _ in range(2):
        fn()
    times = []
    budget = 0.5 if quick else 2.0
    faults = minor_faults()
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if stats is not None:
        stats["faults_per_call"] = (minor_faults() - faults) / len(times)
    return statistics.median(times) * 1e3


def wall_ms(fn, device: str, quick: bool = False) -> float:
    """Wall-clock time per call of ``fn()`` called back to back (no cache flush between calls, the device
    synchronised only around each batch of calls), median over batches: what a call costs when the host,
    not the device, is the limit. ``time_ms`` on CUDA hides host time shorter than its cache flush."""
    for _ in range(3):
        fn()
    sync(device)
    calls = 20 if quick else 100
    samples = []
    for _ in range(5 if quick else 11):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples) * 1e3


def copy_ms(x: torch.Tensor, device: str, quick: bool = False) -> float:
    """A copy kernel on ``x`` (reads and writes x.nbytes each), the bandwidth yardstick of the run.
    On CPU the destination is allocated per call, as the ops' outputs are."""
    if device == "cuda":
        dst = torch.empty_like(x)
        return time_ms(lambda: dst.copy_(x), device, quick)
    return time_ms(lambda: x.clone(), device, quick)


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    provider: str
    mode: str
    median_ms: float
    metric: float
    unit: str
    frac_of_copy: float | None = None
    speedup_vs_eager: float | None = None
    peak_mem_mb: float | None = None
    faults_per_call: float | None = None  # CPU: minor page faults per timed call
    device: str = ""
    versions: str = ""
    date: str = ""


# Every measurement that failed in this process ("op mode shape dtype provider: error"), in order: each
# table ends with its own, and the CLI exits 1 when a run added any.
FAILURES: list[str] = []


@dataclass
class Bench:
    name: str
    device: str
    quick: bool = False
    out_dir: str | None = None
    rows: list[Row] = field(default_factory=list)
    total: int | None = None  # expected number of measurements, for the progress line
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._dev = device_name(self.device)
        self._ver = versions() + (f" {steady_malloc()}" if self.device == "cpu" else "")
        self._date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._start = time.perf_counter()

    def measure(self, op: str, shape, dtype: str, provider: str, mode: str, fn, *, nbytes: float | None = None,
                flops: float | None = None, copy: float | None = None, wall: bool = False) -> Row | None:
        """Time ``fn``; the metric is GB/s of ``nbytes`` (fused-op bytes: each input read once, each output
        written once), TFLOP/s of ``flops``, or with neither microseconds per call. ``copy`` is the copy
        kernel's GB/s for the same data. ``wall``: back-to-back wall-clock time (:func:`wall_ms`), for
        host-bound calls."""
        shape_s = "x".join(map(str, shape)) if not isinstance(shape, str) else shape
        stats = {}
        try:
            ms = wall_ms(fn, self.device, self.quick) if wall else time_ms(fn, self.device, self.quick, stats)
        except Exception as exc:  # one provider failing (e.g. compile unsupported) must not end the run
            self.fail(f"{op} {mode} {shape_s} {dtype} {provider}", exc)
            return None
        if flops is not None:
            metric, unit = flops / ms / 1e9, "TFLOP/s"
        elif nbytes is None:
            metric, unit = ms * 1e3, "us/call"
        else:
            metric, unit = (nbytes or 0) / ms / 1e6, "GB/s"
        frac = (nbytes / ms / 1e6) / copy if (copy and nbytes) else None
        return self._add(Row(op, shape_s, dtype, provider, mode, ms, metric, unit, frac,
                             faults_per_call=stats.get("faults_per_call")))

    def copy_baseline(self, op: str, shape, dtype: str, x: torch.Tensor) -> float:
        """Measure (and record) a copy kernel over ``x``; returns its GB/s (bytes read + written)."""
        ms = copy_ms(x, self.device, self.quick)
        gbs = 2 * x.numel() * x.element_size() / ms / 1e6
        shape_s = "x".join(map(str, shape)) if not isinstance(shape, str) else shape
        self._add(Row(op, shape_s, dtype, "copy kernel", "copy", ms, gbs, "GB/s", 1.0))
        return gbs

    def add(self, row: Row) -> Row:
        """Record a row measured elsewhere (e.g. a training step timed over several iterations)."""
        return self._add(row)

    def _add(self, row: Row) -> Row:
        row.device, row.versions, row.date = self._dev, self._ver, self._date
        self.rows.append(row)
        n = f"{len(self.rows)}/{self.total}" if self.total else str(len(self.rows))
        extra = f", {row.frac_of_copy:.0%} of copy" if row.frac_of_copy is not None else ""
        print(f"[{n} {time.perf_counter() - self._start:6.1f}s] {row.op:<22} {row.mode:<8} {row.shape:<20} "
              f"{row.dtype:<5} {row.provider:<24} {row.median_ms:9.4f} ms  {row.metric:8.4g} {row.unit}{extra}",
              flush=True)
        self._write_csv()  # after every row: a run cut short (a crash, a deadline) keeps what it measured
        return row

    def _write_csv(self) -> str | None:
        if not self.out_dir:
            return None
        self._fill_speedups()
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"{self.name}.csv")
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: v for k, v in asdict(r).items() if k in FIELDS})
        os.replace(path + ".tmp", path)  # whole or not at all, should the process be killed meanwhile
        return path

    def _fill_speedups(self):
        eager = {(r.op, r.shape, r.dtype, r.mode): r.median_ms for r in self.rows if r.provider == "eager"}
        for r in self.rows:
            base = eager.get((r.op, r.shape, r.dtype, r.mode))
            r.speedup_vs_eager = base / r.median_ms if base else None

    def table(self) -> str:
        self._fill_speedups()
        header = ("op", "mode", "shape", "dtype", "provider", "median ms", "metric", "of copy", "vs eager",
                  "peak MB", "faults/call")
        lines = [header]
        for r in self.rows:
            lines.append((r.op, r.mode, r.shape, r.dtype, r.provider, f"{r.median_ms:.4f}",
                          f"{r.metric:.4g} {r.unit}", f"{r.frac_of_copy:.0%}" if r.frac_of_copy else "",
                          f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager else "",
                          f"{r.peak_mem_mb:.0f}" if r.peak_mem_mb is not None else "",
                          f"{r.faults_per_call:.0f}" if r.faults_per_call is not None else ""))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)) for line in lines)

    def fail(self, what: str, exc: BaseException) -> None:
        """Report a measurement that raised, and keep it for the end of the table and the exit status."""
        line = f"{what}: {type(exc).__name__}: {exc}"
        print(f"  {what}: FAILED {type(exc).__name__}: {exc}", flush=True)
        self.failures.append(line)
        FAILURES.append(line)

    def finish(self) -> list[Row]:
        print_autotune_choices(self.device)
        print(f"\n{self.name} on {self._dev} ({self._ver})\n{self.table()}", flush=True)
        if self.failures:
            print(f"{len(self.failures)} measurement(s) FAILED:" + "".join(f"\n  {f}" for f in self.failures),
                  flush=True)
        if self.out_dir:
            path = self._write_csv()
            print(f"wrote {path}")
            plot(self.rows, os.path.join(self.out_dir, f"{self.name}.png"), f"{self.name} ({self._dev})")
        return self.rows


def print_autotune_choices(device: str) -> None:
    """The GEMM kernel's autotuned configs chosen so far in this process (CUDA only; nothing when no GEMM
    was tuned), for the log. :meth:`Bench.finish` calls it."""
    if device != "cuda":
        return
    from fused_residual.ops._gemm_triton import autotune_choices

    lines = autotune_choices()
    if lines:
        print(f"autotuned GEMM configs ({len(lines)} keys):" + "".join(f"\n  {line}" for line in lines), flush=True)


def plot(rows: list[Row], path: str, title: str) -> None:
    """Speed-up over eager per case (bars per provider) as a PNG; skipped with a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install fused_residual[bench]); no plot written")
        return
    rows = [r for r in rows if r.speedup_vs_eager is not None and r.mode not in ("copy", "parity")]
    if not rows:
        print(f"nothing to plot for {path}")
        return
    cases = list(dict.fromkeys((r.op, r.mode, r.shape, r.dtype) for r in rows))
    providers = [p for p in dict.fromkeys(r.provider for r in rows)]
    speed = {(r.op, r.mode, r.shape, r.dtype, r.provider): r.speedup_vs_eager for r in rows}
    fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 0.25 * len(cases) * len(providers))), 5.0))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        ys = [speed.get((*c, p)) or 0.0 for c in cases]
        ax.bar([k + i * width for k in range(len(cases))], ys, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))])
    ax.set_xticklabels([f"{c[0]} {c[1]}\n{c[2]} {c[3]}" for c in cases], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over eager (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(description: str, argv=None):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes and short timing, for a smoke run")
    p.add_argument("--out", default=None, help="folder for the CSV and PNG (default: print only)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    return args


def main_guard(run, description: str) -> None:
    """A benchmark script's entry point: exit 1 when a measurement failed (or a parity row is off)."""
    args = parse_args(description)
    rows = run(device=args.device, quick=args.quick, out_dir=args.out)
    sys.exit(exit_status(rows))


def parity_failures(rows) -> list:
    """Parity rows (converted vs unconverted model, unit "rel err") past their tolerance: 1e-4 in fp32,
    5e-2 in fp16 / bf16."""
    return [r for r in rows if r.unit == "rel err" and not r.metric <= (1e-4 if r.dtype == "fp32" else 5e-2)]


def exit_status(rows, failures_before: int = 0) -> int:
    """1 when a measurement failed since ``failures_before`` entries of :data:`FAILURES`, or a parity row of
    ``rows`` is off; else 0."""
    return 1 if len(FAILURES) > failures_before or parity_failures(rows or []) else 0
