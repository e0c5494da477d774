"""The plan: Table 1 to the parameter, the stage structure, and analysis that never mutates."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision

import share_transform as st

KEPT_FIRST = "first block of the stage (policy cifar)"

# Paper Table 1, ImageNet rows (docs/design.md, The paper's tables): exact torchvision/timm totals with 1000 classes.
TABLE1 = {
    "resnet34": (21_797_672, 13_613_864),
    "resnet50": (25_557_032, 20_469_800),
    "resnet101": (44_549_160, 29_434_920),
    "resnet152": (60_192_808, 36_821_032),
}


@pytest.mark.parametrize("source", ["timm", "torchvision"])
@pytest.mark.parametrize("name", list(TABLE1))
def test_table1_imagenet_rows_exact(source: str, name: str) -> None:
    model = st.build_model(name, source=source)
    before, after = TABLE1[name]
    p = st.plan(model)
    assert (p.params_before, p.params_after) == (before, after)
    st.apply(model, plan=p)
    assert st.count_parameters(model) == after
    assert sum(t.numel() for t in model.parameters()) == after


def test_resnet50_stage_structure() -> None:
    p = st.plan(timm.create_model("resnet50"))
    assert [s.resolution for s in p.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [len(s.blocks) for s in p.stages] == [3, 4, 6, 3]
    assert p.stages[1].blocks == ("layer2.0", "layer2.1", "layer2.2", "layer2.3")
    # Stages 2-4 put the stride on the 3x3 of their first block: it keeps its own weight.
    assert [len(g.members) for g in p.groups] == [3, 3, 5, 2]
    assert p.groups[0].members == ("layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")
    first = p.stages[1].spatial_convs[0]
    assert (first.path, first.group, first.kept_because) == ("layer2.0.conv2", None, "strided")
    assert [g.resolution for g in p.groups] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [g.signature.describe() for g in p.groups] == ["64x64x3x3", "128x128x3x3", "256x256x3x3", "512x512x3x3"]
    assert p.spatial_convs_removed == 2 + 2 + 4 + 1
    assert (p.convs_before, p.convs_after) == (53, 44)


# Dilated backbones trade the stride of the later stages for dilation: (output resolution per stage,
# what the cifar policy keeps in each stage's first block).
DILATED = {
    8: ([(56, 56), (28, 28), (28, 28), (28, 28)], [KEPT_FIRST, "strided", KEPT_FIRST, KEPT_FIRST]),
    16: ([(56, 56), (28, 28), (14, 14), (14, 14)], [KEPT_FIRST, "strided", "strided", KEPT_FIRST]),
}


@pytest.mark.parametrize("output_stride", list(DILATED))
def test_dilated_resnet50_has_four_stages(output_stride: int) -> None:
    with torch.device("meta"):
        model = timm.create_model("resnet50", output_stride=output_stride)
    resolutions, kept = DILATED[output_stride]
    imagenet, cifar = st.plan(model), st.plan(model, "cifar")
    layers = [tuple(f"layer{i}.{j}" for j in range(n)) for i, n in enumerate((3, 4, 6, 3), start=1)]
    for p in (imagenet, cifar):
        assert [s.resolution for s in p.stages] == resolutions
        assert [s.blocks for s in p.stages] == layers
        assert all(c.stage == g.stage for g in p.groups for c in p.spatial_convs if c.path in g.members)
    for stage, reason in zip(cifar.stages, kept):
        first = stage.spatial_convs[0]
        assert (first.group, first.kept_because) == (None, reason)
        assert all(c.group is not None for c in stage.spatial_convs[1:])
    assert [len(g.members) for g in cifar.groups] == [2, 3, 5, 2]
    # The first block of a dilated stage keeps the previous stage's dilation, so under policy imagenet too
    # it has no partner, and the groups are those of the plain resnet50.
    assert [len(g.members) for g in imagenet.groups] == [3, 3, 5, 2]
    assert imagenet.params_after == TABLE1["resnet50"][1]


def test_basic_block_shares_second_conv_and_strided_first_block() -> None:
    # ResNet-34: the basic block's spatial conv is its second 3x3, which is stride 1 in every block.
    p = st.plan(torchvision.models.resnet34())
    assert [len(g.members) for g in p.groups] == [3, 4, 6, 3]
    assert all(m.endswith(".conv2") for g in p.groups for m in g.members)
    assert p.spatial_convs_removed == 12


def test_cifar_policy_keeps_first_block_of_every_stage() -> None:
    model = torchvision.models.resnet34()
    imagenet, cifar = st.plan(model, "imagenet"), st.plan(model, "cifar")
    assert [len(g.members) for g in cifar.groups] == [2, 3, 5, 2]
    for stage in cifar.stages:
        assert stage.spatial_convs[0].group is None
        assert stage.spatial_convs[0].kept_because == KEPT_FIRST
        assert all(c.group is not None for c in stage.spatial_convs[1:])
    assert imagenet.params_after < cifar.params_after


def test_antialiased_first_block_stays_own() -> None:
    # resnetaa: the stride moves to a blur pool after the 3x3, whose input still has the previous
    # stage's resolution: it must not join the previous stage's group nor its own stage's.
    p = st.plan(timm.create_model("resnetaa50"))
    first = p.stages[1].spatial_convs[0]
    assert first.signature.is_stride_one and first.resolution == (56, 56)
    assert first.group is None
    assert all(first.path not in g.members for g in p.groups)
    assert p.params_after == TABLE1["resnet50"][1]


def test_std_conv_bit_model_shares() -> None:
    # BiT uses timm's StdConv2d (a Conv2d subclass) which plain fx tracing would dissolve.
    model = timm.create_model("resnetv2_50x1_bit")
    p = st.plan(model, input_size=(3, 64, 64))
    assert len(p.groups) == 4
    assert all(g.signature.conv_class.endswith("StdConv2d") for g in p.groups)


def test_plan_does_not_mutate_model() -> None:
    model = timm.create_model("resnet18")
    model.train()
    model.layer2.eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    st.plan(model, input_size=(3, 64, 64))
    assert [id(p) for p in model.parameters()] == params
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats and counters too
    assert st.get_plan(model) is None


def test_default_input_size_comes_from_pretrained_cfg() -> None:
    model = timm.create_model("resnet18")
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 160, 160)}
    p = st.plan(model)
    assert p.input_size == (3, 160, 160)
    assert p.stages[0].resolution == (40, 40)
    assert st.plan(torchvision.models.resnet18()).input_size == (3, 224, 224)


def test_plan_round_trips_through_json_and_prints_table() -> None:
    p = st.plan(timm.create_model("resnet152"))
    again = st.SharePlan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p
    text = str(p)
    lines = text.splitlines()
    assert lines[0] == 'ShaResNet plan for resnet152 (policy "imagenet", input 3x224x224)'
    assert lines[1].split() == [
        "stage", "resolution", "blocks", "shared", "groups", "shared", "weight", "templates", "params", "saved"
    ]  # fmt: skip
    assert lines[4].split() == ["3", "14x14", "36", "35/36", "1", "256x256x3x3", "-", "20,054,016"]
    assert lines[-2] == "parameters: 60,192,808 -> 36,821,032 (-38.8%)"
    assert lines[-1] == "distinct conv weights: 155 -> 112"
