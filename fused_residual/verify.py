"""Numerics verification of every fused op against eager PyTorch and a float64 reference.

``run()`` walks a grid of ops, dtypes, shapes and layouts, forward and backward, and returns one
:class:`Check` per compared tensor; ``fused-residual verify`` prints them as a table. The test suite runs
the same checks (``tests/test_add_relu.py``, ``tests/test_gemm_add_relu.py``), so what users verify on their
machine is what CI asserts.

* add_relu (both save modes, and in place): forward and both gradients bit-identical to eager, with NaN,
  +-Inf and +-0 among the inputs, outputs poisoned so an unwritten element shows.
* GEMM ops: forward and every gradient within ``2 * eager's error + atol * max(1, |ref|)`` of float64
  (``fused_residual.testing.accuracy``); the output gradient is zeroed where the float64 pre-activation is
  within a rounding margin of the ReLU kink, where eager's own gate flips with rounding.
* batch_norm_relu / batch_norm_add_relu (both save modes, training and eval, NCHW / channels_last / 2-D):
  forward, every gradient and the updated running statistics within the same bound; the shortcut's
  gradient (the gated output gradient) bit-identical to ``where(out > 0, grad, 0)``.
* a converted torchvision Bottleneck (projection shortcut, stride 2) against the unconverted block and
  float64: eval (BN folded into the dual GEMM) and train (batch_norm_relu twice, batch_norm_add_relu at the
  tail) within the same bound: the output, the input gradient, every parameter's gradient and the BN
  running statistics. In float32 the inputs are drawn so that no ReLU input lies within rounding of the
  kink (``testing.relu_margin``); in float16 / bfloat16, where gates flip with rounding for a fraction of
  the elements in eager as in ours, gradients are compared in the L2 norm, no closer than the 25% relative
  error eager itself reaches (``testing.accuracy_l2``): a loose check there, the float32 one is the tight
  one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from . import _alloc, _backend, _checks, functional, reference
from .testing import accuracy, accuracy_l2, bitwise_mismatches, draw_clear_of_relu_kinks, layout, with_specials

DTYPES = _checks.DTYPES_BY_NAME
# Pre-activations closer to 0 than this (relative to their scale) get a zero output gradient in the GEMM
# gradient checks: there the ReLU gate legitimately flips with rounding, in eager as in fused code.
KINK_MARGIN = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@dataclass
class Check:
    op: str
    dtype: str
    layout: str
    shape: str
    what: str
    error: float
    eager_error: float | None  # None where eager itself is the reference (bit-exact checks)
    ok: bool
    note: str = ""


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _shape(t) -> str:
    return "x".join(map(str, t)) if len(t) else "scalar"


# ---- add_relu ---------------------------------------------------------------------------------------------


def _exact(op, dtype, lay, shape, what, actual, expected) -> Check:
    n, first = bitwise_mismatches(actual, expected)
    diff = (actual.double() - expected.double()).abs().nan_to_num(0.0)
    err = diff.max().item() if diff.numel() else 0.0
    return Check(op, _dtype_name(dtype), lay, _shape(expected.shape), what, err, None, n == 0,
                 "" if n == 0 else f"{n} elements differ; {first}")


def check_add_relu(shape, layouts: tuple[str, str, str], dtype: torch.dtype, device: str, backend: str | None,
                   mode: str = "output") -> list[Check]:
    """add_relu (``mode`` "output" or "mask") or add_relu_ ("inplace") against eager, bit for bit."""
    lz, ls, lg = layouts
    base_z = with_specials(torch.randn(shape, dtype=dtype, device=device))
    base_s = with_specials(torch.randn(shape, dtype=dtype, device=device))
    grad = layout(with_specials(torch.randn(shape, dtype=dtype, device=device)), lg)
    op = "add_relu_" if mode == "inplace" else f"add_relu[save={mode}]"
    lay = "/".join(layouts)

    ez, es = base_z.clone().requires_grad_(), layout(base_s, ls).requires_grad_()
    if mode == "inplace":
        ref = torch.relu_(layout(ez * 1, lz).add_(es))
    else:
        ref = torch.relu(layout(ez, lz) + es)
    ref.backward(grad)

    z_leaf = base_z.clone().requires_grad_()
    skip = layout(base_s, ls).requires_grad_()
    with _backend.use_backend(backend or _backend.current_backend()), _alloc.poison_outputs():
        if mode == "inplace":
            z = layout(z_leaf * 1, lz)
            out = functional.add_relu_(z, skip)
            expected_stride = z.stride()
        else:
            z = layout(z_leaf, lz)
            out = functional.add_relu(z, skip, save=mode)
            expected_stride = torch.empty_like(z).stride()
        out.backward(grad)
    checks = [
        _exact(op, dtype, lay, shape, "forward", out.detach(), ref.detach()),
        _exact(op, dtype, lay, shape, "grad z", z_leaf.grad, ez.grad),
        _exact(op, dtype, lay, shape, "grad skip", skip.grad, es.grad),
    ]
    if out.stride() != expected_stride:
        checks.append(Check(op, _dtype_name(dtype), lay, _shape(shape), "layout", float("nan"), None, False,
                            f"output strides {out.stride()}, expected {expected_stride}"))
    return checks


# ---- GEMM ops ----------------------------------------------------------------------------------------------


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _sliced_cl(t):
    """A strided view of a channels_last buffer twice as large in H and W."""
    b, c, h, w = t.shape
    view = _cl(torch.zeros(b, c, 2 * h, 2 * w, dtype=t.dtype, device=t.device))[:, :, ::2, ::2]
    view.copy_(t)
    return view


def _t(t):
    return t.t().contiguous().t()


def _rand(*shape, device, scale=1.0):
    return torch.randn(*shape, device=device) * scale


def linear_case(lead, k, n, bias=True, x_layout=None, r_layout=None):
    def build(dtype, device):
        x = _rand(*lead, k, device=device).to(dtype)
        r = _rand(*lead, n, device=device).to(dtype)
        return [x_layout(x) if x_layout else x, _rand(n, k, device=device, scale=k**-0.5).to(dtype),
                r_layout(r) if r_layout else r, _rand(n, device=device).to(dtype) if bias else None]
    return build


def dual_linear_case(lead, k1, k2, n, bias=True):
    def build(dtype, device):
        return [_rand(*lead, k1, device=device).to(dtype), _rand(n, k1, device=device, scale=k1**-0.5).to(dtype),
                _rand(*lead, k2, device=device).to(dtype), _rand(n, k2, device=device, scale=k2**-0.5).to(dtype),
                _rand(n, device=device).to(dtype) if bias else None]
    return build


def conv_case(b, cin, h, w, cout, stride, bias=True, x_layout=None, r_layout=None):
    def build(dtype, device):
        x = _rand(b, cin, h, w, device=device).to(dtype)
        r = _rand(b, cout, (h - 1) // stride + 1, (w - 1) // stride + 1, device=device).to(dtype)
        return [x_layout(x) if x_layout else x, _rand(cout, cin, 1, 1, device=device, scale=cin**-0.5).to(dtype),
                r_layout(r) if r_layout else r, _rand(cout, device=device).to(dtype) if bias else None, stride]
    return build


def dual_conv_case(b, c1, c2, oh, ow, cout, stride, bias=True):
    def build(dtype, device):
        return [_cl(_rand(b, c1, oh, ow, device=device).to(dtype)),
                _rand(cout, c1, 1, 1, device=device, scale=c1**-0.5).to(dtype),
                _cl(_rand(b, c2, oh * stride, ow * stride, device=device).to(dtype)),
                _rand(cout, c2, 1, 1, device=device, scale=c2**-0.5).to(dtype),
                _rand(cout, device=device).to(dtype) if bias else None, stride]
    return build


LINEAR = (functional.linear_add_relu, reference.linear_add_relu, (1,))
DUAL_LINEAR = (functional.dual_linear_add_relu, reference.dual_linear_add_relu, (1, 3))
CONV = (functional.conv1x1_add_relu, reference.conv1x1_add_relu, (1,))
DUAL_CONV = (functional.dual_conv1x1_add_relu, reference.dual_conv1x1_add_relu, (1, 3))

# name -> ((fused fn, reference fn, indices of the weights), input builder, layout label)
GEMM_CASES = {
    "linear-3d-bias": (LINEAR, linear_case((5, 7), 24, 40), "contiguous"),
    "linear-1x1": (LINEAR, linear_case((1,), 1, 1), "contiguous"),
    "linear-views-nobias": (LINEAR, linear_case((33,), 64, 48, bias=False, x_layout=_t, r_layout=_t), "transposed"),
    "linear-odd": (LINEAR, linear_case((70,), 37, 19), "contiguous"),
    "dual-linear": (DUAL_LINEAR, dual_linear_case((6, 5), 20, 12, 24), "contiguous"),
    "dual-linear-nobias": (DUAL_LINEAR, dual_linear_case((9,), 3, 40, 7, bias=False), "contiguous"),
    "conv-nchw-s1": (CONV, conv_case(2, 16, 6, 5, 24, 1), "nchw"),
    "conv-nchw-s2-odd": (CONV, conv_case(2, 8, 7, 5, 12, 2, r_layout=_cl), "nchw/cl residual"),
    "conv-cl-s2": (CONV, conv_case(3, 16, 8, 8, 32, 2, x_layout=_cl, r_layout=_cl), "channels_last"),
    "conv-strided-view-nobias": (CONV, conv_case(2, 8, 4, 6, 16, 1, bias=False, x_layout=_sliced_cl),
                                 "strided cl view"),
    "dual-conv-s2": (DUAL_CONV, dual_conv_case(2, 16, 8, 4, 3, 24, 2), "channels_last"),
}


def pre_activation(ref_fn, weight_idx, args):
    """The float64 pre-activation: the ops are odd in (inputs, residual, bias) for fixed weights, so
    relu(pre) - relu(-pre) = ref(args) - ref(args with all but the weights negated)."""
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    negated = [-a if isinstance(a, torch.Tensor) and i not in weight_idx else a for i, a in enumerate(plain)]
    return ref_fn(*plain) - ref_fn(*negated)


def leaf_copies(args, dtype=None):
    """Detached copies of the tensors in ``args`` (cast to ``dtype`` if given) that require grad."""
    return [(a.detach().to(dtype) if dtype else a.detach()).requires_grad_() if isinstance(a, torch.Tensor) else a
            for a in args]


def check_gemm(case: str, dtype: torch.dtype, device: str, backend: str | None) -> list[Check]:
    (fused_fn, ref_fn, weight_idx), build, lay = GEMM_CASES[case]
    base = build(dtype, device)
    ref_args = leaf_copies(base, torch.float64)
    ref_out = ref_fn(*ref_args)
    pre = pre_activation(ref_fn, weight_idx, ref_args)
    near_kink = pre.abs() < KINK_MARGIN[dtype] * max(1.0, pre.abs().max().item())
    grad = torch.where(near_kink, 0.0, torch.randn(ref_out.shape, device=device, dtype=torch.float64))
    ref_out.backward(grad)

    eager_args = leaf_copies(base)
    eager_out = ref_fn(*eager_args)
    eager_out.backward(grad.to(dtype))

    args = leaf_copies(base)
    with _backend.use_backend(backend or _backend.current_backend()), _alloc.poison_outputs():
        out = fused_fn(*args)
        out.backward(grad.to(dtype))

    name, shape = fused_fn.__name__, _shape(ref_out.shape)
    acc = accuracy(out.detach(), eager_out.detach(), ref_out.detach())
    checks = [Check(name, _dtype_name(dtype), lay, shape, "forward", acc.error, acc.eager_error,
                    acc.ok and out.dtype == dtype, case)]
    arg_names = list(fused_fn.__code__.co_varnames[:len(base)])
    for arg_name, a, e, r in zip(arg_names, args, eager_args, ref_args):
        if not isinstance(a, torch.Tensor):
            continue
        if a.grad is None or a.grad.dtype != dtype:
            checks.append(Check(name, _dtype_name(dtype), lay, shape, f"grad {arg_name}", float("nan"), None,
                                False, f"{case}: gradient missing or not {dtype}"))
            continue
        acc = accuracy(a.grad, e.grad, r.grad)
        checks.append(Check(name, _dtype_name(dtype), lay, shape, f"grad {arg_name}", acc.error, acc.eager_error,
                            acc.ok, case))
    return checks


# ---- BatchNorm + (add) + ReLU -------------------------------------------------------------------------------


def _bn_eager(args, training, skip, dtype=None):
    """relu(F.batch_norm(...) [+ skip]) on leaf copies (cast to ``dtype``): (out, leaves, running stats)."""
    x, s, w, b, rm, rv = (None if a is None else (a.detach().to(dtype) if dtype else a.detach().clone())
                          for a in args)
    leaves = [t.requires_grad_() for t in (x, s, w, b) if t is not None]
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    return torch.relu(y + s if skip else y), leaves, (rm, rv)


def check_batch_norm(shape, fmt: str, dtype: torch.dtype, device: str, backend: str | None, training: bool,
                     skip: bool, save: str) -> list[Check]:
    C = shape[1]

    def act(scale=1.0, shift=0.0):
        t = torch.randn(shape, device=device) * scale + shift
        return (t.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else t).to(dtype)

    args = (act(2.0, 0.5), act() if skip else None, (torch.rand(C, device=device) + 0.5).to(dtype),
            torch.randn(C, device=device).to(dtype), torch.randn(C, device=device).to(dtype),
            (torch.rand(C, device=device) + 0.5).to(dtype))
    grad = act()
    ref_out, ref_leaves, ref_stats = _bn_eager(args, training, skip, torch.float64)
    ref_out.backward(grad.double())
    eager_out, eager_leaves, eager_stats = _bn_eager(args, training, skip)
    eager_out.backward(grad)
    x, s, w, b, rm, rv = (None if a is None else a.detach().clone() for a in args)
    leaves = [t.requires_grad_() for t in (x, s, w, b) if t is not None]
    fn = functional.batch_norm_add_relu if skip else functional.batch_norm_relu
    call = (x, s) if skip else (x,)
    with _backend.use_backend(backend or _backend.current_backend()), _alloc.poison_outputs():
        out = fn(*call, rm, rv, w, b, training, 0.1, 1e-5, save=save)
        out.backward(grad)
    op = f"{fn.__name__}[{'train' if training else 'eval'}, save={save}]"
    dname, shape_s = _dtype_name(dtype), _shape(shape)
    pairs = [("forward", out.detach(), eager_out.detach(), ref_out.detach())]
    names = ["x"] + (["skip"] if skip else []) + ["weight", "bias"]
    pairs += [(f"grad {n}", a.grad, e.grad, r.grad) for n, a, e, r in zip(names, leaves, eager_leaves, ref_leaves)]
    pairs += [(f"running {n}", a, e, r) for n, a, e, r in zip(("mean", "var"), (rm, rv), eager_stats, ref_stats)]
    checks = []
    for what, actual, eager, ref in pairs:
        if actual is None or actual.dtype != dtype:
            checks.append(Check(op, dname, fmt, shape_s, what, float("nan"), None, False, "missing or wrong dtype"))
            continue
        acc = accuracy(actual, eager, ref)
        checks.append(Check(op, dname, fmt, shape_s, what, acc.error, acc.eager_error, acc.ok))
    if skip:
        gated = torch.where(~(out.detach() <= 0), grad, torch.zeros_like(grad))
        checks.append(_exact(op, dtype, fmt, shape, "grad skip = gated grad", leaves[1].grad, gated))
    return checks


# ---- converted ResNet block ------------------------------------------------------------------------------


def check_resnet_block(dtype: torch.dtype, device: str, backend: str | None, train: bool) -> list[Check]:
    """A torchvision Bottleneck with a stride-2 projection, converted vs unconverted."""
    from torch import nn
    from torchvision.models.resnet import Bottleneck

    from . import integrations

    block = Bottleneck(32, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False),
                                                                 nn.BatchNorm2d(64)))
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    block = block.to(device=device, dtype=dtype).train(train)
    fused = integrations.convert(copy.deepcopy(block))
    # 16 px: the outputs (8192 elements) outweigh conv3 and the projection (3072 weights), so BN folds
    def draw():
        return torch.randn(2, 32, 16, 16, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    # train, float32: inputs whose ReLU pre-activations all lie clear of the kink (see relu_margin)
    x = (draw_clear_of_relu_kinks(copy.deepcopy(block).double(), draw) if train and dtype == torch.float32
         else draw())
    op, dname, lay = "resnet Bottleneck", _dtype_name(dtype), "channels_last"
    if train:  # BN + ReLU and BN + add + ReLU fused: every result within the bound, against float64
        ref64 = copy.deepcopy(block).double()
        xe, xf, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
        eager = block(xe)
        grad = torch.randn_like(eager)
        eager.backward(grad)
        expected = ref64(x64)
        expected.backward(grad.double())
        with _backend.use_backend(backend or _backend.current_backend()):
            out = fused(xf)
            out.backward(grad)

        def flat(tensors):
            return torch.cat([t.reshape(-1) for t in tensors])

        triples = [("train forward", out, eager, expected), ("train grad of x", xf.grad, xe.grad, x64.grad)]
        triples += [(f"train grad of {name}", p.grad, q.grad, r.grad) for (name, p), q, r in
                    zip(fused.named_parameters(), block.parameters(), ref64.parameters())]
        stats = [(b, c, d) for b, c, d in zip(fused.buffers(), block.buffers(), ref64.buffers())
                 if b.is_floating_point()]
        triples.append(("train BN running statistics", flat(b for b, _, _ in stats), flat(c for _, c, _ in stats),
                        flat(d for _, _, d in stats)))
        checks = []
        for what, actual, eager_value, ref in triples:
            # half-precision gradients: in the L2 norm (ReLU gates flip with rounding, eager's as ours)
            l2 = "grad" in what and dtype != torch.float32
            # eager's own relative L2 error reached 13% (float16) and 24% (bfloat16) over 40 draws
            acc = accuracy_l2(actual, eager_value, ref, floor=0.25) if l2 else accuracy(actual, eager_value, ref)
            checks.append(Check(op, dname, lay, _shape(actual.shape), what + (" (L2)" if l2 else ""), acc.error,
                                acc.eager_error, acc.ok))
        return checks
    ref64 = copy.deepcopy(block).double()
    with torch.no_grad():
        eager = block(x)
        expected = ref64(x.double())
        with _backend.use_backend(backend or _backend.current_backend()):
            out = fused(x)
    acc = accuracy(out, eager, expected)
    return [Check(op, dname, lay, _shape(out.shape), "eval forward (BN folded)", acc.error, acc.eager_error, acc.ok)]


# ---- the grid ----------------------------------------------------------------------------------------------


def grid(quick: bool, device: str, backend: str | None) -> Iterable[Callable[[], list[Check]]]:
    dtypes = [torch.float32, torch.bfloat16] if quick else list(DTYPES.values())
    shapes = [(7,), (2, 64, 14, 14)] if quick else [(1,), (7,), (1000,), (3, 5, 7, 9), (2, 64, 14, 14)]
    cases = ["linear-3d-bias", "dual-linear", "conv-cl-s2", "dual-conv-s2"] if quick else list(GEMM_CASES)
    bn_cases = [((4, 16, 7, 7), "channels_last"), ((33, 24), "contiguous")]
    if not quick:
        bn_cases += [((2, 3, 9, 11), "contiguous"), ((8, 64, 14, 14), "channels_last")]
    for dtype in dtypes:
        for shape in shapes:
            mixed = ("channels_last" if len(shape) == 4 else "transposed", "contiguous", "sliced")
            layouts = [("contiguous",) * 3, mixed] + ([] if quick else [("transposed",) * 3, ("sliced",) * 3])
            for lay in layouts:
                for mode in ("output", "mask", "inplace"):
                    yield lambda s=shape, lay=lay, d=dtype, m=mode: check_add_relu(s, lay, d, device, backend, m)
        for case in cases:
            yield lambda c=case, d=dtype: check_gemm(c, d, device, backend)
        for shape, fmt in bn_cases:
            for training in (True, False):
                for skip in (True, False):
                    for save in ("mask", "output"):
                        yield (lambda s=shape, f=fmt, d=dtype, t=training, k=skip, v=save:
                               check_batch_norm(s, f, d, device, backend, t, k, v))
        for train in (False, True):
            yield lambda d=dtype, t=train: check_resnet_block(d, device, backend, t)


def run(device: str = "cpu", backend: str | None = None, quick: bool = False,
        progress: Callable[[str], None] | None = None) -> list[Check]:
    jobs = list(grid(quick, device, backend))
    checks: list[Check] = []
    start = time.perf_counter()
    for i, job in enumerate(jobs, 1):
        checks.extend(job())
        if progress and (i % 10 == 0 or i == len(jobs)):
            bad = sum(not c.ok for c in checks)
            progress(f"[{i}/{len(jobs)}] {len(checks)} checks, {bad} failed, {time.perf_counter() - start:.1f}s")
    return checks


def format_table(checks: list[Check]) -> str:
    header = ("op", "dtype", "layout", "shape", "check", "max error", "eager's error", "verdict")
    rows = [header]
    for c in checks:
        eager = "(reference)" if c.eager_error is None else f"{c.eager_error:.3g}"
        verdict = ("exact" if c.eager_error is None else "ok") if c.ok else f"FAIL {c.note}".strip()
        rows.append((c.op, c.dtype, c.layout, c.shape, c.what, f"{c.error:.3g}", eager, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)
