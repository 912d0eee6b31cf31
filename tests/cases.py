"""The case table every op's tests draw from: dtypes, shapes, layouts, the (device, backend) pairs to run on,
and sample arguments for every registered op (``tests/test_opcheck.py`` runs ``torch.library.opcheck`` over
all of them).

Everything here is small on purpose: CI runs the whole suite on CPU, the Triton kernels under the Triton
interpreter. A test that needs a case of its own (a size that walks several tiles of one kernel, a shape past
2**31 elements) keeps it beside the test; what more than one op or more than one test file uses lives here.
The layout vocabulary (``LAYOUTS``, ``layout()``) and the GEMM cases (``GEMM_CASES``) are the package's own
(``fused_residual.testing``, ``fused_residual.verify``): ``fused-residual verify`` runs the same cases on a
user's machine, so they are re-exported here rather than copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from fused_residual import _triton, reference, verify
from fused_residual.testing import LAYOUTS, layout  # noqa: F401  (re-exported: the layout vocabulary)

# ---- dtypes ------------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# opcheck checks registration (schema, fake impl, autograd, dispatch under compile), not numerics: float32 and
# one 16-bit dtype (the one verify's quick grid and CPU autocast use) are enough.
OPCHECK_DTYPES = [torch.float32, torch.bfloat16]

# ---- shapes ------------------------------------------------------------------------------------------------

ODD_4D = (3, 5, 7, 9)  # no dimension a power of two, numel 945 (not a multiple of 8 or of a block)
RESNET_STAGE = (2, 64, 14, 14)  # a ResNet stage's activation (layer3 of a 224 px input, batch 2)

# Elementwise ops (add_relu and friends): one element, a tail shorter than a vector, several blocks with a
# tail, an odd 4-D shape, a ResNet stage, and a rank above 4.
ELEMENTWISE_SHAPES = [(1,), (7,), (1000,), ODD_4D, RESNET_STAGE, (2, 3, 2, 3, 2, 3)]
# Degenerate sizes: empty tensors and single elements.
EMPTY_AND_SINGLE_SHAPES = [(0,), (0, 3), (1,), (1, 1, 1, 1)]

# BatchNorm(+add)+ReLU: (shape, memory format). 4-D NCHW and channels_last, the MLP block's 2-D (N, C), 3-D,
# C = 1 and C = 3, planes of odd sizes. The kernel-level tests (test_bn_cpp.py, test_bn_triton.py) add the
# geometries that walk their own kernels' tiles and reduction units.
BN_CASES = [
    ((4, 8, 5, 3), "contiguous"),
    ((4, 8, 5, 3), "channels_last"),
    ((3, 16, 7, 7), "channels_last"),
    ((2, 3, 9, 11), "contiguous"),  # C = 3, 9x11 planes, numel 594 (not a multiple of 8)
    ((33, 24), "contiguous"),  # 2-D
    ((5, 6, 13), "contiguous"),  # 3-D
    ((2, 1, 4, 4), "contiguous"),  # C = 1
]

# GEMM + bias + residual + ReLU ops: name -> ((fused fn, reference fn, indices of the weights), input builder
# ``build(dtype, device) -> args``, layout label). Linear (3-D input, 1x1, odd sizes, transposed views, no
# bias), dual linear, 1x1 conv (NCHW, channels_last, stride 2 with odd sizes, a strided channels_last view)
# and dual 1x1 conv.
GEMM_CASES = verify.GEMM_CASES

# ---- layouts -----------------------------------------------------------------------------------------------

# (z, skip, grad) layouts for the two-input elementwise ops: equal layouts take the flat kernels, mixed ones
# the strided kernels. channels_last exists for 4-D tensors only (see elementwise_layout_cases).
ELEMENTWISE_LAYOUTS = [(k, k, k) for k in LAYOUTS] + [
    ("contiguous", "channels_last", "transposed"),
    ("sliced", "transposed", "contiguous"),
    ("channels_last", "contiguous", "sliced"),
]


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def elementwise_layout_cases(shapes=ELEMENTWISE_SHAPES, layouts=ELEMENTWISE_LAYOUTS):
    """pytest params ``(shape, (z, skip, grad) layouts)``: every shape in every layout it has."""
    for shape in shapes:
        for case in layouts:
            if "channels_last" in case and len(shape) != 4:
                continue  # channels_last exists for 4-D tensors only
            yield pytest.param(shape, case, id=f"{shape_id(shape)}-{'/'.join(case)}")


def bn_case_ids(cases=BN_CASES) -> list[str]:
    return [f"{shape_id(s)}-{f}" for s, f in cases]


# ---- devices and backends ----------------------------------------------------------------------------------


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    if device == "cuda":
        return ["triton", "eager"]
    names = ["cpp", "eager"]
    if _triton.status()[0] and _triton.interpreting():
        names.insert(0, "triton")
    return names


def device_params():
    """The devices this machine has, for parametrize; the CUDA one carries the cuda mark."""
    return [pytest.param(d, id=d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in devices()]


def device_backend_params():
    """(device, backend) pairs this machine can run, for parametrize; CUDA ones carry the cuda mark."""
    marks = {"cuda": [pytest.mark.cuda]}
    return [pytest.param(d, b, id=f"{d}-{b}", marks=marks.get(d, [])) for d in devices() for b in backends_for(d)]


# ---- sample arguments for every registered op --------------------------------------------------------------


@dataclass
class OpSample:
    """One call of ``torch.ops.fused_residual.<op>`` (``op``: the name, with ``.overload`` unless default)."""
    op: str
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    what: str = ""


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _add_relu_samples(device, dtype) -> list[OpSample]:
    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    z, s = _leaf(rand(3, 4, 5, 6)), _leaf(rand(3, 4, 5, 6))
    zc, sc = _leaf(_cl(rand(2, 3, 4, 5))), _leaf(rand(2, 3, 4, 5))  # mixed layouts: the strided kernels
    g = rand(3, 4, 5, 6)
    out = torch.relu(z.detach() + s.detach())
    out_cl = _cl(torch.relu(rand(2, 3, 4, 5)))
    g_cl = rand(2, 3, 4, 5)
    return [
        OpSample("add_relu", (z, s), what="nchw"),
        OpSample("add_relu", (zc, sc), what="channels_last z, contiguous skip"),
        OpSample("add_relu_with_mask", (z, s), what="nchw"),
        OpSample("add_relu_", (z.detach().clone(), s.detach()), what="no grad"),
        # the in-place op's autograd: z a non-leaf (a leaf requiring grad cannot be written in place)
        OpSample("add_relu_", (z * 1, s), what="non-leaf z, both require grad"),
        OpSample("add_relu_backward", (g, out), what="nchw"),
        OpSample("add_relu_mask_backward", (g, reference.pack_mask(out), list(out.stride())), what="nchw"),
        OpSample("add_relu_mask_backward", (g_cl, reference.pack_mask(out_cl), list(out_cl.stride())),
                 what="channels_last out"),
    ]


def _gemm_samples(device, dtype) -> list[OpSample]:
    samples = []
    for case, ((_, ref_fn, _), build, _) in GEMM_CASES.items():
        # the reference functions carry the op names (fused_residual.reference.linear_add_relu, ...)
        samples.append(OpSample(ref_fn.__name__, tuple(verify.leaf_copies(build(dtype, device))), what=case))
    # the optional arguments by keyword, and left to their defaults
    x, w, r, b, stride = verify.leaf_copies(GEMM_CASES["conv-cl-s2"][1](dtype, device))
    samples.append(OpSample("conv1x1_add_relu", (x, w, r), dict(bias=b, stride=stride), "keywords"))
    x, w, sc, ws, b, stride = verify.leaf_copies(GEMM_CASES["dual-conv-s2"][1](dtype, device))
    samples.append(OpSample("dual_conv1x1_add_relu", (x, w, sc, ws), dict(shortcut_stride=stride), "keywords"))
    x, w, r, _ = verify.leaf_copies(GEMM_CASES["linear-3d-bias"][1](dtype, device))
    samples.append(OpSample("linear_add_relu", (x, w, r), what="bias defaulted"))
    # the GEMM backward's ReLU gate with the bias gradient (column sums), 2-D and 4-D
    g, o = torch.randn(6, 10, device=device).to(dtype), torch.randn(6, 10, device=device).to(dtype)
    samples.append(OpSample("relu_grad_colsum", (g, o, True), what="2-d, colsum"))
    g4, o4 = torch.randn(2, 3, 4, 5, device=device).to(dtype), torch.randn(2, 3, 4, 5, device=device).to(dtype)
    samples.append(OpSample("relu_grad_colsum", (g4, o4, False), what="4-d, no colsum"))
    return samples


def _bn_backward_inputs(x, weight, eps=1e-5):
    """(out, mask, mean, invstd) of a training forward of batch_norm_relu on ``x``, computed with torch (no
    backend involved): float32 statistics, the mask packed in ``out``'s storage order as the op packs it."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    invstd = torch.rsqrt(var + eps)
    view = [1, -1] + [1] * (x.dim() - 2)
    y = (x.float() - mean.view(view)) * invstd.view(view)
    if weight is not None:
        y = y * weight.float().view(view)
    out = torch.relu(y).to(x.dtype)  # elementwise: keeps x's memory format
    return out, reference.pack_mask(out), mean, invstd


def _bn_samples(device, dtype) -> list[OpSample]:
    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    C = 4
    x = _leaf(rand(3, C, 5, 5))
    xc = _leaf(_cl(rand(3, C, 5, 5)))
    skip = _leaf(rand(3, C, 5, 5))
    w = _leaf((torch.rand(C, device=device) + 0.5).to(dtype))
    b = _leaf(rand(C))
    rm, rv = torch.zeros(C, device=device).to(dtype), torch.ones(C, device=device).to(dtype)
    rm32, rv32 = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5  # float32 stats (AMP)
    x2, w2 = _leaf(rand(6, C)), _leaf((torch.rand(C, device=device) + 0.5).to(dtype))
    g, gc = rand(3, C, 5, 5), _cl(rand(3, C, 5, 5))
    out, mask, mean, invstd = _bn_backward_inputs(x.detach(), w.detach())
    _, mask_c, mean_c, invstd_c = _bn_backward_inputs(xc.detach(), None)
    return [
        OpSample("batch_norm_relu", (x, w, b, rm, rv, True, 1e-5, True), what="nchw, train, mask"),
        OpSample("batch_norm_relu", (xc, None, None, rm, rv, False, 1e-5, False),
                 what="channels_last, eval, no weight/bias"),
        OpSample("batch_norm_relu", (x2, w2, None, None, None, True, 1e-5, False),
                 what="2-d, train, no bias, no running stats"),
        OpSample("batch_norm_add_relu", (x, skip, w, b, None, None, True, 1e-5, True),
                 what="nchw, train, no running stats, mask"),
        OpSample("batch_norm_add_relu", (xc, skip, w, b, rm32, rv32, False, 1e-3, False),
                 what="channels_last x, nchw skip, eval, float32 stats"),
        OpSample("batch_norm_relu_backward", (g, x.detach(), None, mask, mean, invstd, w.detach(), True, True, True),
                 what="nchw, mask, train, all grads"),
        OpSample("batch_norm_relu_backward", (g, x.detach(), out, None, mean, invstd, None, False, False, False),
                 what="nchw, out, eval, dx only"),
        OpSample("batch_norm_relu_backward", (gc, xc.detach(), None, mask_c, mean_c, invstd_c, None, True, False,
                                              True),
                 what="channels_last, mask, train, param grads"),
    ]


def op_samples(device: str, dtype: torch.dtype) -> list[OpSample]:
    """Sample calls of every op in the ``fused_residual`` namespace: random values, tensors of the ops with
    autograd requiring grad, NCHW and channels_last activations, optional arguments given and None."""
    return _add_relu_samples(device, dtype) + _gemm_samples(device, dtype) + _bn_samples(device, dtype)
