"""Triton kernels for ``out = relu(z + skip)`` and its backward.

Two addressing modes per direction, sharing one ``@triton.jit`` body (the flat kernels take five
arguments, which keeps their launch cheap):

* flat: every tensor is dense with the same strides, so element ``i`` of the output's storage is element
  ``i`` of every operand's storage. One pass over storage; contiguous and channels_last need no copy.
* strided: up to four (coalesced) dimensions, iterated in the output's storage order, each operand with its
  own strides. Covers sliced views and mismatched layouts without copies.

The optional packed mask stores bit ``i % 8`` of byte ``i // 8`` = ``not (out[i] <= 0)`` for storage
element ``i`` of the (dense) output: 1 bit per element instead of the output itself for the backward.

Arithmetic is fp32 whatever the storage dtype. Offsets are int64, so tensors past 2**31 elements work; the
strided kernels' element indices (and so their divisions) are int32 below that size (``INDEX64``).

ReLU follows eager PyTorch on the device the kernel serves, signed zeros included (``RELU_HW_MAX``, see
``kernels/common.py`` and ``fused_residual.ops.add_relu.relu_uses_hw_max``).
"""

import triton
import triton.language as tl

from .common import relu_f32, relu_keeps, to_storage

# Elements per program. Each thread owns BLOCK / (32 * num_warps) contiguous elements: 16 for the flat
# kernels at 8 warps, i.e. 64 bytes of fp32 or 32 bytes of fp16/bf16, so 128-bit accesses with several in
# flight. The strided kernels keep 4 elements per thread: their index arithmetic (div/mod per dim) takes
# 40-64 registers per thread there and ~250 at 16 elements per thread (sm_90a), which would leave a
# fifth as many programs resident per SM.
BLOCK = 4096
STRIDED_BLOCK = 1024
NUM_WARPS = 8
MAX_DIMS = 4


@triton.jit
def program_elements(BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    """This program's index and the linear indices of its BLOCK elements: int64 with ``INDEX64``, else
    int32 (cheaper division in the strided kernels, which pass it off below 2**31 elements)."""
    pid = tl.program_id(0)
    if INDEX64:
        pid = pid.to(tl.int64)
    return pid, pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def strided_offset(lin, size1, size2, size3, st0, st1, st2, st3):
    """Storage offset (int64) of linear index ``lin`` in a 4-D iteration space with sizes (-, s1, s2, s3).
    ``lin`` is int32 below 2**31 elements (``INDEX64`` off), so the divisions are 32-bit ones."""
    i3 = lin % size3
    rest = lin // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0.to(tl.int64) * st0 + i1.to(tl.int64) * st1 + i2.to(tl.int64) * st2 + i3.to(tl.int64) * st3


@triton.jit
def pack_bits(keep, BLOCK: tl.constexpr):
    """``keep`` (BLOCK booleans) -> BLOCK // 8 bytes, element 8*j + b at bit b of byte j."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK // 8, 8)) << tl.arange(0, 8)[None, :]
    return tl.sum(bits, axis=1).to(tl.uint8)


@triton.jit
def unpack_bits(packed, BLOCK: tl.constexpr):
    """Inverse of :func:`pack_bits`: BLOCK // 8 bytes -> BLOCK booleans."""
    bits = (packed.to(tl.int32)[:, None] >> tl.arange(0, 8)[None, :]) & 1
    return tl.reshape(bits, (BLOCK,)) != 0


@triton.jit
def add_relu_fwd_block(z_ptr, skip_ptr, out_ptr, mask_ptr, numel, pid, lin, z_off, s_off, o_off,
                       SAVE_MASK: tl.constexpr, RELU_HW_MAX: tl.constexpr, INTERPRET: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One program's elements ``lin`` (at the given storage offsets) of out = relu(z + skip)."""
    inb = lin < numel
    z = tl.load(z_ptr + z_off, mask=inb).to(tl.float32)
    s = tl.load(skip_ptr + s_off, mask=inb).to(tl.float32)
    # The sum of two values of the storage dtype is exact or correctly rounded in fp32, and ReLU commutes
    # with the final rounding (a nonzero sum never rounds to zero), so this matches eager's
    # round-then-ReLU bit for bit.
    y = to_storage(relu_f32(z + s, RELU_HW_MAX), out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + o_off, y, mask=inb)
    if SAVE_MASK:
        packed = pack_bits(relu_keeps(y.to(tl.float32)) & inb, BLOCK)
        byte = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + byte, packed, mask=byte < (numel + 7) // 8)


@triton.jit
def add_relu_fwd_kernel(z_ptr, skip_ptr, out_ptr, mask_ptr, numel, SAVE_MASK: tl.constexpr,
                        RELU_HW_MAX: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    """Flat: every tensor dense with the same strides; element i of storage throughout."""
    pid, lin = program_elements(BLOCK, True)
    add_relu_fwd_block(z_ptr, skip_ptr, out_ptr, mask_ptr, numel, pid, lin, lin, lin, lin,
                       SAVE_MASK, RELU_HW_MAX, INTERPRET, BLOCK)


@triton.jit
def add_relu_fwd_strided_kernel(
    z_ptr, skip_ptr, out_ptr, mask_ptr, numel,
    size1, size2, size3,
    z_st0, z_st1, z_st2, z_st3,
    s_st0, s_st1, s_st2, s_st3,
    o_st0, o_st1, o_st2, o_st3,
    SAVE_MASK: tl.constexpr, RELU_HW_MAX: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
    INDEX64: tl.constexpr,
):
    """Strided: a 4-D iteration space in out's storage order, each tensor with its own strides."""
    pid, lin = program_elements(BLOCK, INDEX64)
    add_relu_fwd_block(z_ptr, skip_ptr, out_ptr, mask_ptr, numel, pid, lin,
                       strided_offset(lin, size1, size2, size3, z_st0, z_st1, z_st2, z_st3),
                       strided_offset(lin, size1, size2, size3, s_st0, s_st1, s_st2, s_st3),
                       strided_offset(lin, size1, size2, size3, o_st0, o_st1, o_st2, o_st3),
                       SAVE_MASK, RELU_HW_MAX, INTERPRET, BLOCK)


@triton.jit
def add_relu_bwd_block(grad_ptr, out_ptr, mask_ptr, gin_ptr, numel, pid, lin, g_off, o_off,
                       FROM_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """``gin = grad where not (out <= 0) else 0`` for one program's elements; ``gin`` and ``out`` share
    offsets (the output's dense layout, which the mask's bit order also follows)."""
    inb = lin < numel
    g = tl.load(grad_ptr + g_off, mask=inb)
    if FROM_MASK:
        byte = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        packed = tl.load(mask_ptr + byte, mask=byte < (numel + 7) // 8, other=0)
        keep = unpack_bits(packed, BLOCK)
    else:
        keep = relu_keeps(tl.load(out_ptr + o_off, mask=inb).to(tl.float32))
    # A select, not arithmetic: the kept gradient is copied bit for bit in its storage dtype.
    tl.store(gin_ptr + o_off, tl.where(keep, g, tl.zeros_like(g)), mask=inb)


@triton.jit
def add_relu_bwd_kernel(grad_ptr, out_ptr, mask_ptr, gin_ptr, numel, FROM_MASK: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid, lin = program_elements(BLOCK, True)
    add_relu_bwd_block(grad_ptr, out_ptr, mask_ptr, gin_ptr, numel, pid, lin, lin, lin, FROM_MASK, BLOCK)


@triton.jit
def add_relu_bwd_strided_kernel(
    grad_ptr, out_ptr, mask_ptr, gin_ptr, numel,
    size1, size2, size3,
    g_st0, g_st1, g_st2, g_st3,
    o_st0, o_st1, o_st2, o_st3,
    FROM_MASK: tl.constexpr, BLOCK: tl.constexpr, INDEX64: tl.constexpr,
):
    """``grad`` with its own strides; ``gin`` and ``out`` with the output's."""
    pid, lin = program_elements(BLOCK, INDEX64)
    add_relu_bwd_block(grad_ptr, out_ptr, mask_ptr, gin_ptr, numel, pid, lin,
                       strided_offset(lin, size1, size2, size3, g_st0, g_st1, g_st2, g_st3),
                       strided_offset(lin, size1, size2, size3, o_st0, o_st1, o_st2, o_st3),
                       FROM_MASK, BLOCK)
