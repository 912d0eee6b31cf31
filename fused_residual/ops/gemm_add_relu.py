"""GEMM + bias + residual + ReLU: launchers, torch.library registration, fake impls and autograd.

Ops (namespace ``fused_residual``):

* ``linear_add_relu(x, weight, residual, bias?)``          relu(x @ weight.T + bias + residual)
* ``dual_linear_add_relu(x, weight, shortcut, shortcut_weight, bias?)``
                                                            relu(x @ weight.T + shortcut @ shortcut_weight.T + bias)
* ``conv1x1_add_relu(x, weight, residual, bias?, stride)``  relu(conv2d(x, weight, bias, stride) + residual)
* ``dual_conv1x1_add_relu(x, weight, shortcut, shortcut_weight, bias?, shortcut_stride)``
                                  relu(conv2d(x, weight, bias) + conv2d(shortcut, shortcut_weight, stride))
* ``relu_grad_colsum(grad, out, with_colsum) -> (grad_masked, colsum)``   the fused part of the backward

All four forward ops share one Triton kernel (``kernels/gemm_add_relu.py``) and one backward: the ReLU mask
is applied once, by ``relu_grad_colsum``, which also yields the residual gradient and the two-stage,
deterministic bias gradient; the input and weight gradients are GEMMs on that masked gradient, run by cuBLAS
/ cuDNN (``torch.mm``, ``aten.convolution_backward``) rather than Triton: the benchmark in
``benchmarks/bench_linear.py`` measures our Triton GEMM against ``torch.mm`` and cuBLAS wins or ties on the
shapes we target, and it is the library users already trust for dgrad/wgrad.

CPU (``cpp``): BLAS does the product with the residual as addmm's beta*C term (or mkldnn's convolution),
and the C++ kernels apply bias + ReLU (or add the residual + ReLU) in place: one extra pass instead of
eager's three.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from dataclasses import dataclass
from typing import Optional  # custom-op signatures: Optional, which every torch's infer_schema knows

import torch

from .. import _alloc, _backend, _checks, _cpp, _triton, reference
from . import _direct
from .add_relu import AUTOCAST_KEYS, _device_guard, _triton_forward, impl_autocast, relu_uses_hw_max


# ---------------------------------------------------------------------------------------------------------
# Layouts


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format a 1x1 convolution's output takes from its input: channels_last when the channel
    dim is x's innermost (also for strided views of channels_last tensors), else contiguous."""
    if x.dim() != 4 or x.shape[1] == 1:
        return torch.contiguous_format
    others = [x.stride(d) for d in (0, 2, 3) if x.shape[d] > 1]
    return torch.channels_last if all(x.stride(1) < s for s in others) else torch.contiguous_format


def conv_out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


@dataclass
class Operand:
    """One product ``A @ W^T`` of the accumulator: ``x`` is a [M, K] matrix (linear) or an NCHW-shaped
    tensor read at ``stride`` (1x1 convolution); ``weight`` is [N, K] or [N, K, 1, 1]."""

    x: torch.Tensor
    weight: torch.Tensor
    stride: int = 1

    def a_strides(self) -> tuple[int, int, int, int]:
        x, s = self.x, self.stride
        if x.dim() == 2:
            return x.stride(0), 0, 0, x.stride(1)
        return x.stride(0), x.stride(2) * s, x.stride(3) * s, x.stride(1)

    def w_strides(self) -> tuple[int, int]:
        return self.weight.stride(0), self.weight.stride(1)

    @property
    def k(self) -> int:
        return self.weight.shape[1]


def mn_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(img, h, w, channel) strides of a [M, N] matrix or an NCHW-shaped tensor."""
    if t.dim() == 2:
        return t.stride(0), 0, 0, t.stride(1)
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)


def pixel_stride(images: int, oh: int, ow: int, s_img: int, s_h: int, s_w: int) -> int | None:
    """The stride ``p`` with pixel (img, h, w) at ``(img * oh * ow + h * ow + w) * p`` when a tensor's
    pixels are laid out that evenly (2-D matrices, dense NHWC tensors, NCHW with one channel), else None.
    The kernel then addresses rows with one multiply instead of divisions (``*_LINEAR`` flags)."""
    p = s_w if ow > 1 else (s_h if oh > 1 else s_img)
    if (ow == 1 or s_w == p) and (oh == 1 or s_h == ow * p) and (images <= 1 or s_img == oh * ow * p):
        return p
    return None


def _rows_linear(strides: tuple[int, int, int, int], images: int, oh: int, ow: int):
    """(strides to pass, LINEAR flag): a linear tensor's pixel stride goes in the image-stride slot."""
    s_img, s_h, s_w, s_c = strides
    p = pixel_stride(images, oh, ow, s_img, s_h, s_w)
    return ((p, 0, 0, s_c), True) if p is not None else (strides, False)


# The Triton kernel indexes rows (pixels) with int32: M + BLOCK_M must stay below 2**31.
TRITON_MAX_ROWS = 2**31 - 1024


def grid_of(out: torch.Tensor) -> tuple[int, int, int, int]:
    """(M, N, OH, OW) of an output [M, N] or [B, N, OH, OW]."""
    if out.dim() == 2:
        return out.shape[0], out.shape[1], 1, 1
    b, n, oh, ow = out.shape
    return b * oh * ow, n, oh, ow


def dot_precision(dtype: torch.dtype, device: torch.device, conv: bool = False) -> str:
    """fp32 products use TF32 only where PyTorch itself would: for linear layers where its matmul would
    (``torch.backends.cuda.matmul.fp32_precision``), for 1x1 convolutions where cuDNN's convolutions would
    (``torch.backends.cudnn.conv.fp32_precision``, TF32 by default); ``"none"`` defers to the parent
    setting (``torch.backends.cudnn.fp32_precision``, then ``torch.backends.fp32_precision``). The legacy
    ``allow_tf32`` flags set the same values. (Reading ``allow_tf32`` raises once the new setting has been
    used.)"""
    if dtype != torch.float32 or device.type != "cuda":
        return "ieee"
    if conv:
        cudnn = torch.backends.cudnn
        precision = getattr(getattr(cudnn, "conv", None), "fp32_precision", None)
        if precision is None:  # a torch before the fp32_precision settings
            return "tf32" if cudnn.allow_tf32 else "ieee"
        if precision == "none":
            precision = cudnn.fp32_precision
    else:
        matmul = torch.backends.cuda.matmul
        precision = getattr(matmul, "fp32_precision", None)
        if precision is None:
            return "tf32" if matmul.allow_tf32 else "ieee"
    if precision == "none":
        precision = torch.backends.fp32_precision
    return "tf32" if precision == "tf32" else "ieee"


# ---------------------------------------------------------------------------------------------------------
# Triton launchers


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (the persistent kernel's program count is a multiple). Under the interpreter:
    2, so that each persistent program steps through several tiles in the tests."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_enabled() -> bool:
    """Whether the autotuner may pick the TMA configs: ``FUSED_RESIDUAL_GEMM_TMA=1``. Off by default until
    they have been run on a GPU (the interpreter and the sm_90a compiler check them, not hardware);
    benchmarks/gpu_run.sh turns them on, and configs forced by name run regardless."""
    value = os.environ.get("FUSED_RESIDUAL_GEMM_TMA", "0")
    if value not in ("0", "1"):
        raise ValueError(f"FUSED_RESIDUAL_GEMM_TMA must be 0 or 1, got {value!r}")
    return value == "1"


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    """Whether the GPU has the Tensor Memory Accelerator (sm_90+). Under the interpreter (CPU tensors) the
    TMA configs run too, as the tests force them."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


def tma_descriptors(operands: list[Operand], residual, out, linear: bool) -> list | None:
    """Descriptors (a1, w1, a2, w2, residual, out; None for absent tensors) for the TMA configs, or None
    where those do not apply: before sm_90, with fp32 operands, with some tensor's pixel rows not evenly
    laid out (``linear`` false: strided convolutions), or rows TMA cannot address (they must start
    16-byte aligned, with adjacent columns). The tiles are placeholders: the config's pre_hook sets them."""
    if not linear or out.element_size() > 2 or not _has_tma(out.device):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, N, OH, OW = grid_of(out)
    images = M // (OH * OW)
    matrices = []
    for op in operands:
        a_st = _rows_linear(op.a_strides(), images, OH, OW)[0]
        matrices += [(op.x, M, op.k, a_st[0], a_st[3]), (op.weight, N, op.k, *op.w_strides())]
    matrices += [None] * (4 - len(matrices))
    for t in (residual, out):
        st = _rows_linear(mn_strides(t), images, OH, OW)[0] if t is not None else None
        matrices.append((t, M, N, st[0], st[3]) if t is not None else None)
    for m in matrices:  # every check before any descriptor is built (the common miss costs little)
        if m is not None:
            t, rows, cols, row_stride, col_stride = m
            # rows 16-byte aligned, columns adjacent, rows not overlapping (an expanded tensor's do)
            if (col_stride != 1 or (row_stride * t.element_size()) % 16 or row_stride < cols or not rows
                    or not cols or t.data_ptr() % 16):
                return None
    return [None if m is None else TensorDescriptor(m[0], [m[1], m[2]], [m[3], 1], [16, 16]) for m in matrices]


def _triton_gemm(operands: list[Operand], bias, residual, out, config=None) -> None:
    """out = relu(products + bias + residual) by the Triton kernel: autotuned, or with ``config`` (a
    ``triton.Config``) when given (benchmarks/sweep_gemm.py times each config that way)."""
    M, N, OH, OW = grid_of(out)
    if M == 0 or N == 0:
        return
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[n] at bias_ptr + n (a sliced or expanded bias: copied)
    K = _triton.kernels("gemm_add_relu")
    a1 = operands[0]
    a2 = operands[1] if len(operands) > 1 else None
    interpret = _triton.interpreting()
    if M > TRITON_MAX_ROWS:
        raise ValueError(f"the Triton GEMM kernel takes at most {TRITON_MAX_ROWS} rows (pixels), got {M}")
    images = M // (OH * OW)
    a1_st, a1_lin = _rows_linear(a1.a_strides(), images, OH, OW)
    a2_st, a2_lin = _rows_linear(a2.a_strides(), images, OH, OW) if a2 else ((0, 0, 0, 0), True)
    r_st, r_lin = _rows_linear(mn_strides(residual), images, OH, OW) if residual is not None \
        else ((0, 0, 0, 0), True)
    o_st, o_lin = _rows_linear(mn_strides(out), images, OH, OW)
    linear = a1_lin and a2_lin and r_lin and o_lin
    args = [
        a1.x, a1.weight, a2.x if a2 else a1.x, a2.weight if a2 else a1.weight,
        bias if bias is not None else out, residual if residual is not None else out, out,
        None, None, None, None, None, None,  # TMA descriptors, where a TMA config may run (below)
        M, N, a1.k, a2.k if a2 else 0, OH, OW,
        *a1_st, *a1.w_strides(), *a2_st, *(a2.w_strides() if a2 else (0, 0)), *r_st, *o_st,
    ]
    flags = dict(M_CLASS=K.m_class(M),  # the autotuner's key (see m_class)
                 HAS_A2=a2 is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 A1_LINEAR=a1_lin, A2_LINEAR=a2_lin, R_LINEAR=r_lin, O_LINEAR=o_lin, TMA_READY=False,
                 PREFETCH_EPILOGUE=out.element_size() <= 2,
                 DOT_PRECISION=dot_precision(out.dtype, out.device, conv=a1.x.dim() == 4),
                 RELU_HW_MAX=relu_uses_hw_max(out.device), INTERPRET=interpret)
    configs = K.config_set(out.element_size(), flags["DOT_PRECISION"])

    def with_descriptors() -> bool:
        descs = tma_descriptors(operands, residual, out, linear)
        if descs is not None:
            args[7:13] = descs
        flags["TMA_READY"] = descs is not None
        return descs is not None

    def grid(meta):
        tiles = _triton.cdiv(M, meta["BLOCK_M"]) * _triton.cdiv(N, meta["BLOCK_N"])
        if meta["PERSISTENT"]:
            return (max(1, min(tiles, multiprocessors(out.device) * meta["PERSISTENT"])),)
        return (tiles,)

    with _device_guard(out):
        if config is None and interpret:  # one small config: autotuning would run every config on the CPU
            K.gemm_add_relu_kernel[grid](*args, **flags, **K.INTERPRETER_CONFIG)
        elif config is not None or os.environ.get("FUSED_RESIDUAL_GEMM_AUTOTUNE", "1") == "0":
            # Without a config: the first of the list, untuned. The CUDA test run sets this, as autotuning
            # each of its many tiny shapes would cost more than the tests themselves.
            cfg = config or K.CONFIG_SETS[configs][0]
            if cfg.kwargs["TMA"]:
                if not with_descriptors():
                    raise ValueError(f"config {cfg} moves tensors by TMA, which these tensors or this device "
                                     "do not allow (sm_90+, 16-bit matrices with 16-byte aligned rows)")
                K.set_tma_blocks({**dict(zip(K.gemm_add_relu_kernel.arg_names, args)), **cfg.kwargs})
            K.gemm_add_relu_kernel[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                         num_stages=cfg.num_stages)
        else:
            tuner = K.AUTOTUNED[configs]
            key = (configs, flags["M_CLASS"], N, a1.k, a2.k if a2 else 0, a1_lin, a2_lin, o_lin, out.dtype,
                   out.device)
            if key in _TUNED_WITHOUT_TMA:
                # Tuned with the TMA configs among the candidates, and a pointer config won: the same
                # autotuner key (TMA_READY), without the cost of building descriptors it will not read.
                flags["TMA_READY"] = True
            elif tma_enabled() and with_descriptors():
                with _TUNER_LOCK:  # best_config is the tuner's last launch: no other thread's in between
                    tuner[grid](*args, **flags)
                    chose_tma = tuner.best_config.kwargs["TMA"]
                if not chose_tma:
                    _TUNED_WITHOUT_TMA.add(key)
                return
            with _TUNER_LOCK:
                tuner[grid](*args, **flags)


# Problems (config list, row-count class, N, K1, K2, row addressing, dtype, device) that were tuned with
# descriptors and chose a config without TMA: later calls skip building descriptors (several microseconds of
# host time).
_TUNED_WITHOUT_TMA: set = set()
# Held around every autotuned launch: a launch sets the tuner's best_config, which the TMA branch reads
# right after its own launch to learn which config ran; a launch from another thread in between would
# make it record another problem's choice (and later calls would run a TMA config without descriptors).
_TUNER_LOCK = threading.Lock()


def autotune_choices() -> list[str]:
    """One line per problem key the GEMM autotuner has tuned in this process: the key (M, N, K1, K2 and
    the argument dtypes) and the config it chose. Benchmarks print these, so that a run records which
    tiles won."""
    if not _triton.status()[0] or _triton.interpreting():
        return []
    K = _triton.kernels("gemm_add_relu")
    return [f"{name} configs: key {key} -> {cfg}" for name, tuner in K.AUTOTUNED.items()
            for key, cfg in tuner.cache.items()]


def _triton_relu_grad_colsum(grad, out, gm, partial) -> None:
    M, N, OH, OW = grid_of(out)
    if M > TRITON_MAX_ROWS:
        raise ValueError(f"the Triton masked-gradient kernel takes at most {TRITON_MAX_ROWS} rows, got {M}")
    K = _triton.kernels("gemm_add_relu")
    images = M // (OH * OW) if M else 0
    g_st, g_lin = _rows_linear(mn_strides(grad), images, OH, OW)
    o_st, o_lin = _rows_linear(mn_strides(out), images, OH, OW)
    grid = (_triton.cdiv(M, K.GRAD_BLOCK_M), _triton.cdiv(N, K.GRAD_BLOCK_N))
    with _device_guard(out):
        K.relu_grad_colsum_kernel[grid](
            grad, out, gm, partial if partial is not None else gm, M, N, OH, OW, *g_st, *o_st,
            G_LINEAR=g_lin, O_LINEAR=o_lin,
            HAS_COLSUM=partial is not None, BLOCK_M=K.GRAD_BLOCK_M, BLOCK_N=K.GRAD_BLOCK_N)


# ---------------------------------------------------------------------------------------------------------
# CPU (cpp) and eager paths


def rows_of(t: torch.Tensor, view: bool = False) -> torch.Tensor:
    """``t [..., C]`` as a [prod(...), C] matrix (spelled out, not -1: C may be 0)."""
    if t.dim() == 2:
        return t
    shape = (t.shape[:-1].numel(), t.shape[-1])
    return t.view(shape) if view else t.reshape(shape)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [M, N] matrix view of a [M, N] or NCHW-shaped tensor (a view for channels_last, else a copy)."""
    return t if t.dim() == 2 else rows_of(t.permute(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------------------
# Library path: the product on cuBLAS / cuDNN (MKL / mkldnn on CPU), then residual + ReLU in place


# Arithmetic intensity (FLOP per byte the fused op must move) from which a single product runs on cuBLAS /
# cuDNN and the add+ReLU as a second in-place pass: there the product dominates, and the vendor GEMM beats
# ours by more than the extra pass costs. Measured on an H200 (benchmarks/results, bf16): at 397 FLOP/B
# (M=12544, N=2048, K=1024) the library path takes 0.117 ms against the Triton kernel's 0.158; at 204-224
# (the ResNet-50 layer-3/4 shortcuts and conv3) the Triton kernel wins, 0.241 against 0.304 ms.
# Dual products always take the Triton kernel: the library path would write and re-read a second M x N
# product (dual M=200704, N=512, K=128+256: 0.251 ms Triton against 0.322 ms library).
LIBRARY_MIN_INTENSITY = 350.0
GEMM_PATHS = ("auto", "triton", "library")
_gemm_path: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_residual_gemm_path", default=None)


@contextlib.contextmanager
def use_gemm_path(name: str):
    """Force the CUDA GEMM ops onto one path: "triton" (the fused kernel), "library" (vendor product + fused
    add+ReLU pass) or "auto" (by arithmetic intensity). Also ``$FUSED_RESIDUAL_GEMM_PATH``."""
    if name not in GEMM_PATHS:
        raise ValueError(f"unknown GEMM path {name!r}; expected one of {GEMM_PATHS}")
    token = _gemm_path.set(name)
    try:
        yield
    finally:
        _gemm_path.reset(token)


def intensity(operands: list[Operand], residual, out) -> float:
    M, N, _, _ = grid_of(out)
    flops = 2.0 * M * N * sum(op.k for op in operands)
    elements = sum(M * op.k + N * op.k for op in operands) + M * N * (2 if residual is not None else 1)
    return flops / max(1, elements * out.element_size())


def gemm_path(operands: list[Operand], residual, out) -> str:
    name = _gemm_path.get() or os.environ.get("FUSED_RESIDUAL_GEMM_PATH", "auto")
    if name not in GEMM_PATHS:
        raise ValueError(f"unknown GEMM path {name!r} (FUSED_RESIDUAL_GEMM_PATH); expected one of {GEMM_PATHS}")
    if name != "auto":
        return name
    if grid_of(out)[0] > TRITON_MAX_ROWS:
        return "library"
    if len(operands) > 1:
        return "triton"
    return "library" if intensity(operands, residual, out) >= LIBRARY_MIN_INTENSITY else "triton"


def _library_gemm(operands: list[Operand], bias, residual, new_out, add_relu_inplace) -> torch.Tensor:
    """res = first product + bias by the vendor library; then relu(res + residual or second product) in place
    by ``add_relu_inplace(res, skip)``."""
    first, rest = operands[0], operands[1:]

    def product(op, b=None):
        if op.x.dim() == 2:
            return torch.nn.functional.linear(op.x, op.weight, b)
        return torch.nn.functional.conv2d(op.x, op.weight, b, stride=op.stride)

    res = product(first, bias)
    add_relu_inplace(res, residual if residual is not None else product(rest[0]))
    if res.stride() == new_out(meta=True).stride():
        return res
    return new_out().copy_(res)  # the library chose another memory format than the op promises


# The CPU path runs in row blocks of about this many output bytes: BLAS writes a block (residual included)
# and the bias + ReLU pass rewrites it while it is still in the core's L2 cache, instead of streaming the
# whole output through DRAM a second time. Measured on a 2-core EPYC VM (1 MiB L2 per core), M=4096,
# N=K=512 fp32: 11.5 ms with 1024-row (2 MiB) blocks, 12.3 ms unblocked, 12.5 ms eager; 256-row blocks
# lose the gain to BLAS call overhead (12.1 ms).
CPU_BLOCK_BYTES = 2 << 20


def _cpp_gemm(operands: list[Operand], bias, residual, new_out) -> torch.Tensor:
    C = _cpp.module()
    first, rest = operands[0], operands[1:]
    if first.x.dim() != 2:  # 1x1 convolutions: mkldnn, then the add_relu kernel in place
        return _library_gemm(operands, bias, residual, new_out, lambda r, s: C.add_relu_fwd(r, s, r, None))
    out = new_out()
    M, N = out.shape
    rows = max(64, CPU_BLOCK_BYTES // max(1, N * out.element_size()))

    # float16 with a bias: the bias goes first, as in eager (x @ W^T + residual may overflow float16's
    # range where x @ W^T + bias + residual does not); the residual then comes with the ReLU pass.
    bias_first = bias is not None and out.dtype == torch.float16

    def block(o, res, xs):
        if bias_first:
            torch.addmm(bias, xs[0], first.weight.t(), out=o)
        elif res is not None:  # the residual rides in addmm's beta*C term: BLAS writes the block once
            torch.addmm(res, xs[0], first.weight.t(), out=o)
        else:
            torch.mm(xs[0], first.weight.t(), out=o)
        for x, op in zip(xs[1:], rest):
            o.addmm_(x, op.weight.t())
        if bias_first and res is not None:
            C.add_relu_fwd(o, res, o, None)
        else:
            C.bias_relu_rows_(o, None if bias_first else bias)

    if M <= rows:
        block(out, residual, [op.x for op in operands])
        return out
    for lo in range(0, M, rows):
        hi = min(M, lo + rows)
        block(out[lo:hi], residual[lo:hi] if residual is not None else None, [op.x[lo:hi] for op in operands])
    return out


def _run(new_out, operands: list[Operand], bias, residual, eager) -> torch.Tensor:
    """The op's result on the backend in effect. ``new_out(meta=False)`` allocates the output in the layout
    the op promises (its fake impl's); ``eager()`` is the reference formula for the eager backend."""
    backend = _backend.resolve(operands[0].x.device)
    if backend == "cpp":
        return _cpp_gemm(operands, bias, residual, new_out)
    if backend == "triton":
        if gemm_path(operands, residual, new_out(meta=True)) == "library":
            return _library_gemm(operands, bias, residual, new_out, lambda r, s: _triton_forward(r, s, r, None))
        out = new_out()
        _triton_gemm(operands, bias, residual, out)
        return out
    return new_out().copy_(eager())


# ---------------------------------------------------------------------------------------------------------
# Checks


def _check_weight(op: str, name: str, weight: torch.Tensor, k: int, k_from: str, conv: bool) -> int:
    if conv:
        if weight.dim() != 4 or weight.shape[2:] != (1, 1):
            raise ValueError(f"{op}: {name} must be a 1x1 convolution weight [Cout, Cin, 1, 1], got shape "
                             f"{tuple(weight.shape)}")
    elif weight.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if weight.shape[1] != k:
        raise ValueError(f"{op}: {k_from} has K={k} but {name} {tuple(weight.shape)} has K={weight.shape[1]}")
    if conv and k == 0:  # F.conv2d returns a wrongly shaped result for that, so no backend can match eager
        raise ValueError(f"{op}: {k_from} has no input channels; a 1x1 convolution needs at least one")
    return weight.shape[0]


def _check_bias(op: str, bias, n: int) -> None:
    if bias is not None:
        _checks.shape(op, "bias", bias, (n,), "one value per output feature")


def _check_stride(op: str, name: str, stride) -> None:
    """A positive int; under torch.compile a symbolic one too (dynamo makes an int argument dynamic once
    its value changes between calls)."""
    if isinstance(stride, torch.SymInt):
        torch._check(stride >= 1, lambda: f"{op}: {name} must be a positive int, got {stride}")
    elif not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {stride!r}")


def _check_linear(op, x, weight, residual, bias) -> int:
    _checks.floating(op, x=x, weight=weight, residual=residual, bias=bias)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim [..., K], got a 0-dim tensor")
    n = _check_weight(op, "weight", weight, x.shape[-1], f"x {tuple(x.shape)}", conv=False)
    if residual is not None:
        _checks.shape(op, "residual", residual, (*x.shape[:-1], n), f"x's leading dims and weight's N={n}")
    _check_bias(op, bias, n)
    return n


def _check_dual_linear(op, x, weight, shortcut, shortcut_weight, bias) -> int:
    _checks.floating(op, x=x, weight=weight, shortcut=shortcut, shortcut_weight=shortcut_weight, bias=bias)
    n = _check_linear(op, x, weight, None, bias)
    if shortcut.dim() < 1 or shortcut.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: shortcut {tuple(shortcut.shape)} must have x's leading dims "
                         f"{tuple(x.shape[:-1])}")
    n2 = _check_weight(op, "shortcut_weight", shortcut_weight, shortcut.shape[-1],
                       f"shortcut {tuple(shortcut.shape)}", conv=False)
    if n2 != n:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} and shortcut_weight {tuple(shortcut_weight.shape)} "
                         "must have the same number of outputs N")
    return n


def _check_conv(op, x, weight, residual, bias, stride) -> tuple[int, int, int, int]:
    _checks.floating(op, x=x, weight=weight, residual=residual, bias=bias)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [B, Cin, H, W], got shape {tuple(x.shape)}")
    _check_stride(op, "stride", stride)
    n = _check_weight(op, "weight", weight, x.shape[1], f"x {tuple(x.shape)}", conv=True)
    out_shape = (x.shape[0], n, conv_out_size(x.shape[2], stride), conv_out_size(x.shape[3], stride))
    if residual is not None:
        _checks.shape(op, "residual", residual, out_shape,
                      f"the output of a stride-{stride} 1x1 convolution of x {tuple(x.shape)}")
    _check_bias(op, bias, n)
    return out_shape


def _check_dual_conv(op, x, weight, shortcut, shortcut_weight, bias, shortcut_stride):
    _checks.floating(op, x=x, weight=weight, shortcut=shortcut, shortcut_weight=shortcut_weight, bias=bias)
    out_shape = _check_conv(op, x, weight, None, bias, 1)
    if shortcut.dim() != 4:
        raise ValueError(f"{op}: shortcut must be 4-D [B, C, H, W], got shape {tuple(shortcut.shape)}")
    _check_stride(op, "shortcut_stride", shortcut_stride)
    n2 = _check_weight(op, "shortcut_weight", shortcut_weight, shortcut.shape[1],
                       f"shortcut {tuple(shortcut.shape)}", conv=True)
    short_out = (shortcut.shape[0], n2, conv_out_size(shortcut.shape[2], shortcut_stride),
                 conv_out_size(shortcut.shape[3], shortcut_stride))
    if short_out != out_shape:
        raise ValueError(f"{op}: the shortcut's stride-{shortcut_stride} output {short_out} (shortcut "
                         f"{tuple(shortcut.shape)}, shortcut_weight {tuple(shortcut_weight.shape)}) does not "
                         f"match the main output {out_shape} (x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    return out_shape


def _conv_out(x: torch.Tensor, out_shape):
    """Allocator of a 1x1 convolution's output in x's memory format (``meta=True``: strides only)."""
    def new_out(meta: bool = False) -> torch.Tensor:
        spec = torch.empty(out_shape, dtype=x.dtype, device="meta", memory_format=output_memory_format(x))
        return spec if meta else _alloc.empty_strided(spec.shape, spec.stride(), x)
    return new_out


def _rows_out(x: torch.Tensor, n: int):
    """Allocator of a linear op's output, viewed as [M, N] rows (``meta=True``: strides only)."""
    def new_out(meta: bool = False) -> torch.Tensor:
        shape = (x.shape[:-1].numel(), n)
        return torch.empty(shape, dtype=x.dtype, device="meta") if meta else _alloc.empty(shape, x)
    return new_out


def _unviewed(rows: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """The [M, N] result in x's leading shape, as a tensor of its own rather than a view of the op's
    internal matrix (autograd refuses in-place changes to a view a custom function returns)."""
    return rows.view(*x.shape[:-1], n).detach()


# ---------------------------------------------------------------------------------------------------------
# Ops


def _linear_add_relu(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    n = _check_linear("linear_add_relu", x, weight, residual, bias)
    return _unviewed(_run(_rows_out(x, n), [Operand(rows_of(x), weight)], bias, rows_of(residual),
                          lambda: rows_of(reference.linear_add_relu(x, weight, residual, bias))), x, n)


linear_add_relu = torch.library.custom_op("fused_residual::linear_add_relu", _linear_add_relu, mutates_args=())


@linear_add_relu.register_fake
def _(x, weight, residual, bias=None):
    n = _check_linear("linear_add_relu", x, weight, residual, bias)
    return x.new_empty((*x.shape[:-1], n))


def _dual_linear_add_relu(x: torch.Tensor, weight: torch.Tensor, shortcut: torch.Tensor,
                         shortcut_weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    n = _check_dual_linear("dual_linear_add_relu", x, weight, shortcut, shortcut_weight, bias)
    operands = [Operand(rows_of(x), weight), Operand(rows_of(shortcut), shortcut_weight)]
    return _unviewed(_run(_rows_out(x, n), operands, bias, None,
                          lambda: rows_of(reference.dual_linear_add_relu(x, weight, shortcut, shortcut_weight, bias))),
                     x, n)


dual_linear_add_relu = torch.library.custom_op("fused_residual::dual_linear_add_relu", _dual_linear_add_relu,
                                                mutates_args=())


@dual_linear_add_relu.register_fake
def _(x, weight, shortcut, shortcut_weight, bias=None):
    n = _check_dual_linear("dual_linear_add_relu", x, weight, shortcut, shortcut_weight, bias)
    return x.new_empty((*x.shape[:-1], n))


def _conv1x1_add_relu(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, stride: int = 1) -> torch.Tensor:
    out_shape = _check_conv("conv1x1_add_relu", x, weight, residual, bias, stride)
    return _run(_conv_out(x, out_shape), [Operand(x, weight, stride)], bias, residual,
                lambda: reference.conv1x1_add_relu(x, weight, residual, bias, stride))


conv1x1_add_relu = torch.library.custom_op("fused_residual::conv1x1_add_relu", _conv1x1_add_relu, mutates_args=())


@conv1x1_add_relu.register_fake
def _(x, weight, residual, bias=None, stride=1):
    out_shape = _check_conv("conv1x1_add_relu", x, weight, residual, bias, stride)
    return torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _dual_conv1x1_add_relu(x: torch.Tensor, weight: torch.Tensor, shortcut: torch.Tensor,
                          shortcut_weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          shortcut_stride: int = 1) -> torch.Tensor:
    out_shape = _check_dual_conv("dual_conv1x1_add_relu", x, weight, shortcut, shortcut_weight, bias,
                                 shortcut_stride)
    return _run(_conv_out(x, out_shape), [Operand(x, weight), Operand(shortcut, shortcut_weight, shortcut_stride)],
                bias, None,
                lambda: reference.dual_conv1x1_add_relu(x, weight, shortcut, shortcut_weight, bias,
                                                        shortcut_stride))


dual_conv1x1_add_relu = torch.library.custom_op("fused_residual::dual_conv1x1_add_relu", _dual_conv1x1_add_relu,
                                                 mutates_args=())


@dual_conv1x1_add_relu.register_fake
def _(x, weight, shortcut, shortcut_weight, bias=None, shortcut_stride=1):
    out_shape = _check_dual_conv("dual_conv1x1_add_relu", x, weight, shortcut, shortcut_weight, bias,
                                 shortcut_stride)
    return torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


# ---- backward --------------------------------------------------------------------------------------------


def _grad_layout(out: torch.Tensor) -> dict:
    return {} if out.dim() == 2 else {"memory_format": torch.channels_last}


def _relu_grad_colsum(grad: torch.Tensor, out: torch.Tensor, with_colsum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad where not (out <= 0) else 0, its fp32 sums over all dims but the channel dim, or an empty
    tensor). ``grad``/``out`` are [M, N] or NCHW-shaped; the masked gradient comes back row-major [M, N]
    (channels_last for NCHW shapes), the layout the dgrad/wgrad GEMMs read fastest."""
    _checks.floating("relu_grad_colsum", grad=grad, out=out)
    _checks.same_shape("relu_grad_colsum", "grad", grad, "out", out)
    if out.dim() not in (2, 4):
        raise ValueError(f"relu_grad_colsum: expected a 2-D or 4-D out, got shape {tuple(out.shape)}")
    M, N, _, _ = grid_of(out)
    gm = _alloc.empty(out.shape, out, **_grad_layout(out))
    colsum = _alloc.empty((N,) if with_colsum else (0,), out, dtype=torch.float32)
    backend = _backend.resolve(out.device)
    if backend == "triton" and (M > TRITON_MAX_ROWS or N > 65535 * 64):
        # past the kernel's int32 row indices (the forward took the library path too), or more column
        # tiles (of 64) than a CUDA grid's second dimension holds
        backend = "eager"
    if backend == "triton":
        K = _triton.kernels("gemm_add_relu")
        partial = torch.empty((_triton.cdiv(M, K.GRAD_BLOCK_M), N), dtype=torch.float32, device=out.device) \
            if with_colsum else None
        _triton_relu_grad_colsum(grad, out, gm, partial)
        if with_colsum:  # stage two: a fixed-order sum over the per-tile partials (no atomics)
            torch.sum(partial, dim=0, out=colsum)
    elif backend == "cpp":
        _cpp.module().masked_grad_colsum(_as_rows(grad).contiguous(), _as_rows(out).contiguous(), _as_rows(gm),
                                         colsum if with_colsum else None)
    else:
        gm.copy_(reference.relu_backward(grad, out))
        if with_colsum:
            colsum.copy_(_as_rows(gm).sum(dim=0, dtype=torch.float32))
    return gm, colsum


relu_grad_colsum = torch.library.custom_op("fused_residual::relu_grad_colsum", _relu_grad_colsum, mutates_args=())


@relu_grad_colsum.register_fake
def _(grad, out, with_colsum):
    _checks.same_shape("relu_grad_colsum", "grad", grad, "out", out)
    n = out.shape[1]
    return (torch.empty(out.shape, dtype=out.dtype, device=out.device, **_grad_layout(out)),
            out.new_empty((n,) if with_colsum else (0,), dtype=torch.float32))


@_backend.records_backend
def _setup_relu_grad_colsum(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


@_backend.under_forward_backend
def _backward_relu_grad_colsum(ctx, grad_gm, grad_colsum):
    """Double backward: both outputs are linear in ``grad`` (the column sum adds each channel's masked
    values), so ``grad`` receives the ReLU gate applied to grad_gm + grad_colsum broadcast over channels."""
    (out,) = ctx.saved_tensors
    g = grad_gm
    if grad_colsum is not None and grad_colsum.numel():
        g = g + grad_colsum.to(out.dtype).view([1, -1] + [1] * (out.dim() - 2))
    return reference.relu_backward(g, out), None, None


relu_grad_colsum.register_autograd(_backward_relu_grad_colsum, setup_context=_setup_relu_grad_colsum)


def _masked_grad(grad, out, bias_needed):
    gm, colsum = _direct.call(relu_grad_colsum, _relu_grad_colsum, grad, out, bias_needed)
    return gm, (colsum.to(out.dtype) if bias_needed else None)


def _linear_grads(gm2d, x, weight, x_shape, need_x, need_w):
    gx = (gm2d @ weight).view(x_shape) if need_x else None
    gw = gm2d.t() @ rows_of(x) if need_w else None
    return gx, gw


def _conv_grads(gm, x, weight, stride, need_x, need_w):
    if not (need_x or need_w):
        return None, None
    gx, gw, _ = torch.ops.aten.convolution_backward(gm, x, weight, None, [stride, stride], [0, 0], [1, 1],
                                                    False, [0, 0], 1, [need_x, need_w, False])
    return gx, gw


# The setups save an operand only where a gradient needs it, as eager's autograd does (x for the weight
# gradient, the weight for x's; a convolution node keeps both): a frozen weight or an input changed in
# place after the forward is then no error, and nothing is held longer than needed.


@_backend.records_backend
def _setup_linear(ctx, inputs, output):
    x, weight, residual, bias = inputs
    need = ctx.needs_input_grad
    ctx.save_for_backward(x if need[1] else None, weight if need[0] else None, output)
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None


@_backend.under_forward_backend
def _backward_linear(ctx, grad):
    x, weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    gm, gb = _masked_grad(rows_of(grad), rows_of(out, view=True), ctx.has_bias and need[3])
    gx, gw = _linear_grads(gm, x, weight, ctx.x_shape, need[0], need[1])
    return gx, gw, gm.view(out.shape) if need[2] else None, gb


@_backend.records_backend
def _setup_dual_linear(ctx, inputs, output):
    x, weight, shortcut, shortcut_weight, bias = inputs
    need = ctx.needs_input_grad
    ctx.save_for_backward(x if need[1] else None, weight if need[0] else None,
                          shortcut if need[3] else None, shortcut_weight if need[2] else None, output)
    ctx.x_shape, ctx.shortcut_shape = x.shape, shortcut.shape
    ctx.has_bias = bias is not None


@_backend.under_forward_backend
def _backward_dual_linear(ctx, grad):
    x, weight, shortcut, shortcut_weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    gm, gb = _masked_grad(rows_of(grad), rows_of(out, view=True), ctx.has_bias and need[4])
    gx, gw = _linear_grads(gm, x, weight, ctx.x_shape, need[0], need[1])
    gs, gsw = _linear_grads(gm, shortcut, shortcut_weight, ctx.shortcut_shape, need[2], need[3])
    return gx, gw, gs, gsw, gb


@_backend.records_backend
def _setup_conv(ctx, inputs, output):
    x, weight, residual, bias, stride = inputs
    conv = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    ctx.save_for_backward(x if conv else None, weight if conv else None, output)
    ctx.has_bias = bias is not None
    ctx.stride = stride


@_backend.under_forward_backend
def _backward_conv(ctx, grad):
    x, weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    gm, gb = _masked_grad(grad, out, ctx.has_bias and need[3])
    gx, gw = _conv_grads(gm, x, weight, ctx.stride, need[0], need[1])
    return gx, gw, gm if need[2] else None, gb, None


@_backend.records_backend
def _setup_dual_conv(ctx, inputs, output):
    x, weight, shortcut, shortcut_weight, bias, shortcut_stride = inputs
    need = ctx.needs_input_grad
    main, side = need[0] or need[1], need[2] or need[3]
    ctx.save_for_backward(x if main else None, weight if main else None, shortcut if side else None,
                          shortcut_weight if side else None, output)
    ctx.has_bias = bias is not None
    ctx.shortcut_stride = shortcut_stride


@_backend.under_forward_backend
def _backward_dual_conv(ctx, grad):
    x, weight, shortcut, shortcut_weight, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    gm, gb = _masked_grad(grad, out, ctx.has_bias and need[4])
    gx, gw = _conv_grads(gm, x, weight, 1, need[0], need[1])
    gs, gsw = _conv_grads(gm, shortcut, shortcut_weight, ctx.shortcut_stride, need[2], need[3])
    return gx, gw, gs, gsw, gb, None


linear_add_relu.register_autograd(_backward_linear, setup_context=_setup_linear)
dual_linear_add_relu.register_autograd(_backward_dual_linear, setup_context=_setup_dual_linear)
conv1x1_add_relu.register_autograd(_backward_conv, setup_context=_setup_conv)
dual_conv1x1_add_relu.register_autograd(_backward_dual_conv, setup_context=_setup_dual_conv)


# ---------------------------------------------------------------------------------------------------------
# Autocast


def autocast_inputs(device_type: str, *args):
    """Under ``torch.autocast`` the GEMM ops run in the autocast dtype, as ``F.linear``/``F.conv2d`` do:
    every floating tensor but float64 is cast to it (float64 stays, as with F.linear, and is then refused
    by name); other arguments pass."""
    # meta tensors have no autocast (torch.amp.is_autocast_available would say so, but torch.compile of
    # torch 2.11 cannot trace it)
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return args
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                 else a for a in args)


def _autocast_kernel(op):
    """The op's autocast kernel: the public functions cast before calling, but a direct
    ``torch.ops.fused_residual`` call (an exported program or a compiled graph run under autocast) comes
    here with the inputs as they are; without it the implementation would see mixed dtypes."""
    def kernel(keyset, *args):
        args = autocast_inputs(args[0].device.type, *args)  # before the guard, which turns autocast off
        with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_KEYS):
            return op(*args)

    return kernel


for _op in (linear_add_relu, dual_linear_add_relu, conv1x1_add_relu, dual_conv1x1_add_relu):
    impl_autocast(_op._name, _autocast_kernel(_op._opoverload))
del _op

# The eager fast path of the four forward ops (fused_residual.ops._direct).
LinearAddReLU = _direct.function("linear_add_relu", _linear_add_relu, _setup_linear, _backward_linear)
DualLinearAddReLU = _direct.function("dual_linear_add_relu", _dual_linear_add_relu, _setup_dual_linear,
                                     _backward_dual_linear)
Conv1x1AddReLU = _direct.function("conv1x1_add_relu", _conv1x1_add_relu, _setup_conv, _backward_conv)
DualConv1x1AddReLU = _direct.function("dual_conv1x1_add_relu", _dual_conv1x1_add_relu, _setup_dual_conv,
                                      _backward_dual_conv)
