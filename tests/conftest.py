"""Test configuration.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET must be
set before triton is first imported (``triton.jit`` reads it when a kernel is decorated), so it is set here
unless the caller chose. Every test draws fresh random inputs from a seed printed on failure; set
FUSED_RESIDUAL_TEST_SEED to replay one.
"""

import os
import secrets

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed(request):
    seed = int(os.environ.get("FUSED_RESIDUAL_TEST_SEED", secrets.randbits(31)))
    torch.manual_seed(seed)
    request.node.fused_residual_seed = seed
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "fused_residual_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("seed", f"replay with FUSED_RESIDUAL_TEST_SEED={seed}"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run by benchmarks/gpu_run.sh)"))
