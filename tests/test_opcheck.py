"""torch.library.opcheck for every registered op, from one place.

The ops are enumerated from the dispatcher itself, so an op registered in the ``fused_residual`` namespace
without sample arguments in ``tests/cases.py`` (``op_samples``) fails here by name, as does a sample for an op
that is no longer registered. opcheck checks each op's schema (mutations and aliasing as declared), its fake
impl against the real one, its autograd registration and its dispatch under torch.compile (AOT dispatch,
static and dynamic shapes), on every (device, backend) pair.
"""

import pytest
import torch

import fused_residual as fr
from cases import OPCHECK_DTYPES, device_backend_params, op_samples

NAMESPACE = "fused_residual"


def registered_ops() -> list[str]:
    """The op names (``name``, or ``name.overload`` for a non-default overload) the dispatcher knows in the
    fused_residual namespace."""
    prefix = f"{NAMESPACE}::"
    return sorted(n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def resolve(name: str) -> torch._ops.OpOverload:
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.fused_residual, packet), overload or "default")


def test_every_registered_op_has_samples():
    registered = set(registered_ops())
    sampled = {s.op for s in op_samples("cpu", torch.float32)}
    assert registered, "no fused_residual ops are registered"
    missing, stale = sorted(registered - sampled), sorted(sampled - registered)
    assert not missing, f"registered ops without samples in tests/cases.py (op_samples): {missing}"
    assert not stale, f"samples in tests/cases.py for ops that are not registered: {stale}"


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", OPCHECK_DTYPES, ids=str)
@pytest.mark.parametrize("name", registered_ops())
def test_opcheck(device, backend, dtype, name):
    samples = [s for s in op_samples(device, dtype) if s.op == name]
    assert samples, f"fused_residual::{name} has no samples in tests/cases.py (op_samples)"
    op = resolve(name)
    with fr.use_backend(backend):
        for s in samples:
            try:
                torch.library.opcheck(op, s.args, s.kwargs)
            except Exception as e:
                raise AssertionError(f"opcheck of {name} ({s.what}) failed: {e}") from e


def test_every_registered_op_comes_from_a_spec():
    """Every op in the namespace was registered through ``fused_residual.ops._registry`` (one ``OpSpec``
    each: its call path, fake impl and autograd declared together), and the registry holds nothing else."""
    from fused_residual.ops import REGISTRY

    assert set(registered_ops()) == set(REGISTRY)
