"""torch.compile of converted models and of the fused functions (fused_residual._compile's policies).

The default policy ("inductor") makes compilation transparent: dynamo captures from a converted model
exactly the graph it captures from the unconverted one, so Inductor fuses it as well. The "kernels" policy
keeps the custom ops in the graph instead; both must compile without graph breaks.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

import fused_residual as fr

from helpers import assert_bitwise_equal
from test_integrations import randomize_bn


@pytest.fixture
def policy():
    """Sets a compile policy for one test (dynamo's caches reset around it: the policy is read at trace
    time) and restores the default."""
    def set_policy(name):
        torch._dynamo.reset()
        fr.set_compile_policy(name)

    yield set_policy
    fr.set_compile_policy("inductor")
    torch._dynamo.reset()


def capture(module, *inputs, **compile_kwargs):
    """(output, [graph code]) of ``torch.compile(module, fullgraph=True)`` with a recording backend."""
    codes = []

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, fullgraph=True, backend=backend, **compile_kwargs)(*inputs)
    return out, codes


MODELS = {
    "torchvision.resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "torchvision.resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "timm.resnet26d": lambda: timm.create_model("resnet26d", num_classes=10),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_compiles_to_the_unconverted_graph(name, mode, policy):
    """Under the default policy dynamo sees the unconverted model's forward: the captured graphs are the
    same code, and so is what Inductor makes of them (no graph breaks: fullgraph)."""
    policy("inductor")
    model = randomize_bn(MODELS[name]()).train(mode == "train")
    converted = fr.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    ref, plain_graphs = capture(model, x)
    out, fused_graphs = capture(converted, x)
    assert fused_graphs == plain_graphs
    assert "fused_residual" not in "".join(fused_graphs)
    assert_bitwise_equal(out, ref, f"compiled converted {name} ({mode}) vs compiled original")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_kernels_policy_keeps_the_ops_without_graph_breaks(mode, policy):
    """``set_compile_policy("kernels")``: the converted blocks run their fused forward under tracing, the
    custom ops in the graph, fullgraph, with a dynamic batch; results as the converted model's eager ones."""
    policy("kernels")
    model = randomize_bn(torchvision.models.resnet50(num_classes=10)).train(mode == "train")
    converted = fr.convert(copy.deepcopy(model))
    x = torch.randn(3, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out, graphs = capture(copy.deepcopy(converted), x, dynamic=True)
        eager = copy.deepcopy(converted)(x)
    assert "fused_residual" in "".join(graphs)
    # in eval, compiled code folds every BN (shapes may be symbolic), eager only where folding pays: the
    # results differ by the folding's rounding
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_inductor_compiles_converted_blocks_with_dynamic_batch(block, mode, policy):
    """Inductor itself (CPU codegen), both modes the issue names, two batch sizes through one dynamic graph:
    the converted block gives the unconverted block's compiled result bit for bit."""
    policy("inductor")
    if block == "basic":
        plain = BasicBlock(32, 32)
    else:
        plain = Bottleneck(64, 16, downsample=torch.nn.Sequential(torch.nn.Conv2d(64, 64, 1),
                                                                torch.nn.BatchNorm2d(64)))
    plain = randomize_bn(plain).eval()
    converted = fr.convert(copy.deepcopy(plain))
    x = torch.randn(4, plain.conv1.in_channels, 8, 8).to(memory_format=torch.channels_last)
    compiled_plain = torch.compile(plain, fullgraph=True, dynamic=True, mode=mode)
    compiled_fused = torch.compile(converted, fullgraph=True, dynamic=True, mode=mode)
    with torch.no_grad():
        for batch in (4, 3):
            assert_bitwise_equal(compiled_fused(x[:batch]), compiled_plain(x[:batch]), f"batch {batch}")


FUNCTIONS = {
    "add_relu": lambda a: fr.add_relu(a["z"], a["skip"]),
    "add_relu(mask)": lambda a: fr.add_relu(a["z"], a["skip"], save="mask"),
    "linear_add_relu": lambda a: fr.linear_add_relu(a["x"], a["w"], a["r"], a["b"]),
    "dual_linear_add_relu": lambda a: fr.dual_linear_add_relu(a["x"], a["w"], a["x2"], a["w2"], a["b"]),
    "conv1x1_add_relu": lambda a: fr.conv1x1_add_relu(a["img"], a["cw"], a["cr"], a["b"]),
    "batch_norm_add_relu": lambda a: fr.batch_norm_add_relu(a["img"], a["cr"], a["rm"], a["rv"], a["g"], a["b"],
                                                            training=True),
}


def _arguments():
    t = dict(z=torch.randn(6, 16), skip=torch.randn(6, 16), x=torch.randn(6, 8), w=torch.randn(16, 8),
             r=torch.randn(6, 16), b=torch.randn(16), x2=torch.randn(6, 4), w2=torch.randn(16, 4),
             img=torch.randn(2, 16, 3, 3), cw=torch.randn(16, 16, 1, 1), cr=torch.randn(2, 16, 3, 3),
             rm=torch.randn(16), rv=torch.rand(16) + 0.5, g=torch.randn(16))
    for k in ("z", "x", "w", "img", "g"):
        t[k].requires_grad_()
    return t


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("policy_name", ["inductor", "kernels"])
def test_fused_functions_under_each_policy(name, policy_name, policy):
    """"inductor": the graph holds aten ops only (Inductor fuses them with their neighbours); "kernels": the
    fused_residual op. Forward and gradients as eager's fused function either way."""
    policy(policy_name)
    args = _arguments()
    fn = FUNCTIONS[name]
    out, graphs = capture(lambda a: fn(a).sum(dim=0), args)
    assert ("fused_residual" in "".join(graphs)) == (policy_name == "kernels"), graphs
    out.sum().backward()
    grads = {k: v.grad.clone() for k, v in args.items() if v.grad is not None}
    eager_args = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in args.items()}
    ref = fn(eager_args).sum(dim=0)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for k, g in grads.items():
        torch.testing.assert_close(g, eager_args[k].grad, rtol=1e-5, atol=1e-5, msg=f"grad of {k}")
