"""Triton kernels for BatchNorm (+ add) + ReLU: the four primitives of ``fused_residual.ops.batch_norm``.

Every activation is dense and shares one storage layout, viewed as ``[outer, C, inner]``: storage element
``i`` belongs to channel ``(i // inner) % C`` (NCHW: inner = H*W; channels_last and 2-D: inner = 1).

* Reductions (``stats``, ``bwd_reduce``), in two deterministic stages, no atomics: a grid of (channel
  blocks x splits) programs, each reducing a fixed range of tiles of its channels into a float32 partial,
  then one small kernel combining each channel's partials in split order. A tile is 3-D,
  ``[BLOCK_O, BLOCK_C, BLOCK_J]`` over (outer, channel, inner): NCHW launches take BLOCK_C = 1 and a run of
  one plane along ``inner`` (contiguous), channels_last / 2-D ones BLOCK_J = 1 and a run of channels
  (contiguous). Tiles are numbered per channel block, tile ``t`` covering outer rows ``t // JB`` and inner
  block ``t % JB``: one division per tile, none per element.
* The statistics are merged as (count, mean, M2) triples (Chan et al.'s parallel update): each tile's
  mean and its sum of squared deviations from that mean, so data far from zero (mean 1e4, std 1) keep
  their variance, which a float32 sum of squares minus the squared sum would lose entirely. The means are
  kept relative to a pivot, the channel's first element, added back once at the end: a float32 sum of
  thousands of values near 1e4 would itself be off by several ulps of the mean, and so would every merge.
* Elementwise (``apply``, ``bwd_apply``): one flat 1-D kernel over storage, the channel of each element
  ``(i // inner) % C`` (32-bit division unless ``INDEX64``), per-channel vectors gathered (they stay in L1).
  The packed mask follows add_relu's: bit ``i % 8`` of byte ``i // 8``, whole bytes per program.

Arithmetic is float32 whatever the storage dtype; every loaded value is upcast first (the interpreter holds
bf16 as raw 16-bit integers) and results are rounded once. ReLU and its gate are kernels/common.py's.
"""

import triton
import triton.language as tl

from .add_relu import pack_bits, program_elements, unpack_bits
from .common import relu_f32, relu_keeps, to_storage

# Reductions: elements per tile (BLOCK_O * BLOCK_C * BLOCK_J), 16 per thread at 8 warps, and the most
# channels one channels_last tile spans (64 fp32 = 256 contiguous bytes per outer row).
TILE = 4096
MAX_BLOCK_C = 64
REDUCE_WARPS = 8
# The second stage: channels per program, one thread each walking that channel's partials.
FINISH_BLOCK_C = 128
FINISH_WARPS = 4
# Elementwise: add_relu's flat shape, 16 elements per thread at 8 warps (64 bytes of fp32, 32 of
# fp16/bf16 per tensor: several 128-bit accesses in flight). The per-channel gathers beside them keep it at
# 32-80 registers (sm_90a, tests/test_codegen.py); NCHW planes that are a multiple of 16 long need fewer,
# the channel being known constant over each thread's run.
APPLY_BLOCK = 4096
APPLY_WARPS = 8


# ---------------------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def tile_offsets(t, JB, c, outer, inner, row_stride, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
                 INDEX64: tl.constexpr):
    """Storage offsets and in-bounds mask, [BLOCK_O, BLOCK_C, BLOCK_J], of tile ``t`` of channels ``c``
    (a [BLOCK_C] vector; the caller adds the bound on ``c`` to the mask)."""
    if BLOCK_J == 1:  # channels_last / 2-D (inner == 1, JB == 1): j is 0, known so, which keeps the
        o = t * BLOCK_O + tl.arange(0, BLOCK_O)  # channel run's alignment visible (128-bit loads)
        j = tl.arange(0, 1)
    else:
        o = (t // JB) * BLOCK_O + tl.arange(0, BLOCK_O)
        j = (t % JB) * BLOCK_J + tl.arange(0, BLOCK_J)
    cc = c
    if INDEX64:
        o = o.to(tl.int64)
        cc = c.to(tl.int64)
    off = o[:, None, None] * row_stride + (cc * inner)[None, :, None] + j[None, None, :]
    valid = (o < outer)[:, None, None] & (j < inner)[None, None, :]
    return off, valid


@triton.jit
def sum_tile(v):
    """[BLOCK_O, BLOCK_C, BLOCK_J] -> [BLOCK_C]."""
    return tl.sum(tl.sum(v, axis=2), axis=0)


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries of disjoint sets (Chan, Golub, LeVeque 1979). An empty side
    leaves the other unchanged."""
    n = n_a + n_b
    w = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)  # n_b / n
    delta = mean_b - mean_a
    mean = mean_a + delta * w
    m2 = m2_a + m2_b + delta * delta * n_a * w
    return n, mean, m2


@triton.jit
def channel_pivot(x_ptr, c, cin, inner, INDEX64: tl.constexpr):
    """The value the statistics of channels ``c`` are taken relative to: each channel's first element
    (storage offset c * inner), or 0 where that is NaN or infinite (which would poison every deviation;
    the results then carry the specials as eager's do)."""
    cc = c
    if INDEX64:
        cc = c.to(tl.int64)
    p = tl.load(x_ptr + cc * inner, mask=cin, other=0.0).to(tl.float32)
    return tl.where(tl.abs(p) < float("inf"), p, 0.0)


@triton.jit
def gate_bits(mask_ptr, off, valid):
    """Bit ``off % 8`` of byte ``off // 8`` of the packed mask, for arbitrary offsets (a gather: tiles of
    the reductions do not cover whole bytes)."""
    byte = tl.load(mask_ptr + (off >> 3), mask=valid, other=0).to(tl.int32)
    return ((byte >> (off & 7).to(tl.int32)) & 1) != 0


# ---------------------------------------------------------------------------------------------------------
# stats: per-channel mean and biased variance


@triton.jit
def bn_stats_partial_kernel(x_ptr, part_ptr, outer, C, inner, row_stride, JB, tiles, tiles_per_split,
                            BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
                            INDEX64: tl.constexpr):
    """Program (channel block, split): (count, mean - pivot, M2) of its channels over tiles
    [split * tiles_per_split, ...), written to part[split, 0:3, c]."""
    cb = tl.program_id(0)
    split = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = c < C
    pivot = channel_pivot(x_ptr, c, cin, inner, INDEX64)[None, :, None]
    n = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tiles)
    for t in range(t0, t1):
        off, valid = tile_offsets(t, JB, c, outer, inner, row_stride, BLOCK_O, BLOCK_J, INDEX64)
        valid = valid & cin[None, :, None]
        x = tl.where(valid, tl.load(x_ptr + off, mask=valid, other=0.0).to(tl.float32) - pivot, 0.0)
        # The tile's own mean and squared deviations from it (two passes over registers): stable however
        # far the data sit from zero.
        n_t = sum_tile(valid.to(tl.float32))
        mean_t = sum_tile(x) / tl.maximum(n_t, 1.0)
        dev = tl.where(valid, x - mean_t[None, :, None], 0.0)
        n, mean, m2 = chan_merge(n, mean, m2, n_t, mean_t, sum_tile(dev * dev))
    base = part_ptr + split * 3 * C + c
    tl.store(base, n, mask=cin)
    tl.store(base + C, mean, mask=cin)
    tl.store(base + 2 * C, m2, mask=cin)


@triton.jit
def bn_stats_finish_kernel(x_ptr, part_ptr, mean_ptr, var_ptr, C, inner, splits, BLOCK_C: tl.constexpr,
                           INDEX64: tl.constexpr):
    """Merge each channel's ``splits`` partials in split order: pivot + mean and M2 / count."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = c < C
    n = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for s in range(splits):
        base = part_ptr + s * 3 * C + c
        n_s = tl.load(base, mask=cin, other=0.0)
        mean_s = tl.load(base + C, mask=cin, other=0.0)
        m2_s = tl.load(base + 2 * C, mask=cin, other=0.0)
        n, mean, m2 = chan_merge(n, mean, m2, n_s, mean_s, m2_s)
    tl.store(mean_ptr + c, channel_pivot(x_ptr, c, cin, inner, INDEX64) + mean, mask=cin)
    tl.store(var_ptr + c, m2 / tl.maximum(n, 1.0), mask=cin)


# ---------------------------------------------------------------------------------------------------------
# apply: out = relu((x - mean) * scale + shift [+ skip]), optional packed gate


@triton.jit
def channel_of(lin, C, inner):
    """The channel of storage element ``lin`` (inner == 1 is specialised by triton: no division then)."""
    return (lin // inner) % C


@triton.jit
def bn_apply_kernel(x_ptr, skip_ptr, mean_ptr, scale_ptr, shift_ptr, out_ptr, mask_ptr, numel, C, inner,
                    HAS_SKIP: tl.constexpr, SAVE_MASK: tl.constexpr, RELU_HW_MAX: tl.constexpr,
                    INTERPRET: tl.constexpr, BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    pid, lin = program_elements(BLOCK, INDEX64)
    inb = lin < numel
    c = channel_of(lin, C, inner)  # in [0, C) for every lane: the gathers need no mask
    x = tl.load(x_ptr + lin, mask=inb).to(tl.float32)
    y = (x - tl.load(mean_ptr + c)) * tl.load(scale_ptr + c) + tl.load(shift_ptr + c)
    if HAS_SKIP:
        y += tl.load(skip_ptr + lin, mask=inb).to(tl.float32)
    # ReLU before the single rounding: it commutes with rounding (a value rounds to zero only from the
    # same sign), so this is eager's relu-of-fp32-then-copy.
    out = to_storage(relu_f32(y, RELU_HW_MAX), out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + lin, out, mask=inb)
    if SAVE_MASK:  # the gate of the value stored, after rounding
        packed = pack_bits(relu_keeps(out.to(tl.float32)) & inb, BLOCK)
        byte = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + byte, packed, mask=byte < (numel + 7) // 8)


# ---------------------------------------------------------------------------------------------------------
# bwd_reduce: g = dy where the gate is on; per-channel sums of g and g * (x - mean)


@triton.jit
def bn_bwd_reduce_partial_kernel(dy_ptr, x_ptr, out_ptr, mask_ptr, mean_ptr, part_ptr, outer, C, inner,
                                 row_stride, JB, tiles, tiles_per_split, FROM_MASK: tl.constexpr,
                                 BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
                                 INDEX64: tl.constexpr):
    """Program (channel block, split): sums over its tiles into part[split, 0:2, c], each tile reduced
    (a tree) and added to per-channel accumulators. (Tile-shaped accumulators, reduced once at the end,
    would save the per-tile reduction but cost 32 more registers per thread, which spilled on sm_90.)"""
    cb = tl.program_id(0)
    split = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = c < C
    mu = tl.load(mean_ptr + c, mask=cin, other=0.0)[None, :, None]
    acc_g = tl.zeros((BLOCK_C,), tl.float32)
    acc_gx = tl.zeros((BLOCK_C,), tl.float32)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tiles)
    for t in range(t0, t1):
        off, valid = tile_offsets(t, JB, c, outer, inner, row_stride, BLOCK_O, BLOCK_J, INDEX64)
        valid = valid & cin[None, :, None]
        if FROM_MASK:
            keep = gate_bits(mask_ptr, off, valid)
        else:
            keep = relu_keeps(tl.load(out_ptr + off, mask=valid, other=0.0).to(tl.float32))
        # A select, so NaN/Inf in dy where the gate is off contribute nothing.
        g = tl.where(keep & valid, tl.load(dy_ptr + off, mask=valid, other=0.0).to(tl.float32), 0.0)
        x = tl.load(x_ptr + off, mask=valid, other=0.0).to(tl.float32)
        acc_g += sum_tile(g)
        acc_gx += sum_tile(g * (x - mu))  # as eager: g * (x - mean) everywhere (0 * Inf is NaN there too)
    base = part_ptr + split * 2 * C + c
    tl.store(base, acc_g, mask=cin)
    tl.store(base + C, acc_gx, mask=cin)


@triton.jit
def bn_bwd_reduce_finish_kernel(part_ptr, sum_g_ptr, sum_gx_ptr, C, splits, BLOCK_C: tl.constexpr):
    """Each channel's partial sums added in split order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = c < C
    sg = tl.zeros((BLOCK_C,), tl.float32)
    sgx = tl.zeros((BLOCK_C,), tl.float32)
    for s in range(splits):
        base = part_ptr + s * 2 * C + c
        sg += tl.load(base, mask=cin, other=0.0)
        sgx += tl.load(base + C, mask=cin, other=0.0)
    tl.store(sum_g_ptr + c, sg, mask=cin)
    tl.store(sum_gx_ptr + c, sgx, mask=cin)


# ---------------------------------------------------------------------------------------------------------
# bwd_apply: dskip = g; dx = (g - b - (x - mean) * d) * a


@triton.jit
def bn_bwd_apply_kernel(dy_ptr, x_ptr, out_ptr, mask_ptr, mean_ptr, a_ptr, b_ptr, d_ptr, dx_ptr, dskip_ptr,
                        numel, C, inner, FROM_MASK: tl.constexpr, HAS_DSKIP: tl.constexpr,
                        INTERPRET: tl.constexpr, BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    pid, lin = program_elements(BLOCK, INDEX64)
    inb = lin < numel
    c = channel_of(lin, C, inner)
    dy = tl.load(dy_ptr + lin, mask=inb)
    if FROM_MASK:
        byte = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        keep = unpack_bits(tl.load(mask_ptr + byte, mask=byte < (numel + 7) // 8, other=0), BLOCK)
    else:
        keep = relu_keeps(tl.load(out_ptr + lin, mask=inb).to(tl.float32))
    if HAS_DSKIP:
        # A select in the storage dtype: the kept gradient copied bit for bit, +0 elsewhere.
        tl.store(dskip_ptr + lin, tl.where(keep, dy, tl.zeros_like(dy)), mask=inb)
    g = tl.where(keep, dy.to(tl.float32), 0.0)
    xmu = tl.load(x_ptr + lin, mask=inb).to(tl.float32) - tl.load(mean_ptr + c)
    dx = (g - tl.load(b_ptr + c) - xmu * tl.load(d_ptr + c)) * tl.load(a_ptr + c)
    tl.store(dx_ptr + lin, to_storage(dx, dx_ptr.dtype.element_ty, INTERPRET), mask=inb)
