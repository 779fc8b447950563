"""fastconv.models against torchvision (same weights: logits and one SGD step's gradients), the CIFAR
ResNets against He et al.'s table, AlexNet-original against the seed's layer table, and a check that a
training step runs on fastconv's kernels rather than torch's."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastconv
from conftest import cuda
from fastconv import models
from helpers import EPS, assert_close_to, nontrivial_batch_norms, rel_err

tv = pytest.importorskip("torchvision")

IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d"]


def twins(name: str, dtype=torch.float64, **kwargs):
    """fastconv's model and torchvision's with the same weights (loaded with strict=True both ways)."""
    ours = getattr(models, name)(**kwargs)
    theirs = getattr(tv.models, name)(**{k: v for k, v in kwargs.items() if k != "algo"})
    nontrivial_batch_norms(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(dtype), theirs.to(dtype)


def one_sgd_step(model, x, seed=0):
    """Logits, parameter gradients and the state after one SGD step in training mode."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(seed)  # dropout draws alike
    out = model(x)
    opt.zero_grad()
    out.square().mean().backward()
    grads = [(n, p.grad.clone()) for n, p in model.named_parameters()]
    opt.step()
    return out.detach(), grads, [(k, v.clone()) for k, v in model.state_dict().items()]


def assert_models_agree(ours, theirs, x, tol=1e-9):
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert_close_to(ours(x), theirs(x), tol, "eval logits")
    out, grads, state = one_sgd_step(ours, x)
    rout, rgrads, rstate = one_sgd_step(theirs, x)
    assert_close_to(out, rout, tol, "training logits")
    # an absolute floor from the largest gradient: biases re-centred by a later BatchNorm have a zero gradient
    # (compared in registration order: a reference may wrap modules under other names)
    floor = tol * max(g.abs().max().item() for _, g in rgrads)
    assert len(grads) == len(rgrads) and len(state) == len(rstate)
    for (name, g), (_, rg) in zip(grads, rgrads):
        torch.testing.assert_close(g, rg, rtol=100 * tol, atol=floor, msg=name)
    for (k, v), (_, rv) in zip(state, rstate):
        if rv.is_floating_point():
            torch.testing.assert_close(v, rv, rtol=100 * tol, atol=tol, msg=k)
        else:
            assert torch.equal(v, rv), k


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_resnets_match_torchvision_float64(name):
    torch.manual_seed(0)
    ours, theirs = twins(name, num_classes=10)
    assert_models_agree(ours, theirs, torch.randn(2, 3, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_resnet18_every_algo_and_channels_last(algo):
    torch.manual_seed(0)
    ours, theirs = twins("resnet18", num_classes=10, algo=algo)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert_models_agree(ours, theirs, x)


def test_zero_init_residual_and_initialisation_statistics():
    torch.manual_seed(0)
    m = models.resnet50(zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in m.modules() if isinstance(b, models.Bottleneck))
    w = m.layer3[0].conv2.weight  # kaiming normal, fan_out: std sqrt(2 / (K * R * S))
    expected = (2 / (w.shape[0] * 9)) ** 0.5
    assert abs(w.std().item() / expected - 1) < 0.05


# ---- CIFAR ResNets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth,millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_resnet_parameter_counts_match_the_paper(depth, millions):
    model = getattr(models, f"resnet{depth}")()
    count = sum(p.numel() for p in model.parameters())
    digits = 1 if depth == 110 else 2  # the paper's table: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M
    assert round(count / 1e6, digits) == millions
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == depth  # 6n + 1 convs and the fc layer: 6n + 2 weighted layers, no projection convs
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_block_has_the_strided_zero_padded_shortcut():
    torch.manual_seed(0)
    model = models.resnet20().double()
    nontrivial_batch_norms(model)
    model.eval()
    block = model.layer2[0]  # 16 -> 32 channels, 32x32 -> 16x16, no downsample module
    assert block.downsample is None
    x = torch.randn(2, 16, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        ref = F.relu(block.bn1(block.conv1._conv_forward(x, block.conv1.weight, None)))
        ref = block.bn2(F.conv2d(ref, block.conv2.weight, None, 1, 1))
        ref = F.relu(ref + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 16)))
    assert_close_to(out, ref, 1e-12, "block output")


def test_cifar_resnet_trains_like_a_torch_reference():
    """resnet20 against the same network written with torch's modules (option-A shortcut by slicing and padding)."""
    torch.manual_seed(0)
    ours = models.resnet20().double()
    nontrivial_batch_norms(ours)

    def bn(x, m):  # BatchNorm2d's forward in torch's functional ops
        if m.training:
            m.num_batches_tracked.add_(1)
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, m.training, m.momentum, m.eps)

    class TorchBlock(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b, self.stride = b, b.shortcut_stride

        def forward(self, x):
            b = self.b
            out = F.relu(bn(F.conv2d(x, b.conv1.weight, None, b.stride, 1), b.bn1))
            out = bn(F.conv2d(out, b.conv2.weight, None, 1, 1), b.bn2)
            short = x[:, :, ::self.stride, ::self.stride]  # option A: subsample, then zero channels
            return F.relu(out + F.pad(short, (0, 0, 0, 0, 0, out.shape[1] - short.shape[1])))

    import copy
    ref = copy.deepcopy(ours)
    for layer in (ref.layer1, ref.layer2, ref.layer3):
        for i in range(len(layer)):
            layer[i] = TorchBlock(layer[i])

    def ref_forward(x):
        x = F.relu(bn(F.conv2d(x, ref.conv1.weight, None, 1, 1), ref.bn1))
        return ref.fc(torch.flatten(ref.avgpool(ref.layer3(ref.layer2(ref.layer1(x)))), 1))

    ref.forward = ref_forward
    assert_models_agree(ours, ref, torch.randn(4, 3, 32, 32, dtype=torch.float64))


# ---- AlexNet -----------------------------------------------------------------------------------------


def test_alexnet_torchvision_variant_matches_torchvision():
    torch.manual_seed(0)
    ours, theirs = twins("alexnet", num_classes=10)
    assert_models_agree(ours, theirs, torch.randn(2, 3, 96, 96, dtype=torch.float64))


def test_alexnet_original_layer_shapes_match_the_table():
    model = models.alexnet(variant="original")
    shapes = []
    for m in model.features:
        if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            m.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 3, 227, 227))
    assert shapes == [(96, 55, 55), (96, 27, 27), (256, 27, 27), (256, 13, 13), (384, 13, 13), (384, 13, 13),
                      (256, 13, 13), (256, 6, 6)]
    fcs = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(9216, 4096), (4096, 4096), (4096, 1000)]
    assert logits.shape == (1, 1000) and (logits < 0).any()  # no ReLU on the class scores
    with pytest.raises(ValueError, match="variant must be one of"):
        models.alexnet(variant="vgg")


# ---- the training step runs on fastconv's kernels ----------------------------------------------------------


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# torch's own implementations of what fastconv provides: none may run in a fastconv model's training step
TORCH_KERNELS = ("convolution", "conv2d", "cudnn", "mkldnn", "batch_norm", "max_pool2d", "relu", "threshold",
                 "hardtanh")


@pytest.mark.parametrize("name,shape", [("resnet20", (4, 3, 16, 16)), ("resnet18", (2, 3, 64, 64)),
                                        ("resnet50", (2, 3, 64, 64)), ("alexnet", (2, 3, 96, 96))])
def test_training_step_runs_on_fastconv_kernels(name, shape):
    model = getattr(models, name)(num_classes=10)
    x = torch.randn(shape)
    with OpRecorder() as rec:
        loss = model(x).square().mean()
        loss.backward()
    used_torch = sorted(op for op in rec.ops if op.startswith("aten.") and any(k in op for k in TORCH_KERNELS))
    # (the classifier's ReLUs in AlexNet are torch's: they follow Linear layers, not convs)
    if name == "alexnet":
        used_torch = [op for op in used_torch if op not in ("aten.relu", "aten.relu_", "aten.threshold_backward")]
    assert not used_torch, used_torch
    assert {"fastconv.conv2d_im2col", "fastconv.conv2d_im2col_dgrad", "fastconv.conv2d_im2col_wgrad"} <= rec.ops
    if name.startswith("resnet"):
        assert {"fastconv.batch_norm_relu", "fastconv.batch_norm_relu_backward", "fastconv.residual_add",
                "fastconv.residual_add_backward"} <= rec.ops


# ---- the digits demo ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_export_of_a_model_runs_fastconv_ops():
    """torch.export sees the fastconv ops through their fakes, with a dynamic batch: the exported program calls
    them (it does not decompose them into aten convolutions) and matches eager, in eval and in training mode."""
    torch.manual_seed(0)
    model = models.resnet20().eval()
    x = torch.randn(3, 3, 32, 32)
    batch = torch.export.Dim("batch", min=2, max=64)
    for train in (False, True):
        model.train(train)
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert any(t.startswith("fastconv.") for t in targets), targets
        assert not any("convolution" in t for t in targets), targets
        if not train:
            for n in (3, 5):
                xn = torch.randn(n, 3, 32, 32)
                torch.testing.assert_close(program.module()(xn), model(xn), rtol=1e-4, atol=1e-5)


def test_digits_demo_reaches_97_percent():
    pytest.importorskip("sklearn")
    from fastconv import demo
    assert demo.main(["--target", "0.97"]) == 0


# ---- CUDA --------------------------------------------------------------------------------------------


@cuda
@pytest.mark.cuda
def test_cuda_resnet50_bf16_channels_last_error_bounded_by_torchs():
    torch.manual_seed(0)
    ours, theirs = twins("resnet50", dtype=torch.float32, num_classes=10)
    exact = getattr(tv.models, "resnet50")(num_classes=10)
    exact.load_state_dict(theirs.state_dict())
    ours, theirs, exact = ours.cuda().eval(), theirs.cuda().eval(), exact.cuda().double().eval()
    x = torch.randn(8, 3, 128, 128, device="cuda")
    with torch.no_grad():
        truth = exact(x.double())
        cl = dict(memory_format=torch.channels_last)
        got = ours.to(dtype=torch.bfloat16, **cl)(x.bfloat16().to(**cl))
        ref = theirs.to(dtype=torch.bfloat16, **cl)(x.bfloat16().to(**cl))
    assert rel_err(got, truth) <= max(2 * rel_err(ref, truth), 8 * EPS[torch.bfloat16])
