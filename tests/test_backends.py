"""Backend selection: context manager, environment variable, clear errors, no silent fallback."""

import pytest
import torch

import fused_residual as fr
from fused_residual import _backend, _cpp, _triton


def test_default_is_auto_and_context_nests(monkeypatch):
    monkeypatch.delenv("FUSED_RESIDUAL_BACKEND", raising=False)
    assert fr.current_backend() == "auto"
    with fr.use_backend("eager"):
        assert fr.current_backend() == "eager"
        with fr.use_backend("CPP"):
            assert fr.current_backend() == "cpp"
        assert fr.current_backend() == "eager"
    assert fr.current_backend() == "auto"


def test_env_var_selects_and_context_overrides(monkeypatch):
    monkeypatch.setenv("FUSED_RESIDUAL_BACKEND", "eager")
    assert fr.current_backend() == "eager"
    assert _backend.resolve(torch.device("cpu")) == "eager"
    with fr.use_backend("cpp"):
        assert _backend.resolve(torch.device("cpu")) == "cpp"


def test_unknown_names_raise_naming_them(monkeypatch):
    with pytest.raises(ValueError, match="'cudnn'"):
        with fr.use_backend("cudnn"):
            pass
    monkeypatch.setenv("FUSED_RESIDUAL_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"'fastest'.*FUSED_RESIDUAL_BACKEND"):
        fr.add_relu(torch.randn(3), torch.randn(3))


def test_auto_on_cpu_uses_the_cpp_kernels():
    assert _cpp.status()[0], _cpp.status()[1]
    assert _backend.resolve(torch.device("cpu")) == "cpp"


def test_cpp_backend_refuses_cuda_tensors():
    with fr.use_backend("cpp"):
        with pytest.raises(fr.BackendUnavailable, match="CPU tensors only"):
            _backend.resolve(torch.device("cuda"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_triton, "status", lambda: (True, False, "triton, compiled"))
    with fr.use_backend("triton"):
        with pytest.raises(fr.BackendUnavailable, match="TRITON_INTERPRET=1"):
            fr.add_relu(torch.randn(3), torch.randn(3))


def test_missing_cpp_extension_names_the_cause(monkeypatch):
    monkeypatch.setattr(_cpp, "_module", None)
    monkeypatch.setattr(_cpp, "_error", "C++ extension not importable (no module named _C)")
    monkeypatch.setattr(_cpp, "_loaded", True)
    with fr.use_backend("cpp"):
        with pytest.raises(fr.BackendUnavailable, match="no module named _C"):
            fr.add_relu(torch.randn(3), torch.randn(3))
    monkeypatch.setattr(_backend, "_warned_auto_cpu", False)
    with pytest.warns(RuntimeWarning, match="no module named _C"):
        out = fr.add_relu(torch.randn(3), torch.randn(3))  # auto: eager, identical bits, with a warning
    assert out.shape == (3,)


def test_import_without_cpp_extension_works():
    """A process where the extension cannot load still imports the package and reports why."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fused_residual._C'] = None; sys.modules['fused_residual._C_avx2'] = None\n"
            "import torch, fused_residual as fr\n"
            "from fused_residual import _cpp\n"
            "ok, why = _cpp.status(); assert not ok and '_C' in why, why\n"
            "print(fr.add_relu(torch.ones(2), torch.ones(2), ).tolist())\n")
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "[2.0, 2.0]" in res.stdout


def test_import_without_triton_works():
    """triton is optional at import: without it the cpp and eager backends run and triton says why not."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fused_residual as fr\n"
            "print(fr.add_relu(torch.ones(2), torch.ones(2)).tolist())\n"
            "with fr.use_backend('triton'):\n"
            "    try:\n"
            "        fr.add_relu(torch.ones(2), torch.ones(2))\n"
            "    except fr.BackendUnavailable as e:\n"
            "        print('unavailable:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "[2.0, 2.0]" in res.stdout and "triton not importable" in res.stdout


def test_cpp_kernels_match_across_instruction_sets():
    """The DEFAULT build and the AVX2 build compute the same bits."""
    import importlib

    names = ["fused_residual._C", "fused_residual._C_avx2"]
    mods = []
    for name in names:
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    if len(mods) < 2:
        pytest.skip("only one instruction-set build on this machine")
    z, s = torch.randn(10007), torch.randn(10007)
    outs = []
    for m in mods:
        out = torch.empty_like(z)
        m.add_relu_fwd(z, s, out, None)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_cpp_kernels_refuse_mixed_dtypes():
    """The C++ kernels read every tensor as the output's dtype: another dtype is an error naming it, not
    reinterpreted bytes."""
    C = _cpp.module()
    bf, f32 = torch.randn(4, 6).bfloat16(), torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="add_relu: skip is Float, expected BFloat16"):
        C.add_relu_fwd(bf, f32, torch.empty_like(bf), None)
    with pytest.raises(RuntimeError, match="add_relu_bwd: grad is Float, expected BFloat16"):
        C.add_relu_bwd(f32, bf, None, torch.empty_like(bf))
    with pytest.raises(RuntimeError, match="bias_relu_rows_: bias is Float, expected BFloat16"):
        C.bias_relu_rows_(bf, torch.randn(6))
    with pytest.raises(RuntimeError, match="relu_grad_colsum: out is BFloat16, expected Float"):
        C.relu_grad_colsum(f32, bf, torch.empty_like(f32), None)


def test_backward_runs_under_its_forward_backend_choice(monkeypatch):
    """A backward runs under the use_backend choice of its forward, even on a thread that does not see the
    context variable (CUDA runs backward on its device threads) or after the ``with`` block; without a
    choice at the forward, the one in effect at the backward applies."""
    import threading

    seen = []
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda device: seen.append(_backend.current_backend()) or real(device))

    def leaves(*shapes):
        return [torch.randn(*s, requires_grad=True) for s in shapes]

    def inplace(z, s):
        return fr.add_relu_(z * 1, s)

    cases = [(fr.add_relu, leaves((4, 5), (4, 5))),
             (lambda z, s: fr.add_relu(z, s, save="mask"), leaves((4, 5), (4, 5))),
             (inplace, leaves((4, 5), (4, 5))),
             (fr.linear_add_relu, leaves((4, 3), (5, 3), (4, 5), (5,))),
             (fr.dual_linear_add_relu, leaves((4, 3), (5, 3), (4, 2), (5, 2), (5,))),
             (fr.conv1x1_add_relu, leaves((2, 3, 4, 4), (5, 3, 1, 1), (2, 5, 4, 4), (5,))),
             (fr.dual_conv1x1_add_relu, leaves((2, 3, 4, 4), (5, 3, 1, 1), (2, 2, 4, 4), (5, 2, 1, 1)))]
    for fn, args in cases:
        with fr.use_backend("eager"):
            out = fn(*args)
        seen.clear()
        worker = threading.Thread(target=lambda: out.sum().backward())  # a fresh context: no choice there
        worker.start()
        worker.join()
        assert seen and set(seen) == {"eager"}, (fn, seen)
        assert all(a.grad is not None for a in args)
        out = fn(*args)  # no choice at the forward: the backward's applies
        seen.clear()
        with fr.use_backend("eager"):
            out.sum().backward()
        assert seen and set(seen) == {"eager"}, (fn, seen)
