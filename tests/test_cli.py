"""The fused-residual command: usage errors, info, verify (pass and fail), bench and resnet in quick mode."""

import csv
import os
import subprocess
import sys

import pytest

from fused_residual import cli, verify

CSV_FIELDS = {"op", "shape", "dtype", "provider", "mode", "median_ms", "metric", "device", "versions", "date"}


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "fused_residual.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_and_usage_errors():
    assert _run("--help").returncode == 0
    for bad in (["frobnicate"], ["bench"], ["bench", "matmul"], ["verify", "--device", "tpu"], ["info", "--nope"]):
        res = _run(*bad)
        assert res.returncode == 2, bad
        assert "usage: fused-residual" in res.stderr, bad


def test_info_names_versions_and_backends():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    for word in ("torch", "triton", "C++", "cpp     on cpu: yes", "eager   on cpu: yes"):
        assert word in res.stdout, word


def test_info_reports_a_bad_backend_variable_and_goes_on(monkeypatch, capsys):
    monkeypatch.setenv("FUSED_RESIDUAL_BACKEND", "cuda-graphs")
    assert cli.main(["info"]) == 1
    out = capsys.readouterr().out
    assert "backend  INVALID: unknown fused_residual backend 'cuda-graphs'" in out
    assert "eager   on cpu: yes" in out  # the rest of the report still comes


def test_resnet_refuses_bad_options_by_name(capsys):
    for bad in (["--batch", "0"], ["--steps", "-1"], ["--image-size", "x"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["resnet", *bad])
        assert exc.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"unknown model 'resnet_50'; expected one of resnet18, .*wide_resnet101_2"):
        cli.main(["resnet", "--model", "resnet_50"])


def test_bench_and_resnet_exit_1_when_a_measurement_fails(monkeypatch, tmp_path, capsys):
    """A provider that raises is reported, listed under the table, and makes the command exit 1 (the
    other providers still run)."""
    import fused_residual as fr
    from fused_residual._benchmarks import bench_resnet

    monkeypatch.setattr(fr, "add_relu", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected failure")))
    assert cli.main(["bench", "add_relu", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "measurement(s) FAILED" in out and "injected failure" in out and "eager" in out
    real_timed = bench_resnet._timed
    calls = []

    def timed(step, steps, device):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real_timed(step, steps, device)

    monkeypatch.setattr(bench_resnet, "_timed", timed)
    assert cli.main(["resnet", "--quick", "--no-compile", "--device", "cpu", "--steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "measurement(s) FAILED" in out and "train fused: RuntimeError: injected failure" in out


def test_verify_quick_passes_and_names_every_op(capsys):
    assert cli.main(["verify", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in ("add_relu[save=output]", "add_relu[save=mask]", "add_relu_", "linear_add_relu",
               "dual_linear_add_relu", "conv1x1_add_relu", "dual_conv1x1_add_relu", "resnet Bottleneck"):
        assert op in out, op
    assert "0 failed" in out


def test_verify_exits_1_on_a_failure(monkeypatch, capsys):
    real = verify.check_gemm

    def broken(case, dtype, device, backend):
        checks = real(case, dtype, device, backend)
        checks[0].ok, checks[0].note = False, "injected failure"
        return checks

    monkeypatch.setattr(verify, "check_gemm", broken)
    assert cli.main(["verify", "--quick", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL injected failure" in out and "failed" in out


@pytest.mark.parametrize("which", ["add_relu", "linear", "conv1x1"])
def test_bench_quick_writes_csv_and_plot(tmp_path, which):
    res = _run("bench", which, "--quick", "--device", "cpu", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with open(tmp_path / f"{which}.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and CSV_FIELDS <= set(rows[0])
    providers = {r["provider"] for r in rows}
    assert {"eager", "fused"} <= providers and any("compile" in p for p in providers)
    assert all(float(r["median_ms"]) > 0 for r in rows if r["mode"] != "parity")
    assert os.path.getsize(tmp_path / f"{which}.png") > 1000
    assert "vs eager" in res.stdout  # the table


def test_bench_overhead_times_both_call_paths(tmp_path):
    res = _run("bench", "overhead", "--quick", "--device", "cpu", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with open(tmp_path / "overhead.csv") as f:
        rows = list(csv.DictReader(f))
    for op in ("add_relu", "linear_add_relu", "conv1x1_add_relu"):
        for mode in ("fwd", "fwd+bwd"):
            got = {r["provider"]: r for r in rows if r["op"] == op and r["mode"] == mode}
            assert set(got) == {"eager", "fused", "fused [torch.ops]"}, (op, mode, set(got))
            assert all(r["unit"] == "us/call" and float(r["metric"]) > 0 for r in got.values())


def test_resnet_quick(tmp_path):
    res = _run("resnet", "--quick", "--no-compile", "--device", "cpu", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "parity eval" in res.stdout and "(ok" in res.stdout
    assert "img/s" in res.stdout and "fused" in res.stdout
    with open(tmp_path / "resnet.csv") as f:
        rows = list(csv.DictReader(f))
    modes = {(r["provider"], r["mode"]) for r in rows}
    assert {("eager", "train"), ("fused", "train"), ("eager", "infer"), ("fused", "infer")} <= modes


def test_gemm_sweep_times_every_config_under_the_interpreter(tmp_path):
    """benchmarks/sweep_gemm.py, run in-process under the Triton interpreter (conftest sets it): a row per
    config plus the references, with the roofline fraction filled in."""
    from fused_residual import _triton
    from fused_residual._benchmarks import sweep_gemm

    if not _triton.interpreting():
        pytest.skip("needs the Triton interpreter (CUDA machines run the sweep in benchmarks/gpu_run.py)")
    rows = sweep_gemm.run("cpu", quick=True, out_dir=str(tmp_path))
    providers = [r.provider for r in rows]
    expected = [sweep_gemm.label(c) for c in sweep_gemm.configs("cpu")]
    assert {"copy kernel", "torch.mm", "eager", "autotuned", *expected} == set(providers)
    assert all(r.frac_of_copy and r.frac_of_copy > 0 for r in rows if r.provider not in ("copy kernel",))
    assert (tmp_path / "sweep_gemm.csv").exists()


def test_gpu_run_driver_merges_phases_and_skips_what_does_not_fit(tmp_path, capsys):
    """benchmarks/gpu_run.py, the driver of the prepared GPU run, in quick mode on the CPU: every phase's rows
    merged into one bench.csv, the plots packed, verify's verdict printed; a phase that no longer fits before
    the deadline is skipped and says so; an unknown phase name is a usage error. (GPU time is scarce: the
    driver must not be what fails there.)"""
    import time

    from fused_residual import _triton
    from fused_residual._benchmarks import gpu_run

    if not _triton.interpreting():
        pytest.skip("the sweep phase needs the Triton interpreter on CPU")
    out = tmp_path / "out"
    base = ["--out", str(out), "--device", "cpu", "--quick"]
    assert gpu_run.main(base + ["--deadline", str(time.time() + 1000), "--phases", "verify,overhead,sweep gemm"]) == 0
    printed = capsys.readouterr().out
    assert "verify --quick on cpu:" in printed and ", 0 failed" in printed
    assert "FAILED" not in printed and "SKIPPED" not in printed
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert CSV_FIELDS <= set(rows[0])
    assert {"interpreter smoke", "add_relu", "linear_add_relu"} <= {r["op"] for r in rows}
    assert (out / "plots.tar.gz").stat().st_size > 0
    assert gpu_run.main(base + ["--deadline", str(time.time() + 10), "--phases", "sweep gemm"]) == 0
    assert "== sweep gemm: SKIPPED" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu_run.main(base + ["--deadline", str(time.time() + 1000), "--phases", "sweep gemm,nope"])


def test_benchmark_scripts_exit_1_on_a_failure_or_a_parity_miss(monkeypatch):
    """``python benchmarks/bench_*.py`` (common.main_guard): exit 0 when all went well, 1 when a measurement
    failed or a parity row is past its tolerance."""
    from fused_residual._benchmarks import common

    monkeypatch.setattr(sys, "argv", ["bench", "--quick", "--device", "cpu"])
    monkeypatch.setattr(common, "FAILURES", [])
    parity = common.Row("resnet18 parity", "b2", "fp32", "fused vs eager", "eval", 0.0, 2e-4, "rel err")
    for rows, failures, code in (([], [], 0), ([parity], [], 1), ([], ["linear fwd fused: RuntimeError"], 1)):
        monkeypatch.setattr(common, "FAILURES", list(failures))
        with pytest.raises(SystemExit) as exc:
            common.main_guard(lambda **kwargs: rows, "test")
        assert exc.value.code == code, (rows, failures)


def test_gpu_run_driver_kills_a_phase_at_the_deadline_with_its_helpers(tmp_path, monkeypatch, capsys):
    """A phase still running at the deadline is killed with its process group (compile workers and the
    like), reported, and the driver goes on; the phase's output reaches the log as it comes."""
    import time

    from fused_residual._benchmarks import gpu_run

    pid_file = tmp_path / "helper.pid"
    phase = tmp_path / "phase.py"
    phase.write_text(
        "import subprocess, sys, time\n"
        "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(helper.pid))\n"
        "print('phase started', flush=True)\n"
        "time.sleep(120)\n")
    monkeypatch.setattr(gpu_run, "__file__", str(phase))
    monkeypatch.setattr(gpu_run, "PHASES", [("stuck", 1), ("next", 1)])
    start = time.time()
    assert gpu_run.main(["--out", str(tmp_path / "out"), "--device", "cpu", "--deadline", str(start + 4)]) == 0
    printed = capsys.readouterr().out
    assert time.time() - start < 30
    assert "phase started" in printed and "== stuck: " in printed and "killed at the deadline" in printed
    assert "== next: SKIPPED" in printed
    helper = int(pid_file.read_text())
    time.sleep(0.5)
    try:  # the helper went with the phase: gone, or a zombie not yet reaped by its new parent
        with open(f"/proc/{helper}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state
