"""fastconv.Conv2d as a drop-in for torch.nn.Conv2d, fastconv.convert, and torch.compile."""
import copy
import inspect

import pytest
import torch
import torch.nn as nn

import fastconv
from conftest import DEVICES
from helpers import assert_close_to

MODULE_CONFIGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6, bias=False),
    dict(in_channels=3, out_channels=4, kernel_size=4, padding="same"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=(3, 5), padding=(1, 2), padding_mode="replicate", stride=2),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="circular", dilation=1),
]


def test_constructor_signature_is_nn_conv2ds_plus_algo():
    ours = inspect.signature(fastconv.Conv2d.__init__).parameters
    theirs = inspect.signature(nn.Conv2d.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
    assert ours["algo"].kind is inspect.Parameter.KEYWORD_ONLY and ours["algo"].default == "auto"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k not in ("in_channels",)))
def test_module_matches_nn_conv2d_and_state_dicts_load_both_ways(config, device):
    torch.manual_seed(1)
    ref = nn.Conv2d(**config, device=device)
    ours = fastconv.Conv2d(**config, device=device)
    ours.load_state_dict(ref.state_dict())  # nn -> fastconv
    ref_copy = nn.Conv2d(**config, device=device)
    ref_copy.load_state_dict(ours.state_dict())  # fastconv -> nn, strict
    assert ours.state_dict().keys() == ref.state_dict().keys()

    for shape in [(2, config["in_channels"], 9, 10), (config["in_channels"], 7, 8)]:  # batched and unbatched
        x = torch.randn(shape, device=device, requires_grad=True)
        y, r = ours(x), ref(x)
        assert y.shape == r.shape
        assert_close_to(y, r, 1e-5, "output")
        gy = torch.randn_like(r)
        params = [x] + list(ours.parameters())
        grads = torch.autograd.grad(y, params, gy)
        ref_grads = torch.autograd.grad(r, [x] + list(ref.parameters()), gy)
        for g, rg in zip(grads, ref_grads):
            assert_close_to(g, rg, 1e-5, "grad")


def test_device_dtype_repr_and_algo():
    m = fastconv.Conv2d(3, 4, 3, stride=2, dtype=torch.float64, algo="direct")
    assert m.weight.dtype == torch.float64 and m.bias.dtype == torch.float64
    assert isinstance(m, nn.Conv2d)
    assert repr(m) == "Conv2d(3, 4, kernel_size=(3, 3), stride=(2, 2), algo='direct')"
    with pytest.raises(ValueError, match="unknown algo 'fast'"):
        fastconv.Conv2d(3, 4, 3, algo="fast")
    with pytest.raises(ValueError):  # nn.Conv2d's own argument checks still apply
        fastconv.Conv2d(3, 4, 3, groups=2)


def _small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),  # before the BatchNorm, so that the conv's bias has a gradient that is not ~0
        nn.BatchNorm2d(8),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False), nn.ReLU()),
        nn.Conv2d(8, 4, 2, padding="same"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def test_convert_swaps_every_conv_in_place_and_keeps_parameters():
    torch.manual_seed(2)
    model = _small_net()
    reference = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    hook_calls = []
    model[0].register_forward_hook(lambda *args: hook_calls.append(1))
    converted = fastconv.convert(model, algo="direct")
    assert converted is model
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(type(m) is fastconv.Conv2d and m.algo == "direct" for m in convs)
    assert [id(p) for p in model.parameters()] == params_before
    x = torch.randn(2, 3, 12, 12)
    assert_close_to(model(x), reference(x), 1e-5)
    assert hook_calls == [1]
    # A bare conv is converted too, and already-converted modules just take the new algo.
    bare = fastconv.convert(nn.Conv2d(2, 2, 1))
    assert type(bare) is fastconv.Conv2d and bare.algo == "auto"
    fastconv.convert(model, algo="auto")
    assert all(m.algo == "auto" for m in convs)


def test_convert_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=10).eval()
    reference = copy.deepcopy(model)
    fastconv.convert(model)
    n_convs = sum(type(m) is fastconv.Conv2d for m in model.modules())
    assert n_convs == 20 and not any(type(m) is nn.Conv2d for m in model.modules())
    assert type(model.maxpool) is fastconv.MaxPool2d
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close_to(model(x), reference(x), 1e-4, "logits")
    reference.load_state_dict(model.state_dict())


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(4)
    model = fastconv.convert(_small_net())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    y_eager = model(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), [x] + list(model.parameters()))
    y_compiled = compiled(x)
    grads_compiled = torch.autograd.grad(y_compiled.square().sum(), [x] + list(model.parameters()))
    assert_close_to(y_compiled, y_eager, 1e-5, "output")
    for g, ge in zip(grads_compiled, grads_eager):
        assert_close_to(g, ge, 1e-4, "grad")
