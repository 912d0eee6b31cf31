"""fused_residual.freeze: BN folded once, fused block epilogues, inference only, export and compile."""

import copy
import os
import tempfile

import pytest
import timm
import torch
import torchvision
from torch import nn

import fused_residual as fr
from helpers import assert_close_to_ref, device_params
from test_integrations import randomize_bn

MODELS = {
    "tv-resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "tv-resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "tv-resnext50": lambda: torchvision.models.resnext50_32x4d(num_classes=10),
    "timm-resnet26d": lambda: timm.create_model("resnet26d", num_classes=10),
    "timm-seresnet50": lambda: timm.create_model("seresnet50", num_classes=10),
}


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_frozen_model_matches_and_holds_no_batch_norm(name):
    """Every BN folded (none left), every block frozen, outputs within 1e-4 of the model's; the model
    passed in keeps its modules, state_dict and outputs."""
    model = randomize_bn(MODELS[name]()).eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    frozen = fr.freeze(model)
    assert not [n for n, m in frozen.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(frozen.report.blocks) == (8 if name in ("tv-resnet18", "timm-resnet26d") else 16)
    assert not frozen.report.skipped
    with torch.no_grad():
        out = frozen(x)
        assert torch.equal(model(x), before)
    assert _rel(out, before) < 1e-4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_block_tails_run_fused_epilogues(monkeypatch):
    """CPU float32: every block tail is one oneDNN convolution with the residual add and the ReLU as its
    post-ops (ResNet-50: 16 tails, ResNet-18: 8). Where oneDNN does not serve (here: disabled; on CUDA,
    other dtypes): ResNet-50's 4 projection blocks end in dual_conv1x1_add_relu, its 12 identity blocks in
    conv1x1_add_relu; ResNet-18's 3 projections in conv1x1_add_relu (main path as the residual), its 5
    identity tails in add_relu_."""
    from fused_residual import functional
    from fused_residual.integrations.freeze import FoldedConv

    calls = []
    for op in ("conv1x1_add_relu", "dual_conv1x1_add_relu", "add_relu_"):
        real = getattr(functional, op)
        monkeypatch.setattr(functional, op, lambda *a, real=real, op=op, **k: calls.append(op) or real(*a, **k))
    real_tail = FoldedConv.conv_add_relu
    monkeypatch.setattr(FoldedConv, "conv_add_relu",
                        lambda self, *a: (lambda out: calls.append("onednn" if out is not None else "none") or out)(
                            real_tail(self, *a)))
    x = torch.randn(1, 3, 64, 64)  # layer 4 at 2x2 (1x1 outputs keep the unfused tail: see conv_add_relu)
    models = {"resnet50": torchvision.models.resnet50(num_classes=10),
              "resnet18": torchvision.models.resnet18(num_classes=10)}
    for name, expected in (("resnet50", ["onednn"] * 16), ("resnet18", ["onednn"] * 8)):
        calls.clear()
        with torch.no_grad():
            fr.freeze(models[name])(x)
        assert calls == expected, name
    for name, expected in (("resnet50", ["conv1x1_add_relu"] * 12 + ["dual_conv1x1_add_relu"] * 4),
                           ("resnet18", ["add_relu_"] * 5 + ["conv1x1_add_relu"] * 3)):
        calls.clear()
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
            fr.freeze(models[name])(x)
        assert sorted(calls) == expected, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_dtypes_layouts_batch_sizes_and_inference_mode(dtype, fmt):
    """The frozen model cast with .to(dtype) / .to(memory_format=...) like any module: any batch size,
    under no_grad and inference_mode, within the accuracy bound of float64 (against the unfrozen model in
    that dtype)."""
    model = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval()
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    frozen = fr.freeze(model).to(dtype=dtype, memory_format=mf)
    eager = copy.deepcopy(model).to(dtype=dtype, memory_format=mf)
    ref64 = copy.deepcopy(model).double()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 48, 48)
        xd = x.to(dtype).contiguous(memory_format=mf)
        with torch.inference_mode():
            out = frozen(xd)
        with torch.no_grad():
            assert torch.equal(frozen(xd), out)
            assert_close_to_ref(out, eager(xd), ref64(x.double()), f"batch {batch}")
        assert out.dtype == dtype


def test_frozen_model_refuses_training():
    frozen = fr.freeze(torchvision.models.resnet18(num_classes=10))
    with pytest.raises(RuntimeError, match="frozen for inference"):
        frozen.train()
    with pytest.raises(RuntimeError, match="frozen for inference"):
        frozen.module.train()  # the blocks refuse too
    frozen.training = True  # set behind train()'s back: the forward still refuses
    with pytest.raises(RuntimeError, match="frozen for inference"):
        frozen(torch.randn(1, 3, 32, 32))
    frozen.training = False
    assert frozen.eval() is frozen and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())


def test_converted_models_freeze_and_stay_converted():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    converted = fr.convert(copy.deepcopy(model))
    frozen = fr.freeze(converted)
    assert fr.conversion_report(converted).counts() == {"torchvision.BasicBlock": 8}
    assert len(frozen.report.blocks) == 8
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(frozen(x), model(x)) < 1e-4


def test_blocks_that_cannot_freeze_are_left_as_they_are_with_the_reason():
    """A hooked block and one whose BN keeps no running statistics (it normalises with batch statistics in
    eval too) are kept, unfolded, and the report names them; the rest freezes."""
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    model.layer1[0].register_forward_hook(lambda m, i, o: o * 0.5)
    bn = model.layer2[1].bn1
    bn.track_running_stats, bn.running_mean, bn.running_var, bn.num_batches_tracked = False, None, None, None
    frozen = fr.freeze(model)
    assert [(n, why) for n, _, why in frozen.report.skipped] == [
        ("layer1.0", "the block has hooks"),
        ("layer2.1", "a BatchNorm without running statistics normalises with batch statistics in eval too")]
    assert len(frozen.report.blocks) == 6
    assert "2 blocks left as they are" in str(frozen.report)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(frozen(x), model(x)) < 1e-4


def test_float64_frozen_model_runs_unfused():
    model = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(fr.freeze(model)(x), model(x)) < 1e-12


@pytest.mark.parametrize("policy", ["inductor", "kernels"])
def test_export_save_load_and_compile(policy):
    """torch.export of the frozen model: no BatchNorm in the program (the default policy exports the aten
    convolutions + add + ReLU; "kernels" keeps the fused ops), the same results after export.save / load;
    torch.compile(fullgraph=True) too."""
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    frozen = fr.freeze(model)
    x = torch.randn(2, 3, 64, 64)
    fr.set_compile_policy(policy)
    try:
        program = torch.export.export(frozen, (x,))
    finally:
        fr.set_compile_policy("inductor")
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "batch_norm" in t]
    assert any("fused_residual" in t for t in targets) == (policy == "kernels")
    with torch.no_grad():
        expected = frozen(x)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "frozen.pt2")
        torch.export.save(program, path)
        loaded = torch.export.load(path)
    with torch.no_grad():
        assert _rel(loaded.module()(x), expected) < 1e-5
    torch._dynamo.reset()
    compiled = torch.compile(frozen, fullgraph=True)
    with torch.no_grad():
        assert _rel(compiled(x), expected) < 1e-5


@pytest.mark.parametrize("name", ["tv-resnet50", "timm-resnet26d", "timm-seresnet50"])
def test_torchscript(name):
    """torch.jit.script of a frozen model: TorchScript compiles the blocks' unfused expression (aten
    convolutions with the folded weights, add, ReLU); the same results as the frozen model's eager forward,
    and the scripted model refuses training as the eager one does."""
    import warnings

    frozen = fr.freeze(randomize_bn(MODELS[name]()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        scripted = torch.jit.script(frozen)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(scripted(x), frozen(x)) < 1e-5
    scripted.training = True
    with pytest.raises(Exception, match="frozen for inference"):
        scripted(x)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (torch's CPU build has it)")
def test_cpu_float32_convolutions_run_on_onednn_with_packed_weights_that_follow_edits():
    """On CPU in float32 a folded convolution runs as oneDNN with its weights packed once per input shape
    (and the ReLU as its post-op): the same result as F.conv2d with the folded weights, and a weight changed
    afterwards (in place, or by load_state_dict) is packed again, never served stale."""
    import torch.nn.functional as F
    from fused_residual.integrations.freeze import FoldedConv

    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    frozen = fr.freeze(model)
    conv = frozen.module.layer1[0].conv1
    assert isinstance(conv, FoldedConv)
    x = torch.randn(2, 64, 16, 16)

    def plain(inp, dtype=torch.float32):
        bias = None if conv.bias is None else conv.bias.to(dtype)
        return F.conv2d(inp.to(dtype), conv.weight.to(dtype), bias, conv.stride, conv.padding, conv.dilation,
                        conv.groups)

    def check(got, fn):
        # oneDNN's packed convolution sums in another order than F.conv2d's: both are held to float64
        assert_close_to_ref(got, fn(plain(x)), fn(plain(x, torch.float64)))

    with torch.no_grad():
        check(conv(x), lambda y: y)
        check(conv.conv_relu(x), torch.relu)
        other = torch.randn(conv.output_shape(x))
        check(conv.conv_add_relu(x, other), lambda y: torch.relu(y + other.to(y.dtype)))
        # where the residual does not fit oneDNN's post-op, the caller gets None (and computes unfused)
        assert conv.conv_add_relu(x, other.to(memory_format=torch.channels_last)) is None
        assert conv.conv_add_relu(x, other.double()) is None
        assert conv.conv_add_relu(x, other[:1]) is None
        one_pixel = x[:, :, :1, :1].contiguous()
        assert conv.conv_add_relu(one_pixel, torch.randn(conv.output_shape(one_pixel))) is None
        assert len(conv._packed) == 1
        conv.weight.mul_(-2.0)  # an in-place edit
        check(conv(x), lambda y: y)
        state = {k: v * 0.5 if k.endswith("weight") else v for k, v in frozen.state_dict().items()}
        frozen.load_state_dict(state)
        check(conv(x), lambda y: y)
        out = frozen(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out).all()
    # the cache holds oneDNN-opaque tensors: copies and pickles start without it
    import pickle

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = frozen(x)
        for clone in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
            assert torch.equal(clone(x), expected)
    frozen.to(torch.float64)  # new weights: the packed ones go
    assert conv._packed == {}


@pytest.mark.parametrize("device", device_params())
def test_frozen_model_on_each_device(device):
    """A frozen ResNet-50 moved to the device (CUDA: cuDNN convolutions, the Triton GEMM tails) in bfloat16
    and channels_last, against the unfrozen model in that dtype and float64."""
    model = randomize_bn(torchvision.models.resnet50(num_classes=10)).eval()
    frozen = fr.freeze(model).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
    eager = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    xd = x.to(device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out, ref = frozen(xd), eager(xd)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double()).to(device)
    assert out.device.type == device and out.dtype == torch.bfloat16
    assert_close_to_ref(out, ref, ref64, f"frozen on {device}")


def test_aot_inductor_package_of_a_frozen_model():
    """AOTInductor on CPU: the exported frozen model compiles into a package that loads and runs with the
    frozen model's results (~15 s of C++ compilation)."""
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    frozen = fr.freeze(model)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(frozen, (x,))
    with tempfile.TemporaryDirectory() as d:
        path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(d, "frozen.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        with torch.no_grad():
            assert _rel(runner(x), frozen(x)) < 1e-5
