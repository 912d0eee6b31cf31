"""Layouts and precision policy of the GEMM ops: operands, output shapes and memory formats, how the kernel
addresses rows, and when fp32 products may use TF32 (:func:`dot_precision`).

A GEMM op's rows are output pixels (1x1 convolutions: ``M = B * OH * OW``) or matrix rows (linear ops), its
columns output channels / features. Every tensor is passed to the Triton kernel as four strides (image,
row, column-in-row, channel); a tensor whose pixels lie evenly one stride apart is "flat" and addressed with
one multiply instead of divisions (the kernel's ``*_FLAT`` flags).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    The kernel then addresses rows with one multiply instead of divisions (``*_FLAT`` flags)."""
    p = s_w if ow > 1 else (s_h if oh > 1 else s_img)
    if (ow == 1 or s_w == p) and (oh == 1 or s_h == ow * p) and (images <= 1 or s_img == oh * ow * p):
        return p
    return None


def flat_rows(strides: tuple[int, int, int, int], images: int, oh: int, ow: int):
    """(strides to pass, FLAT flag): a flat tensor's pixel stride goes in the image-stride slot."""
    s_img, s_h, s_w, s_c = strides
    p = pixel_stride(images, oh, ow, s_img, s_h, s_w)
    return ((p, 0, 0, s_c), True) if p is not None else (strides, False)


# The Triton kernel indexes rows (pixels) with int32: M + BLOCK_M must stay below 2**31.
TRITON_MAX_ROWS = 2**31 - 1024


def output_dims(out: torch.Tensor) -> tuple[int, int, int, int]:
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


def rows_of(t: torch.Tensor, view: bool = False) -> torch.Tensor:
    """``t [..., C]`` as a [prod(...), C] matrix (spelled out, not -1: C may be 0)."""
    if t.dim() == 2:
        return t
    shape = (t.shape[:-1].numel(), t.shape[-1])
    return t.view(shape) if view else t.reshape(shape)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [M, N] matrix view of a [M, N] or NCHW-shaped tensor (a view for channels_last, else a copy)."""
    return t if t.dim() == 2 else rows_of(t.permute(0, 2, 3, 1))
