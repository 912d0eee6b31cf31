"""Triton GEMM with a fused bias + residual + ReLU epilogue, and the masked-gradient kernel of its backward.

    out[m, n] = relu( sum_k A1[m, k] W1[n, k]  (+ sum_k A2[m, k] W2[n, k])  + bias[n] + residual[m, n] )

Rows ``m`` are output pixels ``(img, oh, ow)`` of an ``OH x OW`` grid, so one kernel serves

* linear layers: ``OH = OW = 1``, row ``m`` is sample ``m`` (triton specialises the 1s, the index
  arithmetic folds away);
* 1x1 convolutions over NCHW or NHWC tensors with any stride: each operand carries its own strides for
  ``(img, oh, ow, k)``, with the convolution stride folded into the ``oh``/``ow`` strides, so a strided
  channels_last shortcut is read in place; a tensor whose pixels lie evenly apart (dense NHWC) is
  addressed like a matrix (``*_FLAT``), without the pixel divisions;
* two products into one accumulator (``HAS_A2``): a block's last layer and its projection shortcut, with
  no concatenation materialised.

On sm_90+ the TMA configs (``TMA``) read and write matrices (every tensor's rows 16-byte aligned, columns
adjacent) through TMA descriptors instead of pointers: :func:`gemm_tile_tma`.

The accumulator is fp32; bias and residual are added to it and ReLU applied before the single store.
Programs are ordered in groups of ``GROUP_M`` row tiles for L2 reuse of the weight tiles. Row indices are
int32 (the launcher bounds M), row and channel offsets int64 (M * stride can pass 2**31), so no 64-bit
division is needed.

Under the Triton interpreter (``INTERPRET``) the dot operands are upcast to fp32 first: the interpreter keeps
bf16 as raw uint16, so a bf16 ``tl.dot`` there would multiply bit patterns. Compiled kernels keep fp16/bf16
operands on the tensor cores (wgmma on sm_90, mma on sm_80).
"""

import triton
import triton.language as tl

from .common import relu_f32, relu_keeps, to_storage


def make_config(bm, bn, bk, stages, warps, group=8, persistent=0, split=False, tma=False):
    """A config: BLOCK_M x BLOCK_N tiles, BLOCK_K deep steps, ``stages`` pipeline stages, ``warps`` warps,
    GROUP_M row tiles per group, ``persistent`` programs per SM (0: one program per tile), ``split`` the
    epilogue into two halves of the N tile, and ``tma``: operands, residual and output moved by the Tensor
    Memory Accelerator (sm_90+, matrices only; :func:`set_tma_blocks` gives the descriptors their tiles)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "PERSISTENT": persistent,
                          "EPILOGUE_SPLIT": split, "TMA": tma}, num_stages=stages, num_warps=warps,
                         pre_hook=before_launch)


_last_launched: dict = {}


def before_launch(args: dict) -> None:
    """Every config's pre-launch hook (the autotuner calls it before each launch, the timed ones and the
    final one; ``args``: the kernel's arguments by name, config included): gives TMA descriptors their
    block shapes and records the config, which :func:`last_launched_config` returns."""
    if args["TMA"]:
        set_tma_blocks(args)
    _last_launched.clear()
    _last_launched.update({name: args[name] for name in CONFIG_PARAMETERS})


def last_launched_config() -> dict:
    """The config of the latest launch through the autotuner (its parameters, warps and stages)."""
    return dict(_last_launched)


CONFIG_PARAMETERS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PERSISTENT", "EPILOGUE_SPLIT", "TMA", "num_warps",
                     "num_stages")


def set_tma_blocks(args: dict) -> None:
    """Give the TMA descriptors among a launch's arguments the block shapes of its config (``args``: the
    kernel's arguments by name, config included; the autotuner calls this before each TMA launch)."""
    bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    epilogue = [bm, bn // 2 if args["EPILOGUE_SPLIT"] else bn]
    for name, block in (("a1_desc", [bm, bk]), ("w1_desc", [bn, bk]), ("a2_desc", [bm, bk]), ("w2_desc", [bn, bk]),
                        ("r_desc", epilogue), ("o_desc", epilogue)):
        if args[name] is not None:
            args[name].block_shape = block


# Static configs, keyed on (M, N, K1, K2) and the row addressing by the autotuner. 128x128 and 128x256
# tiles for compute-bound shapes; the narrower ones for the memory-bound shortcut shapes (small K,
# N = 64..512) and small problems.
# 128x256 tiles spill registers unless the epilogue is split: a whole residual tile beside the accumulator
# is too much (tests/test_codegen.py checks every config for spills). Register and shared-memory figures
# below are ptxas's for sm_90a.
# The two-stage configs are for K of one or two BLOCK_K steps (the ResNet shortcuts: K = 64..256), where
# deeper pipelines only cost shared memory: 64x128 and 128x64 tiles with 4 warps take 48 KiB in two
# stages against 96 KiB in four, and 64x64 tiles 32 KiB, so more programs fit on an SM and more loads can
# be in flight on those memory-bound shapes; the autotuner takes them only where they measure faster.
CONFIGS = [
    make_config(128, 128, 64, 4, 8),
    make_config(128, 128, 64, 3, 8),
    make_config(64, 128, 32, 4, 4),
    make_config(128, 64, 64, 4, 4),
    make_config(64, 128, 64, 4, 4),
    make_config(64, 256, 32, 4, 8),
    make_config(64, 64, 32, 5, 4),
    make_config(128, 64, 64, 2, 4),
    make_config(64, 128, 64, 2, 4),
    make_config(64, 64, 64, 2, 4),
    # Split epilogue (the tile's two N halves finished one after the other, so only half a residual tile
    # is live beside the accumulator): 128x256 tiles without spills, on wgmma's widest shape (m64n256k16),
    # for compute-bound products; 128x128 tiles in 120 registers instead of 162-179, two programs per SM
    # instead of one.
    make_config(128, 256, 64, 3, 8, split=True),
    make_config(128, 128, 64, 3, 8, split=True),
    # Persistent: as many programs as fit on an SM beside each other (sm_90a, triton 3.6: 204, 192 and 128
    # registers per thread), each stepping through tiles with the next tile's loads overlapping this
    # tile's epilogue.
    make_config(128, 128, 64, 3, 8, persistent=1, split=True),
    make_config(64, 128, 64, 2, 4, persistent=2),
    make_config(64, 64, 64, 2, 4, persistent=3),
    # TMA copies (sm_90+, matrices with 16-byte aligned rows): operand tiles land in shared memory without
    # per-element address arithmetic or registers, as cuBLAS's Hopper kernels move them; the residual and
    # the output go through shared memory too.
    make_config(128, 256, 64, 3, 8, split=True, tma=True),
    make_config(128, 128, 64, 4, 8, tma=True),
    make_config(128, 128, 64, 3, 8, persistent=1, split=True, tma=True),
    make_config(128, 64, 64, 2, 4, tma=True),
    make_config(64, 128, 64, 2, 4, persistent=2, tma=True),
]
# fp32 operands on the tensor cores (TF32) take twice the shared memory per tile of 16-bit ones: the same
# tiles with half as deep K steps (128x128x64 in four stages would need 256 KiB, more than any GPU has).
# (Not the persistent ones, nor 128x256 tiles: with fp32 operands they spill registers; nor TMA, kept to
# 16-bit operands.)
TF32_CONFIGS = [make_config(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"] // 2, c.num_stages,
                            c.num_warps, c.kwargs["GROUP_M"], split=c.kwargs["EPILOGUE_SPLIT"])
                for c in CONFIGS if not (c.kwargs["PERSISTENT"] or c.kwargs["TMA"])
                and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
# fp32 with TF32 off multiplies on the FMA units; their operand tiles live in registers, so K tiles of 64
# spill on sm_80. Shallower K tiles for that path.
IEEE_FP32_CONFIGS = [
    make_config(128, 128, 16, 3, 8),
    make_config(128, 128, 32, 3, 8),
    make_config(64, 128, 32, 3, 4),
    make_config(128, 64, 32, 3, 4),
    make_config(64, 64, 16, 4, 4),
]
# The one config used under the interpreter (no autotuning there: it would run every config on the CPU).
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4, "PERSISTENT": 0,
                      "EPILOGUE_SPLIT": False, "TMA": False}


def runs_on(config, capability: tuple[int, int]) -> bool:
    """Whether ``config`` is used on a GPU of this compute capability: the persistent configs and tiles
    over 128x128 on sm_90 and newer only (on sm_80 the flattened pipeline, and 128x256 tiles with triton
    3.6, spill registers; tests/test_codegen.py), TMA there only too (sm_80 has no TMA)."""
    k = config.kwargs
    return capability >= (9, 0) or not (k["PERSISTENT"] or k["TMA"] or k["BLOCK_M"] * k["BLOCK_N"] > 128 * 128)


def _capability(t) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (9, 0)


def prune_configs(configs, named_args, **kwargs):
    """Drop configs not used on this GPU (:func:`runs_on`), TMA configs where the launcher built no
    descriptors (``TMA_READY`` false), and tiles much larger than the problem (they only add masked work)."""
    every = {**named_args, **kwargs}  # (arguments passed by keyword come in kwargs)
    M_CLASS, N = every["M_CLASS"], named_args["N"]  # the class, not M: the same configs for the whole class
    K = max(named_args["K1"], named_args["K2"])
    capability = _capability(named_args["out_ptr"])
    tma_ready = every["TMA_READY"]
    usable = [c for c in configs if runs_on(c, capability) and (tma_ready or not c.kwargs["TMA"])]
    kept = [c for c in usable
            if c.kwargs["BLOCK_M"] <= max(32, M_CLASS)
            and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(N))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(K))]
    return kept or [min(usable, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


@triton.jit
def row_offsets(m, OH, OW, s_img, s_h, s_w, FLAT: tl.constexpr):
    """Offset of output row ``m`` (an int32 pixel index) = pixel (img, oh, ow) in a tensor with those
    strides. ``FLAT``: the tensor's pixels lie evenly ``s_img`` apart (2-D matrices, dense NHWC
    tensors), so the offset is one multiply, without the divisions. Offsets are int64."""
    if FLAT:
        return m.to(tl.int64) * s_img
    img = m // (OH * OW)
    rest = m % (OH * OW)
    return img.to(tl.int64) * s_img + (rest // OW).to(tl.int64) * s_h + (rest % OW).to(tl.int64) * s_w


@triton.jit
def accumulate(acc, a_ptr, w_ptr, offs_m, offs_n, K, OH, OW, a_sn, a_sh, a_sw, a_sk, w_sn, w_sk,
               A_FLAT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
               INTERPRET: tl.constexpr):
    """acc += A[offs_m, :K] @ W[offs_n, :K]^T. The K offsets and steps are int64 too: an NCHW input's
    channel stride is H * W, and BLOCK_K of those can pass 2**31."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_k64 = offs_k.to(tl.int64)
    a_ptrs = a_ptr + row_offsets(offs_m, OH, OW, a_sn, a_sh, a_sw, A_FLAT)[:, None] + offs_k64[None, :] * a_sk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * w_sn + offs_k64[:, None] * w_sk
    a_step = tl.cast(a_sk, tl.int64) * BLOCK_K
    w_step = tl.cast(w_sk, tl.int64) * BLOCK_K
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if INTERPRET:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += a_step
        w_ptrs += w_step
    return acc


@triton.jit
def finish(acc, rows, cols, M, N, OH, OW, bias_ptr, res_ptr, out_ptr, r_sn, r_sh, r_sw, r_sc,
           o_sn, o_sh, o_sw, o_sc, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
           R_FLAT: tl.constexpr, O_FLAT: tl.constexpr, RELU_HW_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    """The epilogue of rows x cols of the output: + bias + residual (loaded here), ReLU, one masked store."""
    cols_in = cols % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + row_offsets(rows % M, OH, OW, r_sn, r_sh, r_sw, R_FLAT)[:, None]
                       + cols_in.to(tl.int64)[None, :] * r_sc).to(tl.float32)
    y = to_storage(relu_f32(acc, RELU_HW_MAX), out_ptr.dtype.element_ty, INTERPRET)
    o_ptrs = (out_ptr + row_offsets(rows, OH, OW, o_sn, o_sh, o_sw, O_FLAT)[:, None]
              + cols.to(tl.int64)[None, :] * o_sc)
    tl.store(o_ptrs, y, mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def column_halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The accumulator's left and right BLOCK_N / 2 columns, for an epilogue finished in two halves."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number ``tile``: tiles go in groups of GROUP_M row tiles
    that step through the column tiles together, so a group's weight tiles stay in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group) % group_m, (tile % group) // group_m


@triton.jit
def gemm_tile(
    tile, a1_ptr, w1_ptr, a2_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K1, K2, OH, OW,
    a1_sn, a1_sh, a1_sw, a1_sk, w1_sn, w1_sk,
    a2_sn, a2_sh, a2_sw, a2_sk, w2_sn, w2_sk,
    r_sn, r_sh, r_sw, r_sc,
    o_sn, o_sh, o_sw, o_sc,
    HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PREFETCH_EPILOGUE: tl.constexpr,
    A1_FLAT: tl.constexpr, A2_FLAT: tl.constexpr, R_FLAT: tl.constexpr, O_FLAT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RELU_HW_MAX: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile, number ``tile`` in grouped order."""
    pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # Row (pixel) indices are int32 (the launcher keeps M + BLOCK_M below 2**31); offsets are int64.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices keep every operand load in bounds without a mask; the store is masked instead.
    rows_in = rows % M
    cols_in = cols % N

    # With 16-bit operands the epilogue's residual and bias are loaded before the products, so that their
    # latency hides behind them: on the memory-bound shapes (small K) the residual tile is the largest read
    # of a program. A prefetched fp32 tile would spill registers (tests/test_codegen.py), so fp32 loads it
    # after the products.
    if PREFETCH_EPILOGUE:
        if HAS_RESIDUAL:
            residual = tl.load(res_ptr + row_offsets(rows_in, OH, OW, r_sn, r_sh, r_sw, R_FLAT)[:, None]
                               + cols_in.to(tl.int64)[None, :] * r_sc)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols_in)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate(acc, a1_ptr, w1_ptr, rows_in, cols_in, K1, OH, OW, a1_sn, a1_sh, a1_sw, a1_sk,
                     w1_sn, w1_sk, A1_FLAT, BLOCK_K, DOT_PRECISION, INTERPRET)
    if HAS_A2:
        acc = accumulate(acc, a2_ptr, w2_ptr, rows_in, cols_in, K2, OH, OW, a2_sn, a2_sh, a2_sw, a2_sk,
                         w2_sn, w2_sk, A2_FLAT, BLOCK_K, DOT_PRECISION, INTERPRET)

    if PREFETCH_EPILOGUE:
        if HAS_BIAS:
            acc += bias.to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            acc += residual.to(tl.float32)
        finish(acc, rows, cols, M, N, OH, OW, bias_ptr, res_ptr, out_ptr, r_sn, r_sh, r_sw, r_sc,
               o_sn, o_sh, o_sw, o_sc, False, False, R_FLAT, O_FLAT, RELU_HW_MAX, INTERPRET)
    elif EPILOGUE_SPLIT:
        # Two BLOCK_N / 2 halves, one after the other: only half a residual tile is live beside the
        # accumulator, which lets 128 x 256 tiles run without spilling.
        left, right = column_halves(acc, BLOCK_M, BLOCK_N)
        half = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        finish(left, rows, half, M, N, OH, OW, bias_ptr, res_ptr, out_ptr, r_sn, r_sh, r_sw, r_sc,
               o_sn, o_sh, o_sw, o_sc, HAS_BIAS, HAS_RESIDUAL, R_FLAT, O_FLAT, RELU_HW_MAX, INTERPRET)
        finish(right, rows, half + BLOCK_N // 2, M, N, OH, OW, bias_ptr, res_ptr, out_ptr, r_sn, r_sh, r_sw,
               r_sc, o_sn, o_sh, o_sw, o_sc, HAS_BIAS, HAS_RESIDUAL, R_FLAT, O_FLAT, RELU_HW_MAX, INTERPRET)
    else:
        finish(acc, rows, cols, M, N, OH, OW, bias_ptr, res_ptr, out_ptr, r_sn, r_sh, r_sw, r_sc,
               o_sn, o_sh, o_sw, o_sc, HAS_BIAS, HAS_RESIDUAL, R_FLAT, O_FLAT, RELU_HW_MAX, INTERPRET)


@triton.jit
def accumulate_tma(acc, a_desc, w_desc, row0, col0, K, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """acc += A[row0:, :K] @ W[col0:, :K]^T, tiles fetched by TMA (zeros past the matrices' edges)."""
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([row0, k * BLOCK_K])
        w = w_desc.load([col0, k * BLOCK_K])
        if INTERPRET:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w.T, acc)
    return acc


@triton.jit
def finish_tma(acc, row0, col0, N, bias_ptr, r_desc, o_desc, out_dtype: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr, RELU_HW_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    """The epilogue of the output block at (row0, col0), the accumulator's shape: + bias + residual, ReLU,
    one TMA store (which leaves out what lies past the output's edges)."""
    if HAS_BIAS:
        cols = (col0 + tl.arange(0, acc.shape[1])) % N
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += r_desc.load([row0, col0]).to(tl.float32)
    o_desc.store([row0, col0], to_storage(relu_f32(acc, RELU_HW_MAX), out_dtype, INTERPRET))


@triton.jit
def gemm_tile_tma(
    tile, a1_desc, w1_desc, a2_desc, w2_desc, r_desc, o_desc, bias_ptr, out_dtype: tl.constexpr, M, N, K1, K2,
    HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PREFETCH_EPILOGUE: tl.constexpr,
    RELU_HW_MAX: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr,
):
    """:func:`gemm_tile` for matrices (16-byte aligned rows, unit column stride) with TMA copies: no
    address arithmetic per element, and the edges are the descriptors' (zero fill on loads, clipped
    stores) instead of masks."""
    pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    if PREFETCH_EPILOGUE and HAS_RESIDUAL:
        residual = r_desc.load([row0, col0])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate_tma(acc, a1_desc, w1_desc, row0, col0, K1, BLOCK_K, INTERPRET)
    if HAS_A2:
        acc = accumulate_tma(acc, a2_desc, w2_desc, row0, col0, K2, BLOCK_K, INTERPRET)
    if PREFETCH_EPILOGUE:
        if HAS_RESIDUAL:
            acc += residual.to(tl.float32)
        finish_tma(acc, row0, col0, N, bias_ptr, r_desc, o_desc, out_dtype, HAS_BIAS, False, RELU_HW_MAX,
                   INTERPRET)
    elif EPILOGUE_SPLIT:
        left, right = column_halves(acc, BLOCK_M, BLOCK_N)
        finish_tma(left, row0, col0, N, bias_ptr, r_desc, o_desc, out_dtype, HAS_BIAS, HAS_RESIDUAL,
                   RELU_HW_MAX, INTERPRET)
        finish_tma(right, row0, col0 + BLOCK_N // 2, N, bias_ptr, r_desc, o_desc, out_dtype, HAS_BIAS,
                   HAS_RESIDUAL, RELU_HW_MAX, INTERPRET)
    else:
        finish_tma(acc, row0, col0, N, bias_ptr, r_desc, o_desc, out_dtype, HAS_BIAS, HAS_RESIDUAL, RELU_HW_MAX,
                   INTERPRET)


@triton.jit
def gemm_add_relu_kernel(
    a1_ptr, w1_ptr, a2_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr,
    a1_desc, w1_desc, a2_desc, w2_desc, r_desc, o_desc,
    M, N, K1, K2, OH, OW,
    a1_sn, a1_sh, a1_sw, a1_sk, w1_sn, w1_sk,
    a2_sn, a2_sh, a2_sw, a2_sk, w2_sn, w2_sk,
    r_sn, r_sh, r_sw, r_sc,
    o_sn, o_sh, o_sw, o_sc,
    M_CLASS,  # the autotuner's key only (m_class(M))
    HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PREFETCH_EPILOGUE: tl.constexpr,
    A1_FLAT: tl.constexpr, A2_FLAT: tl.constexpr, R_FLAT: tl.constexpr, O_FLAT: tl.constexpr,
    TMA_READY: tl.constexpr, DOT_PRECISION: tl.constexpr, RELU_HW_MAX: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr, TMA: tl.constexpr,
):
    """One program per tile, or with ``PERSISTENT`` (programs per SM, > 0) a fixed number of programs
    that step through the tiles. The persistent loop is flattened with the single product's K loop, so
    the pipeline loads the next tile's operands while this tile's epilogue runs; the epilogue operands
    are then loaded after the products (prefetched, they would stay live across the flattened loop: 500+
    bytes of spills per thread on sm_90a).

    ``TMA``: the operands, residual and output are matrices with TMA descriptors (``*_desc``, built by the
    launcher where ``TMA_READY``: sm_90+, 16-byte aligned rows; None otherwise), read and written by TMA
    copies. ``TMA_READY`` itself only keys the autotuner (the TMA configs are pruned without it)."""
    if PERSISTENT > 0:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=not HAS_A2):
            if TMA:
                gemm_tile_tma(tile, a1_desc, w1_desc, a2_desc, w2_desc, r_desc, o_desc, bias_ptr,
                              out_ptr.dtype.element_ty, M, N, K1, K2, HAS_A2, HAS_BIAS, HAS_RESIDUAL, False,
                              RELU_HW_MAX, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPILOGUE_SPLIT)
            else:
                gemm_tile(tile, a1_ptr, w1_ptr, a2_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr, M, N, K1, K2, OH, OW,
                          a1_sn, a1_sh, a1_sw, a1_sk, w1_sn, w1_sk, a2_sn, a2_sh, a2_sw, a2_sk, w2_sn, w2_sk,
                          r_sn, r_sh, r_sw, r_sc, o_sn, o_sh, o_sw, o_sc, HAS_A2, HAS_BIAS, HAS_RESIDUAL,
                          False, A1_FLAT, A2_FLAT, R_FLAT, O_FLAT, DOT_PRECISION, RELU_HW_MAX, INTERPRET,
                          BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPILOGUE_SPLIT)
    elif TMA:
        gemm_tile_tma(tl.program_id(0), a1_desc, w1_desc, a2_desc, w2_desc, r_desc, o_desc, bias_ptr,
                      out_ptr.dtype.element_ty, M, N, K1, K2, HAS_A2, HAS_BIAS, HAS_RESIDUAL,
                      PREFETCH_EPILOGUE and not EPILOGUE_SPLIT, RELU_HW_MAX, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K,
                      GROUP_M, EPILOGUE_SPLIT)
    else:
        gemm_tile(tl.program_id(0), a1_ptr, w1_ptr, a2_ptr, w2_ptr, bias_ptr, res_ptr, out_ptr, M, N, K1, K2,
                  OH, OW, a1_sn, a1_sh, a1_sw, a1_sk, w1_sn, w1_sk, a2_sn, a2_sh, a2_sw, a2_sk, w2_sn, w2_sk,
                  r_sn, r_sh, r_sw, r_sc, o_sn, o_sh, o_sw, o_sc, HAS_A2, HAS_BIAS, HAS_RESIDUAL,
                  PREFETCH_EPILOGUE and not EPILOGUE_SPLIT, A1_FLAT, A2_FLAT, R_FLAT, O_FLAT,
                  DOT_PRECISION, RELU_HW_MAX, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EPILOGUE_SPLIT)


def m_class(m: int) -> int:
    """The row-count class the autotuner keys on: the next power of two. A model run at several batch
    sizes (or image sizes) is tuned once per class, not once per size, and the configs the pruning keeps
    depend on the class alone, so every size of a class runs the same config."""
    return triton.next_power_of_2(max(int(m), 1))


def _autotuned(configs):
    # Tuned per row-count class (M_CLASS, see m_class), N, K and row addressing (a strided 1x1 convolution
    # and a linear layer of the same sizes run different code).
    return triton.autotune(configs=configs,
                           key=["M_CLASS", "N", "K1", "K2", "A1_FLAT", "A2_FLAT", "O_FLAT", "TMA_READY"],
                           prune_configs_by={"early_config_prune": prune_configs})(gemm_add_relu_kernel)


# The config list for each kind of product, and its autotuned kernel.
CONFIG_SETS = {"16-bit": CONFIGS, "tf32": TF32_CONFIGS, "ieee fp32": IEEE_FP32_CONFIGS}
AUTOTUNED = {name: _autotuned(configs) for name, configs in CONFIG_SETS.items()}


def config_set(element_size: int, dot_precision: str) -> str:
    """The name of the config list for operands of ``element_size`` bytes multiplied at ``dot_precision``."""
    if element_size <= 2:
        return "16-bit"
    return "ieee fp32" if dot_precision == "ieee" else "tf32"


# ---- backward -------------------------------------------------------------------------------------------
GRAD_BLOCK_M = 64
GRAD_BLOCK_N = 64


@triton.jit
def relu_grad_colsum_kernel(
    grad_ptr, out_ptr, gm_ptr, partial_ptr, M, N, OH, OW,
    g_sn, g_sh, g_sw, g_sc,
    o_sn, o_sh, o_sw, o_sc,
    G_FLAT: tl.constexpr, O_FLAT: tl.constexpr,
    HAS_COLSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """gm[m, n] = grad where not (out <= 0) else 0, written as a row-major [M, N] matrix (NHWC for
    convolutions), and partial[pid_m, n] = sum of this program's rows of gm in fp32: stage one of the bias
    gradient (stage two sums the partials in a fixed order; no atomics, so the result is deterministic)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 pixel indices, int64 offsets
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = (rows[:, None] < M) & (cols[None, :] < N)
    g = tl.load(grad_ptr + row_offsets(rows, OH, OW, g_sn, g_sh, g_sw, G_FLAT)[:, None]
                + cols.to(tl.int64)[None, :] * g_sc,
                mask=inb, other=0.0)
    o = tl.load(out_ptr + row_offsets(rows, OH, OW, o_sn, o_sh, o_sw, O_FLAT)[:, None]
                + cols.to(tl.int64)[None, :] * o_sc,
                mask=inb, other=0.0).to(tl.float32)
    gm = tl.where(relu_keeps(o), g, tl.zeros_like(g))
    tl.store(gm_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], gm, mask=inb)
    if HAS_COLSUM:
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(gm.to(tl.float32), axis=0), mask=cols < N)
