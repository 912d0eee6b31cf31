"""Small ``@triton.jit`` helpers shared by the kernels: ReLU with eager semantics and stores in the storage
dtype."""

import triton
import triton.language as tl


@triton.jit
def relu_f32(x, RELU_HW_MAX: tl.constexpr):
    """ReLU on fp32 values as eager computes it on the device served; NaN passes either way.

    ``RELU_HW_MAX``: the hardware max of x and 0 (``max.f32``, what CUDA eager's ``clamp_min`` runs through
    ``fmaxf``), so that signed zeros come out as eager's do. Otherwise ``x < 0 ? 0 : x``, CPU eager's
    ``clamp_min``, which keeps -0.0.
    """
    if RELU_HW_MAX:
        return tl.where(x != x, x, tl.maximum(x, 0.0))
    else:
        return tl.where(x < 0.0, 0.0, x)


@triton.jit
def relu_keeps(x):
    """PyTorch's ReLU gradient gate: passes where ``not (out <= 0)``, i.e. out > 0 or out is NaN."""
    return (x > 0.0) | (x != x)


@triton.jit
def f32_to_bf16_rtne(x):
    """fp32 -> bf16 with round-to-nearest-even in integer arithmetic, NaN kept quiet.

    Only used under the Triton interpreter, whose own fp32 -> bf16 cast truncates; on GPUs the hardware
    conversion (``cvt.rn.bf16.f32``) gives the same bits.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_storage(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` (round-to-nearest-even on every backend)."""
    if INTERPRET and dtype == tl.bfloat16:
        return f32_to_bf16_rtne(x)
    else:
        return x.to(dtype)
