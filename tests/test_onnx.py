"""ONNX export (torch.onnx.export(..., dynamo=True)) of converted and frozen models, run by onnxruntime.

The fused functions emit their aten expressions while the exporter traces, under either compile policy:
the ONNX graph holds standard operators only (the `onnx` extra installs the exporter and the runtime)."""

import copy
import os
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
import torchvision

import fused_residual as fr
from test_integrations import randomize_bn

MODELS = {
    "tv-resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "timm-resnet26d": lambda: timm.create_model("resnet26d", num_classes=10),
}


def _run_onnx(module, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        program.save(path)
        ops = {(node.domain, node.op_type) for node in onnx.load(path).graph.node}
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return out, ops


@pytest.mark.parametrize("policy", ["inductor", "kernels"])
@pytest.mark.parametrize("kind", ["converted", "frozen"])
@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnxruntime(name, kind, policy):
    model = randomize_bn(MODELS[name]()).eval()
    module = fr.convert(copy.deepcopy(model)) if kind == "converted" else fr.freeze(model)
    x = torch.randn(2, 3, 64, 64)
    fr.set_compile_policy(policy)
    try:
        out, ops = _run_onnx(module, x)
    finally:
        fr.set_compile_policy("inductor")
    with torch.no_grad():
        expected = module(x).numpy()
    assert np.abs(out - expected).max() / np.abs(expected).max() < 1e-5
    assert {domain for domain, _ in ops} <= {"", "ai.onnx"}, ops  # standard operators only
    assert {("", "Conv"), ("", "Relu"), ("", "Add")} <= ops
