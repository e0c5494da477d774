"""ShaResNets by name in timm, and the path timm's own train.py walks with one of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

import share_transform as st
from share_transform.models.sharesnet import CIFAR_SHARED, SHARESNETS

# Reduced widths and depths, where the full network is not the point.
SMALL = {"layers": [3, 4, 2, 2], "channels": (8, 16, 32, 64)}


def test_names_are_in_timms_registry_without_weights() -> None:
    assert timm.list_models("sharesnet*") == [
        "sharesnet18",
        "sharesnet34",
        "sharesnet50",
        "sharesnet101",
        "sharesnet152",
    ]
    assert list(SHARESNETS) == timm.list_models("sharesnet*")
    assert set(timm.list_models("*_share")) == {"preact_resnet164_share", "wrn_40_4_share", "wrn_28_10_share"}
    assert timm.list_pretrained("sharesnet*") == timm.list_pretrained("*_share") == []  # nothing to download
    for name in [*SHARESNETS, *CIFAR_SHARED]:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.architecture == name and not cfg.url and not cfg.hf_hub_id


def test_importing_the_package_registers_the_names() -> None:
    # A fresh interpreter, as timm's train.py run after "import share_transform" sees the registry.
    code = "import share_transform, timm; print(timm.is_model('sharesnet152'), timm.is_model('wrn_40_4_share'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


def test_sharesnet152_has_the_papers_parameter_count() -> None:
    with torch.device("meta"):  # planned on meta tensors: nothing allocated
        model = timm.create_model("sharesnet152")
    assert st.count_parameters(model) == 36_821_032  # paper Table 1 (resnet152: 60,192,808)
    assert st.get_plan(model).policy == "imagenet" and st.is_tied(model)


@pytest.mark.parametrize("name", list(SHARESNETS))
def test_sharesnet_is_its_resnet_applied(name: str) -> None:
    with torch.device("meta"):
        shared = timm.create_model(name, num_classes=7)
        plain = timm.create_model(SHARESNETS[name], num_classes=7)
    assert type(shared) is type(plain) and shared.fc.out_features == 7
    assert st.get_plan(shared).groups == st.plan(plain).groups
    assert st.count_parameters(shared) == st.count_parameters(st.apply(plain))
    assert shared.pretrained_cfg["architecture"] == name
    assert shared.pretrained_cfg["input_size"] == plain.pretrained_cfg["input_size"]


@pytest.mark.parametrize("name", list(CIFAR_SHARED))
def test_cifar_share_variants_use_policy_cifar(name: str) -> None:
    with torch.device("meta"):
        shared = timm.create_model(name, num_classes=100)
        plain = timm.create_model(CIFAR_SHARED[name], num_classes=100)
    plan = st.get_plan(shared)
    assert plan.policy == "cifar" and plan.groups == st.plan(plain, "cifar").groups
    assert all(s.spatial_convs[0].group is None for s in plan.stages)


def write_image_folder(root: Path, classes: int = 2, per_class: int = 4, size: int = 40) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


def test_timm_train_py_path_keeps_the_ties(tmp_path: Path) -> None:
    # The calls timm's train.py makes, in its order, with its defaults where it has them.
    write_image_folder(tmp_path / "train")
    torch.manual_seed(0)
    model = timm.create_model("sharesnet50", num_classes=2, **SMALL)
    data_config = resolve_data_config({"input_size": (3, 32, 32)}, model=model)
    assert (data_config["mean"], data_config["std"]) == (model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    dataset = create_dataset("", root=str(tmp_path), split="train", is_training=True)
    loader = create_loader(
        dataset,
        input_size=data_config["input_size"],
        batch_size=4,
        is_training=True,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=0,
        device=torch.device("cpu"),
    )
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.1, weight_decay=1e-4, momentum=0.9)
    optimized = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(optimized) == len({id(p) for p in optimized}) == len(list(model.parameters()))
    model_ema = ModelEmaV3(model, decay=0.9)

    group = st.get_plan(model).groups[0]
    shared = model.get_parameter(f"{group.members[0]}.weight")
    start = shared.detach().clone()
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    model.train()
    for _ in range(2):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            model_ema.update(model, step=steps)
    assert steps == 4
    assert not torch.equal(shared, start)  # trained
    for net in (model, model_ema.module):
        assert st.is_tied(net)
        assert all(
            net.get_parameter(f"{m}.weight") is net.get_parameter(f"{group.members[0]}.weight") for m in group.members
        )
    assert st.count_parameters(model_ema.module) == st.count_parameters(model)


def test_features_only_and_forward_intermediates() -> None:
    features = timm.create_model("sharesnet50", features_only=True, out_indices=(1, 2, 3), **SMALL)
    assert st.is_tied(features)
    x = torch.randn(2, 3, 64, 64)
    assert [f.shape[1:] for f in features(x)] == [(32, 16, 16), (64, 8, 8), (128, 4, 4)]
    names = list(features.state_dict())
    assert "layer1.0.conv2.weight" in names and "layer1.1.conv2.weight" not in names  # listed once
    assert "layer4.0.conv2.weight" not in names  # out_indices=(1, 2, 3): timm drops what follows layer3

    torch.manual_seed(0)
    model = timm.create_model("sharesnet50", **SMALL).eval()
    final, intermediates = model.forward_intermediates(x)
    assert [t.shape[1:] for t in intermediates] == [(64, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    torch.testing.assert_close(final, model.forward_features(x))
