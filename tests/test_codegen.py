"""Generated code, checked without a GPU: the Triton kernels compiled for sm_90a and sm_80 by triton's own
compiler, and ptxas's resource report (tests/codegen_report.py does the compiling in a subprocess, where
TRITON_INTERPRET is unset)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("codegen") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(HERE, "codegen_report.py"), str(out)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in data.items() if "error" in v}
    assert not errors, errors
    return data


def _select(report, prefix):
    found = {k: v for k, v in report.items() if k.startswith(prefix)}
    assert found, f"no variants named {prefix}*"
    return found


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", ["add_relu_fwd", "add_relu_bwd"])
def test_flat_elementwise_paths_use_128_bit_accesses(report, kernel, dtype, arch):
    v = report[f"{kernel}/{dtype}/sm{arch}/flat"]
    assert v["global_loads"] == ["ld.global.v4.b32"], v["global_loads"]
    assert v["global_stores"] == ["st.global.v4.b32"], v["global_stores"]


def test_no_kernel_spills_registers(report):
    spills = {k: (v["spill_stores"], v["spill_loads"], v["stack_frame"]) for k, v in report.items()
              if v["spill_stores"] or v["spill_loads"]}
    assert not spills, spills
    assert all(v["registers"] for v in report.values())


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_gemm_uses_wgmma_on_sm90(report, dtype):
    for name, v in _select(report, f"gemm_add_relu/{dtype}/sm90/").items():
        assert v["mma"] and all(m.startswith("wgmma.mma_async") for m in v["mma"]), (name, v["mma"])


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_gemm_uses_mma_sync_on_sm80(report, dtype):
    for name, v in _select(report, f"gemm_add_relu/{dtype}/sm80/").items():
        assert v["mma"] and all(m.startswith("mma.sync") for m in v["mma"]), (name, v["mma"])


def test_ieee_fp32_gemm_stays_off_tensor_cores(report):
    """TF32 disabled means IEEE fp32 products: no tf32 matrix instructions may appear."""
    for name, v in _select(report, "gemm_add_relu/fp32-ieee/").items():
        assert not any("tf32" in m for m in v["mma"]), (name, v["mma"])


def test_gemm_loads_are_vectorised(report):
    for name, v in _select(report, "gemm_add_relu/bf16/").items():
        if not v.get("tma_config"):
            assert "ld.global.v4.b32" in v["global_loads"], (name, v["global_loads"])


def test_tma_configs_move_tiles_by_tma_and_only_they_do(report):
    """TMA configs (sm_90a, 16-bit) load operand and residual tiles into shared memory and store the output
    with TMA bulk tensor copies, with no per-thread global store left; every other config uses none."""
    gemm = _select(report, "gemm_add_relu/")
    tma = {k: v for k, v in gemm.items() if v.get("tma_config")}
    assert tma and all("/sm90/" in k and k.split("/")[1] in ("fp16", "bf16") for k in tma), sorted(tma)
    for name, v in tma.items():
        assert any(i.startswith("cp.async.bulk.tensor.2d.shared") for i in v["tma"]), (name, v["tma"])
        assert any(i.startswith("cp.async.bulk.tensor.2d.global") for i in v["tma"]), (name, v["tma"])
        assert not v["global_stores"], (name, v["global_stores"])
    assert not any(v["tma"] for k, v in report.items() if k not in tma)


# Shared memory one thread block may use: 227 KiB on sm_90 (H100/H200), 163 KiB on sm_80 (A100).
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}


@pytest.mark.parametrize("arch", [90, 80])
def test_gemm_configs_fit_in_shared_memory(report, arch):
    """A config over the limit would fail to launch on that GPU (the autotuner would silently skip it)."""
    for name, v in _select(report, "gemm_add_relu/").items():
        if f"/sm{arch}/" in name:
            assert 0 < v["shared_bytes"] <= MAX_SHARED[arch], (name, v["shared_bytes"])


def test_strided_elementwise_kernels_divide_in_32_bits(report):
    """Below 2**31 elements the strided add_relu kernels index elements in int32 (offsets stay int64)."""
    strided = {k: v for k, v in report.items() if k.startswith("add_relu_") and "/strided" in k}
    assert strided and all(v["int_div64"] == 0 and v["int_div32"] > 0 for v in strided.values()), \
        {k: (v["int_div64"], v["int_div32"]) for k, v in strided.items()}


def test_gemm_row_addressing_needs_no_64_bit_division(report):
    """Row (pixel) indices are int32 and dense tensors are addressed with one multiply: no 64-bit integer
    division anywhere (each costs dozens of instructions), and a dense NHWC 1x1 convolution divides no
    more than a linear layer does. A shortcut read at stride 2 divides in int32 only."""
    gemm = {k: v for k, v in report.items() if k.startswith(("gemm_add_relu/", "relu_grad_colsum/"))}
    assert gemm and all(v["int_div64"] == 0 for v in gemm.values()), \
        {k: v["int_div64"] for k, v in gemm.items() if v["int_div64"]}
    for arch in (90, 80):
        linear = report[f"gemm_add_relu/bf16/sm{arch}/config1"]
        conv = report[f"gemm_add_relu/bf16/sm{arch}/conv-nhwc"]
        assert conv["int_div32"] <= linear["int_div32"], (conv["int_div32"], linear["int_div32"])
        assert report[f"gemm_add_relu/bf16/sm{arch}/conv-strided-shortcut"]["int_div32"] > linear["int_div32"]
