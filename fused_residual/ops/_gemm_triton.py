"""Launching the GEMM kernels of ``kernels/gemm_add_relu.py``: arguments, autotuning, TMA descriptors.

:func:`triton_gemm` computes ``out = relu(products + bias + residual)``; :func:`triton_relu_grad_colsum`
the masked gradient and the per-tile column sums of the backward. The autotuner keys on the row-count class
(``M_CLASS``), N, K1, K2 and the row addressing; :func:`autotune_choices` lists what it chose, from our own
record of each tuned launch (the configs' pre-launch hook), not from the tuner's internals.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field

import torch

from .. import _triton
from ._gemm_layout import (TRITON_MAX_ROWS, Operand, dot_precision, flat_rows, mn_strides, output_dims)
from ._registry import device_guard
from .add_relu import relu_uses_hw_max


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


def tma_descriptors(operands: list[Operand], residual, out, flat: bool) -> list | None:
    """Descriptors (a1, w1, a2, w2, residual, out; None for absent tensors) for the TMA configs, or None
    where those do not apply: before sm_90, with fp32 operands, with some tensor's pixel rows not evenly
    laid out (``flat`` false: strided convolutions), or rows TMA cannot address (they must start 16-byte
    aligned, with adjacent columns). The tiles are placeholders: the config's pre-launch hook sets them."""
    if not flat or out.element_size() > 2 or not _has_tma(out.device):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, N, OH, OW = output_dims(out)
    images = M // (OH * OW)
    matrices = []
    for op in operands:
        a_st = flat_rows(op.a_strides(), images, OH, OW)[0]
        matrices += [(op.x, M, op.k, a_st[0], a_st[3]), (op.weight, N, op.k, *op.w_strides())]
    matrices += [None] * (4 - len(matrices))
    for t in (residual, out):
        st = flat_rows(mn_strides(t), images, OH, OW)[0] if t is not None else None
        matrices.append((t, M, N, st[0], st[3]) if t is not None else None)
    for m in matrices:  # every check before any descriptor is built (the common miss costs little)
        if m is not None:
            t, rows, cols, row_stride, col_stride = m
            # rows 16-byte aligned, columns adjacent, rows not overlapping (an expanded tensor's do)
            if (col_stride != 1 or (row_stride * t.element_size()) % 16 or row_stride < cols or not rows
                    or not cols or t.data_ptr() % 16):
                return None
    return [None if m is None else TensorDescriptor(m[0], [m[1], m[2]], [m[3], 1], [16, 16]) for m in matrices]


_NO_STRIDES = (0, 0, 0, 0)


@dataclass
class GemmLaunch:
    """One launch of ``gemm_add_relu_kernel``: its tensors, sizes, strides and compile-time flags.
    :meth:`arguments` lists them in the kernel's order; :meth:`attach_descriptors` adds the TMA
    descriptors where the tensors allow them."""

    operands: list[Operand]
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    out: torch.Tensor
    descriptors: list = field(default_factory=lambda: [None] * 6)  # a1, w1, a2, w2, residual, out

    def __post_init__(self):
        self.M, self.N, self.OH, self.OW = output_dims(self.out)
        images = self.M // (self.OH * self.OW) if self.M else 0
        a1, a2 = self.operands[0], (self.operands[1] if len(self.operands) > 1 else None)
        self.a1, self.a2 = a1, a2
        self.a1_strides, self.a1_flat = flat_rows(a1.a_strides(), images, self.OH, self.OW)
        self.a2_strides, self.a2_flat = (flat_rows(a2.a_strides(), images, self.OH, self.OW) if a2
                                         else (_NO_STRIDES, True))
        self.r_strides, self.r_flat = (flat_rows(mn_strides(self.residual), images, self.OH, self.OW)
                                       if self.residual is not None else (_NO_STRIDES, True))
        self.o_strides, self.o_flat = flat_rows(mn_strides(self.out), images, self.OH, self.OW)
        self.flat = self.a1_flat and self.a2_flat and self.r_flat and self.o_flat
        self.tma_ready = False

    @property
    def k2(self) -> int:
        return self.a2.k if self.a2 else 0

    def arguments(self) -> list:
        a1, a2, out = self.a1, self.a2, self.out
        return [
            a1.x, a1.weight, a2.x if a2 else a1.x, a2.weight if a2 else a1.weight,
            self.bias if self.bias is not None else out, self.residual if self.residual is not None else out, out,
            *self.descriptors,
            self.M, self.N, a1.k, self.k2, self.OH, self.OW,
            *self.a1_strides, *a1.w_strides(), *self.a2_strides, *(a2.w_strides() if a2 else (0, 0)),
            *self.r_strides, *self.o_strides,
        ]

    def flags(self, gemm_kernels) -> dict:
        """The kernel's constexpr flags (the autotuner's key among them)."""
        out = self.out
        return dict(M_CLASS=gemm_kernels.m_class(self.M),
                    HAS_A2=self.a2 is not None, HAS_BIAS=self.bias is not None,
                    HAS_RESIDUAL=self.residual is not None,
                    A1_FLAT=self.a1_flat, A2_FLAT=self.a2_flat, R_FLAT=self.r_flat, O_FLAT=self.o_flat,
                    TMA_READY=self.tma_ready, PREFETCH_EPILOGUE=out.element_size() <= 2,
                    DOT_PRECISION=self.dot_precision, RELU_HW_MAX=relu_uses_hw_max(out.device),
                    INTERPRET=_triton.interpreting())

    @property
    def dot_precision(self) -> str:
        return dot_precision(self.out.dtype, self.out.device, conv=self.a1.x.dim() == 4)

    def attach_descriptors(self) -> bool:
        """Build the TMA descriptors where these tensors and this device allow them; whether it did."""
        descriptors = tma_descriptors(self.operands, self.residual, self.out, self.flat)
        if descriptors is not None:
            self.descriptors = descriptors
        self.tma_ready = descriptors is not None
        return self.tma_ready

    def tuning_key(self, gemm_kernels, config_set: str) -> tuple:
        """The problem as the autotuner tells problems apart (plus dtype and device)."""
        return (config_set, gemm_kernels.m_class(self.M), self.N, self.a1.k, self.k2, self.a1_flat, self.a2_flat,
                self.o_flat, self.out.dtype, self.out.device)

    def grid(self, meta) -> tuple[int]:
        tiles = _triton.cdiv(self.M, meta["BLOCK_M"]) * _triton.cdiv(self.N, meta["BLOCK_N"])
        if meta["PERSISTENT"]:
            return (max(1, min(tiles, multiprocessors(self.out.device) * meta["PERSISTENT"])),)
        return (tiles,)


def triton_gemm(operands: list[Operand], bias, residual, out, config=None) -> None:
    """out = relu(products + bias + residual) by the Triton kernel: autotuned, or with ``config`` (a
    ``triton.Config``) when given (benchmarks/sweep_gemm.py times each config that way)."""
    M, N, _, _ = output_dims(out)
    if M == 0 or N == 0:
        return
    if M > TRITON_MAX_ROWS:
        raise ValueError(f"the Triton GEMM kernel takes at most {TRITON_MAX_ROWS} rows (pixels), got {M}")
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[n] at bias_ptr + n (a sliced or expanded bias: copied)
    gemm_kernels = _triton.kernels("gemm_add_relu")
    launch = GemmLaunch(operands, bias, residual, out)
    config_set = gemm_kernels.config_set(out.element_size(), launch.dot_precision)
    with device_guard(out):
        if config is None and _triton.interpreting():  # one small config: autotuning would run every config
            gemm_kernels.gemm_add_relu_kernel[launch.grid](*launch.arguments(), **launch.flags(gemm_kernels),
                                                          **gemm_kernels.INTERPRETER_CONFIG)
        elif config is not None or os.environ.get("FUSED_RESIDUAL_GEMM_AUTOTUNE", "1") == "0":
            # Without a config: the first of the list, untuned. The CUDA test run sets this, as autotuning
            # each of its many tiny shapes would cost more than the tests themselves.
            _launch_config(gemm_kernels, launch, config or gemm_kernels.CONFIG_SETS[config_set][0])
        else:
            _launch_tuned(gemm_kernels, launch, config_set)


def _launch_config(gemm_kernels, launch: GemmLaunch, config) -> None:
    if config.kwargs["TMA"]:
        if not launch.attach_descriptors():
            raise ValueError(f"config {config} moves tensors by TMA, which these tensors or this device do not "
                             "allow (sm_90+, 16-bit matrices with 16-byte aligned rows)")
    arguments, flags = launch.arguments(), launch.flags(gemm_kernels)
    if config.kwargs["TMA"]:
        gemm_kernels.set_tma_blocks({**dict(zip(gemm_kernels.gemm_add_relu_kernel.arg_names, arguments)),
                                     **config.kwargs})
    gemm_kernels.gemm_add_relu_kernel[launch.grid](*arguments, **flags, **config.kwargs,
                                                   num_warps=config.num_warps, num_stages=config.num_stages)


def _launch_tuned(gemm_kernels, launch: GemmLaunch, config_set: str) -> None:
    tuner = gemm_kernels.AUTOTUNED[config_set]
    problem = launch.tuning_key(gemm_kernels, config_set)
    built = False
    if problem in _TUNED_WITHOUT_TMA:
        # Tuned with the TMA configs among the candidates, and a pointer config won: the same autotuner key
        # (TMA_READY), without the cost of building descriptors it will not read.
        launch.tma_ready = True
    elif tma_enabled():
        built = launch.attach_descriptors()
    key = (*problem, launch.tma_ready)  # the autotuner's key, TMA_READY included
    first = key not in _CHOICES
    with _TUNER_LOCK:  # the launch's pre-launch hooks, ours included, run in this thread alone
        tuner[launch.grid](*launch.arguments(), **launch.flags(gemm_kernels))
        if first:  # the hook's last call was the launch itself, after any tuning: the chosen config
            _CHOICES[key] = gemm_kernels.last_launched_config()
    if built and not _CHOICES[key]["TMA"]:
        _TUNED_WITHOUT_TMA.add(problem)


# The autotuner's choice per key (GemmLaunch.tuning_key and TMA_READY), recorded at the key's first launch.
_CHOICES: dict[tuple, dict] = {}
# Problems that were tuned with descriptors and chose a config without TMA: later calls skip building
# descriptors (several microseconds of host time).
_TUNED_WITHOUT_TMA: set = set()
# Held around every autotuned launch, so that the config the pre-launch hook recorded last is this launch's.
_TUNER_LOCK = threading.Lock()


def autotune_choices() -> list[str]:
    """One line per problem the GEMM autotuner has tuned in this process: the key (config list, row-count
    class, N, K1, K2, row addressing, dtype, device, TMA_READY) and the config it chose. Benchmarks print these, so
    that a run records which tiles won."""
    return [f"{key[0]} configs: key {key[1:]} -> {choice}" for key, choice in _CHOICES.items()]


def triton_relu_grad_colsum(grad, out, gm, partial) -> None:
    """gm = grad where not (out <= 0) else 0 and, if ``partial`` is given, its per-tile column sums
    (``[cdiv(M, GRAD_BLOCK_M), N]`` float32, summed in a fixed order afterwards: no atomics)."""
    M, N, OH, OW = output_dims(out)
    if M > TRITON_MAX_ROWS:
        raise ValueError(f"the Triton masked-gradient kernel takes at most {TRITON_MAX_ROWS} rows, got {M}")
    gemm_kernels = _triton.kernels("gemm_add_relu")
    images = M // (OH * OW) if M else 0
    g_st, g_flat = flat_rows(mn_strides(grad), images, OH, OW)
    o_st, o_flat = flat_rows(mn_strides(out), images, OH, OW)
    grid = (_triton.cdiv(M, gemm_kernels.GRAD_BLOCK_M), _triton.cdiv(N, gemm_kernels.GRAD_BLOCK_N))
    with device_guard(out):
        gemm_kernels.relu_grad_colsum_kernel[grid](
            grad, out, gm, partial if partial is not None else gm, M, N, OH, OW, *g_st, *o_st,
            G_FLAT=g_flat, O_FLAT=o_flat, HAS_COLSUM=partial is not None,
            BLOCK_M=gemm_kernels.GRAD_BLOCK_M, BLOCK_N=gemm_kernels.GRAD_BLOCK_N)
