"""Compile Triton kernels for NVIDIA targets without a GPU and report on the generated code.

Run as a script in a process where TRITON_INTERPRET is unset (triton.jit decides at decoration time whether
a kernel is interpreted): ``python tests/codegen_report.py OUT.json``. For each variant listed in
``variants()`` it records the PTX's global memory instructions and matrix instructions, and ptxas's register,
stack and spill report (ptxas bundled with triton), as JSON for tests/test_codegen.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

ARCHS = {90: "sm_90a", 80: "sm_80"}
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def compile_variant(fn, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int = 3,
                    divisible: tuple = ()) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    signature = dict(args)
    for name in constexprs:
        signature[name] = "constexpr"
    names = list(fn.arg_names)
    signature = {n: signature[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "--gpu-name", ARCHS[arch], path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    report = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {report}")

    def num(pattern):
        m = re.search(pattern, report)
        return int(m.group(1)) if m else None

    return {
        "global_loads": sorted(set(re.findall(r"\bld\.global[\w.]*", ptx))),
        "global_stores": sorted(set(re.findall(r"\bst\.global[\w.]*", ptx))),
        "mma": sorted(set(re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx))),
        "tma": sorted(set(re.findall(r"\bcp\.async\.bulk\.tensor\.\w+\.[\w:]+", ptx))),
        "int_div64": len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx)),
        "int_div32": len(re.findall(r"\b(?:div|rem)\.[su]32\b", ptx)),
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack_frame": num(r"(\d+) bytes stack frame"),
        "shared_bytes": kernel.metadata.shared,
    }


def add_relu_variants():
    from fused_residual._kernels import add_relu as add_relu_kernels

    sizes = {n: "i32" for n in ("size1", "size2", "size3")}
    strides = {f"{t}_st{i}": "i64" for t in ("z", "s", "o", "g") for i in range(4)}
    for arch in ARCHS:
        for dname, ptr in DTYPES.items():
            for strided in (False, True):
                for mask in (False, True):
                    layout = "strided" if strided else "flat"
                    block = add_relu_kernels.STRIDED_BLOCK if strided else add_relu_kernels.BLOCK
                    extra = dict(sizes, **strides) if strided else {}
                    args = {"z_ptr": ptr, "skip_ptr": ptr, "out_ptr": ptr, "mask_ptr": "*u8", "numel": "i32", **extra}
                    fn = add_relu_kernels.add_relu_fwd_strided_kernel if strided else add_relu_kernels.add_relu_fwd_kernel
                    yield (f"add_relu_fwd/{dname}/sm{arch}/{layout}{'/mask' if mask else ''}",
                           lambda fn=fn, a=args, m=mask, arch=arch, b=block: compile_variant(
                               fn, {k: v for k, v in a.items() if k in fn.arg_names},
                               dict({"SAVE_MASK": m, "RELU_HW_MAX": True, "INTERPRET": False, "BLOCK": b},
                                    **({"INDEX64": False} if "INDEX64" in fn.arg_names else {})), arch,
                               add_relu_kernels.NUM_WARPS, divisible=("z_ptr", "skip_ptr", "out_ptr", "mask_ptr", "numel")))
                    args = {"grad_ptr": ptr, "out_ptr": ptr, "mask_ptr": "*u8", "gin_ptr": ptr, "numel": "i32", **extra}
                    fn = add_relu_kernels.add_relu_bwd_strided_kernel if strided else add_relu_kernels.add_relu_bwd_kernel
                    yield (f"add_relu_bwd/{dname}/sm{arch}/{layout}{'/mask' if mask else ''}",
                           lambda fn=fn, a=args, m=mask, arch=arch, b=block: compile_variant(
                               fn, {k: v for k, v in a.items() if k in fn.arg_names},
                               dict({"FROM_MASK": m, "BLOCK": b},
                                    **({"INDEX64": False} if "INDEX64" in fn.arg_names else {})), arch, add_relu_kernels.NUM_WARPS,
                               divisible=("grad_ptr", "out_ptr", "mask_ptr", "gin_ptr", "numel")))


def tma_descriptors(cfg, ptr: str, dual: bool) -> tuple[dict, dict]:
    """(descriptor argument types, None descriptors as constexprs) of a launch with ``cfg``: TMA configs get
    descriptors with their tiles (the autotuner's pre_hook sets those), every other config None, as the
    launcher passes where TMA does not apply."""
    names = ("a1_desc", "w1_desc", "a2_desc", "w2_desc", "r_desc", "o_desc")
    if not cfg.kwargs["TMA"]:
        return {}, dict.fromkeys(names)
    bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    epilogue = (bm, bn // 2 if cfg.kwargs["EPILOGUE_SPLIT"] else bn)
    blocks = dict(a1_desc=(bm, bk), w1_desc=(bn, bk), a2_desc=(bm, bk), w2_desc=(bn, bk), r_desc=epilogue,
                  o_desc=epilogue)
    if not dual:
        del blocks["a2_desc"], blocks["w2_desc"]
    types = {n: f"tensordesc<{ptr[1:]}[{b[0]}, {b[1]}]>" for n, b in blocks.items()}
    return types, {n: None for n in names if n not in types}


def gemm_variants():
    """The GEMM epilogue kernel as a linear layer would launch it (unit strides and OH = OW = 1 are
    specialised by triton at run time, so they are constexprs here), for every autotuning config."""
    from fused_residual._kernels import gemm_add_relu as gemm_kernels

    names = gemm_kernels.gemm_add_relu_kernel.arg_names
    unit = {"a1_sk": 1, "w1_sk": 1, "a2_sk": 1, "w2_sk": 1, "r_sc": 1, "o_sc": 1, "OH": 1, "OW": 1,
            "a1_sh": 0, "a1_sw": 0, "a2_sh": 0, "a2_sw": 0, "r_sh": 0, "r_sw": 0, "o_sh": 0, "o_sw": 0,
            "A1_FLAT": True, "A2_FLAT": True, "R_FLAT": True, "O_FLAT": True}
    for arch in ARCHS:
        for dname, ptr, precision in [("fp32", "*fp32", "tf32"), ("fp32-ieee", "*fp32", "ieee"),
                                      ("fp16", "*fp16", "ieee"), ("bf16", "*bf16", "ieee")]:
            configs = gemm_kernels.CONFIG_SETS[gemm_kernels.config_set(4 if ptr == "*fp32" else 2, precision)]
            for i, cfg in enumerate(configs):
                if not gemm_kernels.runs_on(cfg, (arch // 10, arch % 10)):
                    continue
                # Both products (every config); a single product too for the persistent configs, whose
                # loop over tiles is flattened with the K loop only then.
                for dual in (True, False) if cfg.kwargs["PERSISTENT"] or cfg.kwargs["TMA"] else (True,):
                    descs, no_descs = tma_descriptors(cfg, ptr, dual)
                    consts = dict(unit, **no_descs, HAS_A2=dual, HAS_BIAS=True, HAS_RESIDUAL=True,
                                  PREFETCH_EPILOGUE=not dname.startswith("fp32"), TMA_READY=cfg.kwargs["TMA"],
                                  DOT_PRECISION=precision, RELU_HW_MAX=True,
                                  INTERPRET=False, **cfg.kwargs)
                    args = {n: descs.get(n, ptr if n.endswith("_ptr") else "i32") for n in names if n not in consts}
                    divisible = [n for n in args if n.endswith("_ptr")] + [n for n in (
                        "M", "N", "K1", "K2", "a1_sn", "w1_sn", "a2_sn", "w2_sn", "r_sn", "o_sn") if n in args]
                    yield (f"gemm_add_relu/{dname}/sm{arch}/config{i}{'' if dual else '/single'}",
                           lambda a=args, c=consts, arch=arch, cfg=cfg, d=divisible: dict(compile_variant(
                               gemm_kernels.gemm_add_relu_kernel, a, c, arch, cfg.num_warps, cfg.num_stages, divisible=d),
                               tma_config=cfg.kwargs["TMA"]))
        # 1x1 convolutions over NHWC tensors (OH, OW and the pixel strides known at run time only), with the
        # 128x128 config: dense tensors (rows addressed linearly, as for a linear layer), and a dual product
        # whose shortcut is read at stride 2 (that operand's rows need the pixel divisions).
        cfg = gemm_kernels.CONFIG_SETS["16-bit"][1]
        for name, dual in (("conv-nhwc", False), ("conv-strided-shortcut", True)):
            consts = dict(a1_sk=1, w1_sk=1, a2_sk=1, w2_sk=1, r_sc=1, o_sc=1, **tma_descriptors(cfg, "*bf16", dual)[1],
                          HAS_A2=dual, HAS_BIAS=True, TMA_READY=False,
                          HAS_RESIDUAL=True, PREFETCH_EPILOGUE=True, A1_FLAT=True, A2_FLAT=not dual,
                          R_FLAT=True, O_FLAT=True, DOT_PRECISION="ieee", RELU_HW_MAX=True, INTERPRET=False,
                          **cfg.kwargs)
            args = {n: "*bf16" if n.endswith("_ptr") else "i32" for n in names if n not in consts}
            divisible = [n for n in args if n.endswith(("_ptr", "_sn", "_sh", "_sw")) or n in ("N", "K1", "K2")]
            yield (f"gemm_add_relu/bf16/sm{arch}/{name}",
                   lambda a=args, c=consts, arch=arch, cfg=cfg, d=divisible: compile_variant(
                       gemm_kernels.gemm_add_relu_kernel, a, c, arch, cfg.num_warps, cfg.num_stages, divisible=d))
        for name, linear in (("linear", {"OH": 1, "OW": 1, "g_sh": 0, "g_sw": 0, "o_sh": 0, "o_sw": 0}),
                             ("nhwc", {})):
            args = {n: "*fp32" if n == "partial_ptr" else "*bf16" for n in gemm_kernels.relu_grad_colsum_kernel.arg_names
                    if n.endswith("_ptr")}
            args.update({n: "i32" for n in ("M", "N", "OH", "OW", "g_sn", "g_sh", "g_sw", "o_sn", "o_sh", "o_sw")
                         if n not in linear})
            yield (f"relu_grad_colsum/bf16/sm{arch}/{name}",
                   lambda a=args, arch=arch, c=linear: compile_variant(
                       gemm_kernels.relu_grad_colsum_kernel, a,
                       dict(c, g_sc=1, o_sc=1, G_FLAT=True, O_FLAT=True, HAS_COLSUM=True,
                            BLOCK_M=gemm_kernels.GRAD_BLOCK_M, BLOCK_N=gemm_kernels.GRAD_BLOCK_N),
                       arch, 4, divisible=[n for n in a if n.endswith("_ptr") or n in ("N", "g_sn", "o_sn")]))


def variants():
    yield from add_relu_variants()
    yield from gemm_variants()


def main(out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("codegen_report.py needs TRITON_INTERPRET unset")
    report = {}
    for name, build in variants():
        try:
            report[name] = build()
        except Exception as exc:  # recorded so that the test names the variant that failed
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
