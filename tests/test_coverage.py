"""The pass across the residual families: every torchvision ResNet builder and a sample of each timm family at
the paper's scope; one reduced model of each family of benchmarks/sweep.py at scope "block"; the full sweep of
every family at every scope (slow)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import nn

import share_transform as st
from share_transform.build import resnet_family

SIZE = (3, 64, 64)

TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

# One fast member of each timm family; ``layers`` shrinks the depth where the builder allows it.
TIMM_SAMPLE = {
    "resnet18d": {},
    "resnet50_clip": {},  # attention pool: plain fx tracing fails, timm's notrace registry succeeds
    "resnetv2_50": {"layers": [2, 2, 2, 2]},
    "resnetv2_50x1_bit": {},  # StdConv2d
    "wide_resnet50_2": {"layers": [2, 2, 2, 2]},
    "resnext50d_32x4d": {"layers": [2, 2, 2, 2]},
    "resnext26ts": {},
    "seresnet18": {},
    "seresnext26d_32x4d": {},
    "ecaresnet26t": {},
    "resnetrs50": {"layers": [2, 2, 2, 2]},
    "skresnet18": {},
    "gcresnet33ts": {},
    "resnetblur18": {},
    "resnetaa34d": {},
}


def test_torchvision_builders_are_all_covered() -> None:
    assert sorted(resnet_family("torchvision")) == sorted(TORCHVISION)


def check_shared_model(model: nn.Module, input_size: tuple[int, int, int], scope: str | None = None) -> st.SharePlan:
    plan = st.plan(model, input_size=input_size, scope=scope)
    assert plan.groups, "expected at least one share group"
    st.apply(model, plan=plan)
    assert st.count_parameters(model) == plan.params_after < plan.params_before

    # Run the shared model and record the spatial size every member really sees: a conv's (H, W); a linear
    # layer's dimensions between batch and features (H, W of a channels-last map; none after a global pool).
    modules = dict(model.named_modules())
    seen: dict[str, tuple[int, ...]] = {}

    def size(module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
        if isinstance(module, nn.Linear):
            inner = tuple(x.shape[1:-1])
            return (1,) * (2 - len(inner)) + inner
        return tuple(x.shape[-2:])

    def record(path: str) -> Any:
        return lambda module, args: seen.__setitem__(path, size(module, args[0]))

    hooks = [modules[path].register_forward_pre_hook(record(path)) for g in plan.groups for path in g.members]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *input_size))
    for h in hooks:
        h.remove()
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    for g in plan.groups:
        assert {seen[p] for p in g.members} == {g.resolution}, f"group mixes resolutions: {g}"
    return plan


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_family(name: str) -> None:
    check_shared_model(torchvision.models.get_model(name, weights=None), SIZE)


@pytest.mark.parametrize("name", list(TIMM_SAMPLE))
def test_timm_family_sample(name: str) -> None:
    model = timm.create_model(name, pretrained=False, **TIMM_SAMPLE[name])
    # CLIP's attention pool has a fixed position embedding: use the model's own size there.
    check_shared_model(model, tuple(model.pretrained_cfg["input_size"]) if "clip" in name else SIZE)


# One reduced model of each family the sweep covers (benchmarks/sweep.py), shared at scope "block".
BLOCK_SAMPLE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ResNet": ("timm", "resnet50", {"layers": [2, 2, 2, 2], "channels": (8, 16, 32, 64)}),
    "ResNet-D": ("timm", "resnet50d", {"layers": [2, 2, 2, 2], "channels": (8, 16, 32, 64), "stem_width": 8}),
    "ResNeXt": ("timm", "resnext26ts", {}),
    "SE-ResNet": ("timm", "seresnet50", {"layers": [2, 2, 2, 2], "channels": (8, 16, 32, 64)}),
    "Res2Net": ("timm", "res2net50_26w_4s", {"layers": [2, 2, 2, 2], "channels": (16, 32, 64, 128)}),
    "RegNetX": ("timm", "regnetx_002", {}),
    "RegNetY": ("timm", "regnety_002", {}),
    "ConvNeXt": ("timm", "convnext_tiny", {"depths": (2, 2, 2, 2), "dims": (8, 16, 32, 64)}),
    "ConvNeXt V2": ("timm", "convnextv2_tiny", {"depths": (2, 2, 2, 2), "dims": (8, 16, 32, 64)}),
    "EfficientNet": ("timm", "efficientnet_b0", {}),
    "EfficientNetV2": ("timm", "tf_efficientnetv2_b0", {}),
    "MobileNetV2": ("timm", "mobilenetv2_050", {}),
    "MobileNetV3": ("timm", "mobilenetv3_small_100", {}),
    "torchvision MobileNetV2": ("torchvision", "mobilenet_v2", {"width_mult": 0.5}),
    "torchvision MobileNetV3": ("torchvision", "mobilenet_v3_small", {}),
    "torchvision EfficientNet": ("torchvision", "efficientnet_b0", {}),
    "torchvision RegNet": ("torchvision", "regnet_y_400mf", {}),
}


@pytest.mark.parametrize("family", list(BLOCK_SAMPLE))
def test_each_family_shared_at_block_keeps_every_group_at_one_resolution(family: str) -> None:
    source, name, kwargs = BLOCK_SAMPLE[family]
    torch.manual_seed(0)
    if source == "timm":
        model = timm.create_model(name, **kwargs)
    else:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    plan = check_shared_model(model, SIZE, scope="block")
    assert plan.scope == "block" and st.is_tied(model)
    # the block scope reaches past the spatial convs: some group is a 1x1 conv or a linear layer
    assert any(isinstance(g.signature, st.LinearSignature) or g.signature.kernel_size == (1, 1) for g in plan.groups)


def _sweep_script() -> ModuleType:
    """benchmarks/sweep.py, imported: the slow test runs what the benchmark runs."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"
    spec = importlib.util.spec_from_file_location("share_sweep", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_sweep_covers_the_resnet_family_and_every_sampled_family() -> None:
    sweep = _sweep_script()
    covered = sweep.family_models()
    names = {(source, name) for _, source, name in covered}
    assert len(names) == len(covered)  # each model in one family
    assert {("timm", n) for n in resnet_family("timm")} <= names
    assert {("torchvision", n) for n in TORCHVISION} <= names
    assert {(source, name) for source, name, _ in BLOCK_SAMPLE.values()} <= names


#: What gets nothing at any scope: one bottleneck a stage, whose three convs differ in shape (resnet14t; resnet10t's
#: one basic block a stage shares its two 3x3s from scope "all" on); the pruned EfficientNets, whose every block
#: has its own widths, so no two layers of a stage have one signature.
NOTHING_AT_BLOCK = {
    "timm:resnet14t",
    "timm:efficientnet_b1_pruned",
    "timm:efficientnet_b2_pruned",
    "timm:efficientnet_b3_pruned",
}


@pytest.mark.slow
def test_full_sweep_of_every_family_at_every_scope() -> None:
    """Every model of benchmarks/sweep.py's families, on the meta device, at every scope: it plans, "block" saves at
    least what "all" saves, and "all" at least what "last" saves; docs/beyond-resnets.md lists the outcome."""
    sweep = _sweep_script()
    rows = [sweep.sweep_one(*model) for model in sweep.family_models()]
    failed = [r["model"] for r in rows if not r["plans"]]
    assert failed == [], [r["reason"] for r in rows if not r["plans"]]
    for r in rows:
        saved = {scope: r["scopes"][scope]["saved"] for scope in ("last", "all", "block")}
        assert saved["block"] >= saved["all"] >= saved["last"] >= 0, r["model"]
    nothing = {r["model"] for r in rows if not r["scopes"]["block"]["groups"]}
    nothing_at_last = {r["model"] for r in rows if not r["scopes"]["last"]["groups"]}
    assert nothing == NOTHING_AT_BLOCK
    # The ResNet family as before this scope existed: the four that get nothing at the paper's scope.
    resnets = {f"timm:{n}" for n in resnet_family("timm")}
    assert nothing_at_last & resnets == {
        "timm:ecaresnet101d_pruned",
        "timm:ecaresnet50d_pruned",
        "timm:resnet10t",
        "timm:resnet14t",
    }
