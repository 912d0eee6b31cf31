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


# ---- BatchNorm kernels (kernels/batch_norm.py), sm_90a ------------------------------------------------------
# Compiled in a subprocess by bn_codegen_variants() below with tests/codegen_report.py's compile_variant. Both
# storage layouts: NCHW (inner = 56*56, a multiple of 16 as triton specialises it) and channels_last / 2-D
# (inner = 1, which triton specialises to a constant: no division for the channel index).

BN_LAYOUTS = {"nchw": {"inner": "i32"}, "cl": {}}


def bn_codegen_variants():
    """(name, build) pairs for every BatchNorm kernel as its launcher starts it."""
    import codegen_report as R
    from fused_residual._kernels import batch_norm as K

    f32 = "*fp32"
    for dname, ptr in R.DTYPES.items():
        for lay, inner in BN_LAYOUTS.items():
            div = ["numel", "C"] + list(inner)
            const_inner = {} if inner else {"inner": 1}
            for extra in (False, True):
                args = dict(x_ptr=ptr, skip_ptr=ptr, mean_ptr=f32, scale_ptr=f32, shift_ptr=f32, out_ptr=ptr,
                            mask_ptr="*u8", numel="i32", C="i32", **inner)
                consts = dict(const_inner, HAS_SKIP=extra, SAVE_MASK=extra, RELU_HW_MAX=True, INTERPRET=False,
                              BLOCK=K.APPLY_BLOCK, INDEX64=False)
                yield (f"bn_apply/{dname}/sm90/{lay}{'/skip-mask' if extra else ''}",
                       lambda a=args, c=consts, d=div: R.compile_variant(
                           K.bn_apply_kernel, a, c, 90, K.APPLY_WARPS,
                           divisible=[n for n in a if n.endswith("_ptr")] + d))
                args = dict(dy_ptr=ptr, x_ptr=ptr, out_ptr=ptr, mask_ptr="*u8", mean_ptr=f32, a_ptr=f32, b_ptr=f32,
                            d_ptr=f32, dx_ptr=ptr, dskip_ptr=ptr, numel="i32", C="i32", **inner)
                consts = dict(const_inner, FROM_MASK=extra, HAS_DSKIP=extra, INTERPRET=False, BLOCK=K.APPLY_BLOCK,
                              INDEX64=False)
                yield (f"bn_bwd_apply/{dname}/sm90/{lay}{'/mask-dskip' if extra else ''}",
                       lambda a=args, c=consts, d=div: R.compile_variant(
                           K.bn_bwd_apply_kernel, a, c, 90, K.APPLY_WARPS,
                           divisible=[n for n in a if n.endswith("_ptr")] + d))
            # the reductions' tiles as _bn_triton._reduce_plan picks them for a ResNet stage
            tile = dict(BLOCK_O=K.TILE // 1024, BLOCK_C=1, BLOCK_J=1024) if inner else dict(
                BLOCK_O=K.TILE // K.MAX_BLOCK_C, BLOCK_C=K.MAX_BLOCK_C, BLOCK_J=1)
            geometry = dict(outer="i32", C="i32", **inner, row_stride="i32", JB="i32", tiles="i32",
                            tiles_per_split="i32")
            div = ["C", "row_stride"] + list(inner)
            yield (f"bn_stats_partial/{dname}/sm90/{lay}",
                   lambda g=geometry, c=dict(const_inner, **tile), d=div: R.compile_variant(
                       K.bn_stats_partial_kernel, dict(x_ptr=ptr, part_ptr=f32, **g), dict(c, INDEX64=False), 90,
                       K.REDUCE_WARPS, divisible=["x_ptr", "part_ptr"] + d))
            for from_mask in (False, True):
                yield (f"bn_bwd_reduce_partial/{dname}/sm90/{lay}{'/mask' if from_mask else ''}",
                       lambda g=geometry, c=dict(const_inner, **tile), d=div, m=from_mask: R.compile_variant(
                           K.bn_bwd_reduce_partial_kernel,
                           dict(dy_ptr=ptr, x_ptr=ptr, out_ptr=ptr, mask_ptr="*u8", mean_ptr=f32, part_ptr=f32, **g),
                           dict(c, FROM_MASK=m, INDEX64=False), 90, K.REDUCE_WARPS,
                           divisible=["dy_ptr", "x_ptr", "out_ptr", "mask_ptr", "mean_ptr", "part_ptr"] + d))
        yield (f"bn_stats_finish/{dname}/sm90",
               lambda ptr=ptr: R.compile_variant(
                   K.bn_stats_finish_kernel, dict(x_ptr=ptr, part_ptr=f32, mean_ptr=f32, var_ptr=f32, C="i32",
                                                  inner="i32", splits="i32"),
                   dict(BLOCK_C=K.FINISH_BLOCK_C, INDEX64=False), 90, K.FINISH_WARPS))
    yield ("bn_bwd_reduce_finish/sm90",
           lambda: R.compile_variant(
               K.bn_bwd_reduce_finish_kernel, dict(part_ptr=f32, sum_g_ptr=f32, sum_gx_ptr=f32, C="i32", splits="i32"),
               dict(BLOCK_C=K.FINISH_BLOCK_C), 90, K.FINISH_WARPS))


def _bn_report_main(out_path):
    report = {}
    for name, build in bn_codegen_variants():
        try:
            report[name] = build()
        except Exception as exc:
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)


@pytest.fixture(scope="module")
def bn_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("codegen_bn") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import test_codegen; "
            f"test_codegen._bn_report_main({str(out)!r})")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in data.items() if "error" in v}
    assert not errors, errors
    return data


def test_bn_kernels_compile_without_spills(bn_report):
    assert len(bn_report) == 46  # 14 variants per dtype, 3 stats finishes, 1 bwd_reduce finish
    spills = {k: (v["spill_stores"], v["spill_loads"], v["stack_frame"]) for k, v in bn_report.items()
              if v["spill_stores"] or v["spill_loads"] or v["stack_frame"]}
    assert not spills, spills
    assert all(v["registers"] for v in bn_report.values())


@pytest.mark.parametrize("kernel", ["bn_apply", "bn_bwd_apply"])
def test_bn_elementwise_kernels_use_128_bit_accesses(bn_report, kernel):
    """The activations move in 128-bit accesses (the per-channel vectors are 32-bit gathers beside them)."""
    for name, v in _select(bn_report, f"{kernel}/").items():
        assert "ld.global.v4.b32" in v["global_loads"], (name, v["global_loads"])
        assert v["global_stores"] and all(s.startswith("st.global.v4") or s == "st.global.b8"
                                          for s in v["global_stores"]), (name, v["global_stores"])


def test_bn_kernels_divide_in_32_bits_only(bn_report):
    """Below 2**31 elements: no 64-bit division anywhere; the elementwise kernels' channel index is 32-bit
    (``(i // inner) % C``, a remainder alone where inner == 1); the channels_last reductions divide not at all
    and the NCHW ones once per tile, never per element."""
    for name, v in bn_report.items():
        assert v["int_div64"] == 0, (name, v["int_div64"])
        if name.startswith(("bn_stats_partial/", "bn_bwd_reduce_partial/")):
            assert v["int_div32"] == (0 if "/cl" in name else 1), (name, v["int_div32"])


@pytest.mark.parametrize("kernel", ["bn_stats_partial", "bn_bwd_reduce_partial"])
def test_bn_reductions_load_tiles_vectorised(bn_report, kernel):
    """NCHW tiles run along a plane (contiguous, here a multiple of 16 elements), channels_last tiles across 64
    contiguous channels: x (and dy, out) move in 128-bit loads either way."""
    for name, v in _select(bn_report, f"{kernel}/").items():
        assert "ld.global.v4.b32" in v["global_loads"], (name, v["global_loads"])
