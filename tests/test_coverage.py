"""The pass across the ResNet family: every torchvision builder and a sample of each timm family."""

from __future__ import annotations

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


def check_shared_model(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    plan = st.plan(model, input_size=input_size)
    assert plan.groups, "expected at least one share group"
    st.apply(model, plan=plan)
    assert st.count_parameters(model) == plan.params_after < plan.params_before

    # Run the shared model and record the spatial size every member conv really sees.
    modules = dict(model.named_modules())
    seen: dict[str, tuple[int, int]] = {}

    def record(path: str):
        return lambda module, args: seen.__setitem__(path, tuple(args[0].shape[-2:]))

    hooks = [modules[path].register_forward_pre_hook(record(path)) for g in plan.groups for path in g.members]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *input_size))
    for h in hooks:
        h.remove()
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    for g in plan.groups:
        assert {seen[p] for p in g.members} == {g.resolution}, f"group mixes resolutions: {g}"


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_family(name: str) -> None:
    check_shared_model(torchvision.models.get_model(name, weights=None), SIZE)


@pytest.mark.parametrize("name", list(TIMM_SAMPLE))
def test_timm_family_sample(name: str) -> None:
    model = timm.create_model(name, pretrained=False, **TIMM_SAMPLE[name])
    # CLIP's attention pool has a fixed position embedding: use the model's own size there.
    check_shared_model(model, tuple(model.pretrained_cfg["input_size"]) if "clip" in name else SIZE)


@pytest.mark.slow
def test_full_timm_family_sweep() -> None:
    """Every timm ResNet-family model plans (built on the meta device); docs/api.md lists the outcome."""
    names = resnet_family("timm")
    nothing = []
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name)
        p = st.plan(model)
        if not p.groups:
            nothing.append(name)
    # One block a stage (resnet10t/14t) or per-block channel counts (the pruned ECA models): nothing to share.
    assert sorted(nothing) == ["ecaresnet101d_pruned", "ecaresnet50d_pruned", "resnet10t", "resnet14t"]
