"""The paper's CIFAR networks: registration, exact sizes, architecture, init, sharing, forward/backward."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import partial

import pytest
import timm
import torch
from torch import nn

import share_transform
from share_transform.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    PreActBottleneck,
    PreActResNet,
    WideBasicBlock,
    WideResNet,
    preact_resnet,
    wide_resnet,
)

# name -> (num_classes, unique parameters unshared, after policy "cifar"; None where the paper has no figure)
PAPER_MODELS = {
    "preact_resnet164": (10, 1_703_258, 929_114),
    "wrn_40_4": (10, 8_949_210, 5_852_634),
    "wrn_28_10": (100, 36_536_884, 26_860_084),
    "preact_resnet92": (10, 961_370, None),
    "wrn_28_4": (10, 5_849_050, None),
    "wrn_22_10": (100, 26_855_604, None),
}


@pytest.fixture(scope="module")
def paper_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: timm.create_model(name, num_classes=nc) for name, (nc, _, _) in PAPER_MODELS.items()}


def spatial_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]


# --- registration and timm API ------------------------------------------------------------------


def test_registered_on_package_import() -> None:
    code = (
        "import timm, share_transform\n"
        "names = ['preact_resnet164', 'preact_resnet92', 'wrn_40_4', 'wrn_28_4', 'wrn_28_10', 'wrn_22_10']\n"
        "assert set(names) <= set(timm.list_models()), timm.list_models('*wrn*')\n"
        "m = timm.create_model('wrn_28_10', num_classes=100)\n"
        "assert m.num_classes == 100 and m.pretrained_cfg['input_size'] == (3, 32, 32)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_pretrained_cfg(name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["mean"] == CIFAR10_MEAN and cfg["std"] == CIFAR10_STD
    assert cfg["num_classes"] == 10
    assert not cfg.get("url")
    model = timm.create_model(name)
    assert model.num_classes == 10
    assert model.pretrained_cfg["architecture"] == name
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)


def test_timm_api() -> None:
    model = wide_resnet(10, 2, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 128, 8, 8)
    assert model.forward_head(features, pre_logits=True).shape == (2, 128)
    assert model(x).shape == (2, 7)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == "fc"
    assert model.num_features == 128
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)
    assert torch.count_nonzero(model.fc.bias) == 0
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    gray = timm.create_model("preact_resnet92", in_chans=1, num_classes=0)
    assert gray.stem.in_channels == 1 and gray(torch.randn(2, 1, 32, 32)).shape == (2, 256)


def test_features_only() -> None:
    model = timm.create_model("wrn_28_4", features_only=True)
    shapes = [tuple(f.shape) for f in model(torch.randn(2, 3, 32, 32))]
    assert shapes == [(2, 16, 32, 32), (2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8)]


# --- exact sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_unshared_parameter_count(paper_models: dict[str, nn.Module], name: str) -> None:
    _, before, _ = PAPER_MODELS[name]
    assert share_transform.count_parameters(paper_models[name]) == before


@pytest.mark.parametrize("name", [n for n, (_, _, after) in PAPER_MODELS.items() if after is not None])
def test_cifar_policy_counts(paper_models: dict[str, nn.Module], name: str) -> None:
    _, before, after = PAPER_MODELS[name]
    model = paper_models[name]
    share_plan = share_transform.plan(model, "cifar")
    assert (share_plan.params_before, share_plan.params_after) == (before, after)
    # One group per stage; every block but the first shares the stage's spatial conv (conv2).
    blocks = (model.depth - 2) // 9 if isinstance(model, PreActResNet) else (model.depth - 4) // 6
    assert [g.resolution for g in share_plan.groups] == [(32, 32), (16, 16), (8, 8)]
    for stage, group in enumerate(share_plan.groups):
        assert group.members == tuple(f"stages.{stage}.{b}.conv2" for b in range(1, blocks))


def test_preact_resnet164_imagenet_policy_shares_first_block(paper_models: dict[str, nn.Module]) -> None:
    # The stride sits on the first 1x1, so every 3x3 of a stage sees the stage's resolution: without the
    # CIFAR policy's exception all 18 blocks share, 17 x (16^2 + 32^2 + 64^2) x 9 fewer parameters.
    share_plan = share_transform.plan(paper_models["preact_resnet164"], "imagenet")
    assert [len(g.members) for g in share_plan.groups] == [18, 18, 18]
    assert share_plan.params_after == 1_703_258 - 17 * 9 * (16**2 + 32**2 + 64**2) == 880_730


@pytest.mark.parametrize(("depth", "widen_factor", "params"), [(16, 2, 691_674), (16, 8, 10_961_370), (10, 1, 77_850)])
def test_any_wrn_depth(depth: int, widen_factor: int, params: int) -> None:
    model = wide_resnet(depth, widen_factor)
    assert model.pretrained_cfg["architecture"] == f"wrn_{depth}_{widen_factor}"
    assert [len(s) for s in model.stages] == [(depth - 4) // 6] * 3
    assert share_transform.count_parameters(model) == params


@pytest.mark.parametrize(("depth", "blocks"), [(11, 1), (20, 2), (56, 6), (110, 12)])
def test_any_preact_depth(depth: int, blocks: int) -> None:
    model = preact_resnet(depth, num_classes=100)
    assert model.pretrained_cfg["architecture"] == f"preact_resnet{depth}"
    assert [len(s) for s in model.stages] == [blocks] * 3
    assert model.fc.out_features == 100
    # depth counts the stem, three convs per block and the classifier.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m not in _shortcuts(model)]
    assert len(convs) + 1 == depth


def _shortcuts(model: nn.Module) -> list[nn.Module]:
    return [m.shortcut for m in model.modules() if getattr(m, "shortcut", None) is not None]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: preact_resnet(100), r"9n\+2"),
        (lambda: preact_resnet(2), r"9n\+2"),
        (lambda: wide_resnet(27, 4), r"6n\+4"),
        (lambda: wide_resnet(4, 4), r"6n\+4"),
        (lambda: wide_resnet(28, 0), "widen_factor"),
        (lambda: wide_resnet(28, 2, dropout=1.0), "dropout"),
    ],
)
def test_bad_configuration_raises(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


# --- architecture -----------------------------------------------------------------------------------


def test_preact_bottleneck_layout(paper_models: dict[str, nn.Module]) -> None:
    model = paper_models["preact_resnet164"]
    assert model.stem.in_channels == 3 and model.stem.out_channels == 16
    for stage_idx, stage in enumerate(model.stages):
        out_chs = 64 * 2**stage_idx
        for block_idx, block in enumerate(stage):
            assert isinstance(block, PreActBottleneck)
            first = block_idx == 0
            stride = 2 if first and stage_idx > 0 else 1
            assert block.conv1.stride == (stride, stride)  # the stride is on the first 1x1
            assert block.conv2.kernel_size == (3, 3) and block.conv2.stride == (1, 1)
            assert block.conv2.in_channels == block.conv2.out_channels == out_chs // 4
            assert block.conv3.out_channels == out_chs
            # Projection shortcut in the first block of each stage only.
            assert (block.shortcut is not None) == first
            if first:
                assert block.shortcut.kernel_size == (1, 1) and block.shortcut.stride == (stride, stride)
    assert model.norm.num_features == 256 and model.fc.in_features == 256


def test_wrn_layout(paper_models: dict[str, nn.Module]) -> None:
    model = paper_models["wrn_28_10"]
    assert model.stem.out_channels == 16
    for stage_idx, stage in enumerate(model.stages):
        width = 160 * 2**stage_idx
        for block_idx, block in enumerate(stage):
            assert isinstance(block, WideBasicBlock)
            stride = 2 if block_idx == 0 and stage_idx > 0 else 1
            assert block.conv1.stride == (stride, stride) and block.conv2.stride == (1, 1)
            assert block.conv1.out_channels == block.conv2.out_channels == width
            assert (block.shortcut is not None) == (block_idx == 0)
    # k = 1 keeps 16 channels in stage 1: identity shortcut there.
    assert wide_resnet(10, 1).stages[0][0].shortcut is None


def test_dropout_only_when_asked(paper_models: dict[str, nn.Module]) -> None:
    for model in paper_models.values():
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    model = wide_resnet(10, 1, dropout=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.3 for d in drops)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model.forward_features(x), model.forward_features(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_cifar_init(paper_models: dict[str, nn.Module]) -> None:
    model = paper_models["wrn_28_10"]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is None
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)
    # fan_in: std = sqrt(2 / (k*k*in_channels)), checked on a conv with 3.7 M weights.
    conv = model.stages[2][1].conv2
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 640)), rel=0.01)
    shortcut = model.stages[2][0].shortcut
    assert shortcut.weight.std().item() == pytest.approx(math.sqrt(2 / 320), rel=0.01)


def test_cifar_init_is_the_package_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """The models initialise with share_transform.init.init_weights("fan_in") itself, not a copy of it."""
    import importlib

    import share_transform.init

    # import_module: the package's ``preact_resnet`` attribute is the builder function, not the module.
    frame_module = importlib.import_module("share_transform.models._cifar")
    assert frame_module.init_weights is share_transform.init.init_weights
    for build in (partial(wide_resnet, 10, 2), partial(preact_resnet, 11)):
        torch.manual_seed(0)
        built = build(num_classes=5)
        # The same construction without the models' own init, then the package's: the same draws. A model that
        # initialised itself some other way (or twice) would draw differently.
        with monkeypatch.context() as m:
            m.setattr(frame_module, "init_weights", lambda model, mode: model)
            torch.manual_seed(0)
            expected = build(num_classes=5)
        share_transform.init.init_weights(expected, "fan_in")
        for (name, a), b in zip(built.state_dict().items(), expected.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


# --- forward / backward, shared and not ---------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_forward_backward(name: str, shared: bool) -> None:
    num_classes = PAPER_MODELS[name][0]
    model = timm.create_model(name, num_classes=num_classes)
    if shared:
        share_transform.apply(model, "cifar")
        assert model.stages[1][1].conv2.weight is model.stages[1][-1].conv2.weight
        assert model.stages[1][0].conv2.weight is not model.stages[1][1].conv2.weight
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    out.square().mean().backward()
    for path, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), path
        assert p.grad.abs().sum() > 0, path


@pytest.mark.parametrize(
    "build",
    [lambda: preact_resnet(29, base_width=4), lambda: wide_resnet(22, 1)],
    ids=["preact_resnet29", "wrn_22_1"],
)
def test_shared_gradient_is_sum_over_blocks(build) -> None:
    # Paper eq. 5: the shared weight's gradient is the sum of the blocks' gradients. Compare a shared model
    # with an unshared copy whose member convs all hold the shared weight's values.
    torch.manual_seed(0)
    unshared = build()
    shared = build()
    shared.load_state_dict(unshared.state_dict())
    share_plan = share_transform.plan(shared, "cifar")
    share_transform.apply(shared, "cifar", plan=share_plan)
    with torch.no_grad():
        for group in share_plan.groups:
            for path in group.members:
                unshared.get_submodule(path).weight.copy_(shared.get_submodule(group.members[0]).weight)
    x = torch.randn(2, 3, 32, 32)
    out_unshared, out_shared = unshared(x), shared(x)
    torch.testing.assert_close(out_shared, out_unshared)
    out_unshared.sum().backward()
    out_shared.sum().backward()
    assert share_plan.groups
    for group in share_plan.groups:
        summed = sum(unshared.get_submodule(path).weight.grad for path in group.members)
        torch.testing.assert_close(shared.get_submodule(group.members[0]).weight.grad, summed)


def test_registered_names_build_the_papers_networks(paper_models: dict[str, nn.Module]) -> None:
    built = {name: (type(m), m.depth) for name, m in paper_models.items()}
    assert built == {
        "preact_resnet164": (PreActResNet, 164),
        "wrn_40_4": (WideResNet, 40),
        "wrn_28_10": (WideResNet, 28),
        "preact_resnet92": (PreActResNet, 92),
        "wrn_28_4": (WideResNet, 28),
        "wrn_22_10": (WideResNet, 22),
    }
    # The widen factor comes from the name: stage 1 of WRN-28-4 is 16 * 4 channels wide, of WRN-28-10 16 * 10.
    assert paper_models["wrn_28_4"].stages[0][0].conv2.out_channels == 64
    assert paper_models["wrn_28_10"].stages[0][0].conv2.out_channels == 160
