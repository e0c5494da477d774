"""Scope "block": every conv and linear layer of a residual branch shares within its stage, weight and bias.

Every expected count is derived here from the model's own modules (widths x kernels x members) or from its
published widths, never copied from the code's output.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnxruntime as ort
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import share_transform as st
from share_transform.cli import main as cli
from share_transform.export import export_onnx
from share_transform.modelinfo import distinct_conv_weights
from share_transform.signature import LinearSignature
from share_transform.soft import bank_of, coefficients_of, is_soft
from share_transform.tie import tensor_aliases

K3 = 3 * 3


def numel(layer: nn.Module) -> int:
    """Parameters of one conv or linear layer: weight and bias."""
    bias = layer.bias.numel() if layer.bias is not None else 0
    return layer.weight.numel() + bias


def saved_by_stages(
    stages: list[list[list[nn.Module]]], *, keep_first_block: bool = False, run: int | None = None
) -> int:
    """Parameters saved when the layers of a stage's blocks share: ``stages`` -> blocks -> branch layers.

    Layers of one stage with the same class, weight shape, stride, padding, dilation, groups and bias (read from
    the modules here, not from share_transform) and stride 1 form a group, in block order; cut into consecutive
    runs of ``run`` (None: one run), a run of n saves (n - 1) layers.
    """
    saved = 0
    for blocks in stages:
        groups: dict[tuple[object, ...], list[nn.Module]] = {}
        for position, layers in enumerate(blocks):
            if keep_first_block and position == 0:
                continue
            for m in layers:
                key: tuple[object, ...] = (type(m), tuple(m.weight.shape), m.bias is not None)
                if isinstance(m, nn.Conv2d):
                    if m.stride != (1, 1):
                        continue
                    key += (m.padding, m.dilation, m.groups, m.padding_mode)
                groups.setdefault(key, []).append(m)
        for members in groups.values():
            size = run or len(members)
            saved += sum((len(members[i : i + size]) - 1) * numel(members[0]) for i in range(0, len(members), size))
    return saved


def original(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------- the counts


def resnet50_branches(model: nn.Module) -> list[list[list[nn.Module]]]:
    """The residual branch of every bottleneck: conv1 (1x1), conv2 (3x3), conv3 (1x1); the downsample is not."""
    return [
        [[b.conv1, b.conv2, b.conv3] for b in stage]
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
    ]


def test_resnet50_block_is_the_worked_example() -> None:
    with torch.device("meta"):
        model = timm.create_model("resnet50")
    before = original(model)
    assert before == 25_557_032
    # Closed form from the widths: stage of n bottlenecks of width w (output 4w). conv1 (4w x w) shares in blocks
    # 2..n (the first reads the previous width); conv2 (w x w x 3x3) in all n in stage 1, 2..n where the first
    # is strided; conv3 (w x 4w) in all n.
    closed = 0
    for i, (w, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        closed += (n - 2) * 4 * w * w + (n - 1 - (i > 0)) * K3 * w * w + (n - 1) * 4 * w * w
    assert saved_by_stages(resnet50_branches(model)) == closed
    p = st.plan(model, scope="block")
    assert p.params_after == before - closed == 14_587_944
    assert round(100 * p.decrease, 1) == 42.9
    # no shortcut conv or norm is a member; the first block of stages 2-4 keeps conv1 and its strided conv2
    members = {m for g in p.groups for m in g.members}
    assert not any("downsample" in m or "bn" in m for m in members)
    assert "layer2.0.conv3" in members and not {"layer2.0.conv1", "layer2.0.conv2"} & members
    kept = {c.path: c.kept_because for c in p.spatial_convs if c.group is None}
    assert kept["layer2.0.conv2"] == "strided"


def test_resnet50_block_policy_cifar_keeps_each_first_block() -> None:
    with torch.device("meta"):
        model = timm.create_model("resnet50")
    saved = saved_by_stages(resnet50_branches(model), keep_first_block=True)
    assert saved == sum((n - 2) * (4 + 9 + 4) * w * w for w, n in ((64, 3), (128, 4), (256, 6), (512, 3)))
    p = st.plan(model, "cifar", scope="block")
    assert p.params_after == original(model) - saved
    assert all(c.group is None for s in p.stages for c in s.spatial_convs if c.position == 0)


def test_convnext_tiny_block_shares_the_depthwise_conv_and_the_mlp() -> None:
    with torch.device("meta"):
        model = timm.create_model("convnext_tiny")
    branches = [[[b.conv_dw, b.mlp.fc1, b.mlp.fc2] for b in stage.blocks] for stage in model.stages]
    assert isinstance(model.stages[0].blocks[0].mlp.fc1, nn.Linear)
    # Closed form: a stage of d blocks of width C; the 7x7 depthwise conv (49C + C bias), fc1 (4C x C + 4C),
    # fc2 (C x 4C + C) of blocks 2..d go. Norms and the layer scale gamma stay each block's own.
    closed = sum(
        (d - 1) * (49 * c + c + 4 * c * c + 4 * c + 4 * c * c + c) for c, d in zip((96, 192, 384, 768), (3, 3, 9, 3))
    )
    assert saved_by_stages(branches) == closed
    p = st.plan(model, scope="block")
    assert p.params_before == original(model) == 28_589_128
    assert p.params_after == p.params_before - closed
    assert all(g.shares_bias for g in p.groups)
    members = {m for g in p.groups for m in g.members}
    assert not any("norm" in m or "gamma" in m or "downsample" in m for m in members)
    linear = [g for g in p.groups if isinstance(g.signature, LinearSignature)]
    assert [len(g.members) for g in linear] == [3, 3, 3, 3, 9, 9, 3, 3]


def test_efficientnet_b0_block_shares_inverted_residuals_with_their_squeeze_excitation() -> None:
    with torch.device("meta"):
        model = timm.create_model("efficientnet_b0")
    # Only blocks with a skip are residual blocks: each stage's first block (it changes width or stride) is not.
    branches = [
        [[b.conv_pw, b.conv_dw, b.se.conv_reduce, b.se.conv_expand, b.conv_pwl] for b in stage if b.has_skip]
        for stage in model.blocks
    ]
    assert [len(b) for b in branches] == [0, 1, 1, 2, 2, 3, 0]
    saved = saved_by_stages([b for b in branches if b])

    # stage widths (out, expanded): (40, 240), (80, 480), (112, 672), (192, 1152); SE squeezes to out/4 of the
    # block input. Members per stage 1, 2, 2, 3 (stage 2's one residual block shares with nobody).
    def block(c: int, k: int) -> int:
        e, s = 6 * c, c // 4
        return c * e + e * k * k + (e * s + s) + (s * e + e) + e * c

    closed = block(80, 3) + block(112, 5) + 2 * block(192, 5)
    assert saved == closed
    p = st.plan(model, scope="block")
    assert p.params_after == original(model) - closed
    assert p.params_before == 5_288_548


def test_block_group_size_and_budget_cut_the_stage_groups_into_runs() -> None:
    with torch.device("meta"):
        model = timm.create_model("resnet50")
    before = original(model)
    for run in (2, 3):
        expected = before - saved_by_stages(resnet50_branches(model), run=run)
        assert st.plan(model, scope="block", group_size=run).params_after == expected
    # budget: the smallest run length whose count fits, found here by the same arithmetic
    fits = next(r for r in range(1, 7) if before - saved_by_stages(resnet50_branches(model), run=r) <= 0.7 * before)
    p = st.plan(model, scope="block", budget=0.7)
    assert p.group_size == fits and p.budget == 0.7
    assert p.params_after == before - saved_by_stages(resnet50_branches(model), run=fits)


@pytest.mark.parametrize("name", ["resnet50", "convnext_atto", "efficientnet_b0"])
def test_block_with_group_size_one_is_the_original(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    p = st.plan(model, scope="block", group_size=1)
    assert p.params_after == p.params_before == original(model) and p.groups == ()


SCOPE_MODELS = ["resnet50", "convnext_atto", "efficientnet_b0", "regnety_002", "mobilenetv3_large_100"]


@pytest.mark.parametrize("name", SCOPE_MODELS)
def test_block_shares_a_superset_of_all_a_superset_of_last(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    plans = {p.scope: p for p in st.sweep(model, templates=(None,)) if p.group_size is None}
    saved = {scope: p.params_before - p.params_after for scope, p in plans.items()}
    assert saved["block"] >= saved["all"] >= saved["last"] > 0
    assert saved["block"] > saved["all"]  # every one of these has 1x1 or linear layers on its branches
    # as sets of layers, not only in count: whatever shares at a scope shares at the wider one
    shared = {scope: {m for g in p.groups for m in g.members} for scope, p in plans.items()}
    assert shared["last"] <= shared["all"] <= shared["block"]


def test_block_equals_all_on_basic_and_wide_blocks() -> None:
    with torch.device("meta"):
        resnet34 = timm.create_model("resnet34")
        wrn = timm.create_model("wrn_28_10")
    for model, policy in ((resnet34, "imagenet"), (wrn, "cifar")):
        block, every = st.plan(model, policy, scope="block"), st.plan(model, policy, scope="all")
        assert block.groups == every.groups and block.params_after == every.params_after


# ------------------------------------------------------------------------------- tying, gradients, files


def small_convnext(depths: tuple[int, ...] = (2, 2, 3, 2)) -> nn.Module:
    """A reduced timm ConvNeXt (channels-last MLP of nn.Linear), built through build_model so it saves."""
    return st.build_model("convnext_tiny", depths=list(depths), dims=[8, 16, 32, 64], num_classes=5)


SIZE = (3, 32, 32)


def test_hard_block_ties_weight_and_bias_and_unties_back() -> None:
    torch.manual_seed(0)
    model = small_convnext()
    x = torch.randn(2, *SIZE)
    reference = copy.deepcopy(model)
    st.apply(model, scope="block", input_size=SIZE)
    plan = st.get_plan(model)
    assert (
        st.count_parameters(model)
        == plan.params_after
        == original(reference)
        - saved_by_stages([[[b.conv_dw, b.mlp.fc1, b.mlp.fc2] for b in stage.blocks] for stage in reference.stages])
    )
    for g in plan.groups:
        layers = [model.get_submodule(m) for m in g.members]
        assert all(m.weight is layers[0].weight and m.bias is layers[0].bias for m in layers)
    assert st.is_tied(model)
    # init "first": the shared model is the original whose members all took their stage's first layer
    first = copy.deepcopy(reference)
    with torch.no_grad():
        for g in plan.groups:
            head = first.get_submodule(g.members[0])
            for m in g.members[1:]:
                first.get_submodule(m).weight.copy_(head.weight)
                first.get_submodule(m).bias.copy_(head.bias)
    torch.testing.assert_close(model.eval()(x), first.eval()(x))
    # state_dict lists a shared bias once, as a shared weight
    keys = set(model.state_dict())
    assert f"{plan.groups[0].members[0]}.bias" in keys and f"{plan.groups[0].members[1]}.bias" not in keys
    # a tied bias counts: untie one and the model is no longer tied
    member = model.get_submodule(plan.groups[0].members[1])
    member.bias = nn.Parameter(member.bias.detach().clone())
    assert not st.is_tied(model)
    st.retie(model)
    assert st.is_tied(model)
    st.untie(model)
    assert st.count_parameters(model) == original(reference)
    assert st.get_plan(model) is None


def test_init_mean_averages_weights_and_biases() -> None:
    torch.manual_seed(0)
    model = small_convnext()
    fc1 = [model.stages[2].blocks[i].mlp.fc1 for i in range(3)]
    weight = torch.stack([m.weight.detach() for m in fc1]).mean(0)
    bias = torch.stack([torch.randn_like(m.bias) for m in fc1])
    with torch.no_grad():
        for m, b in zip(fc1, bias):
            m.bias.copy_(b)
    st.apply(model, scope="block", input_size=SIZE, init="mean")
    torch.testing.assert_close(fc1[0].weight, weight)
    torch.testing.assert_close(fc1[0].bias, bias.mean(0))


def test_warm_starts_at_block_reach_linear_layers() -> None:
    torch.manual_seed(0)
    reference = small_convnext(depths=(2, 2, 2, 2)).eval()  # every group: two members
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        expected = reference(x)
    # svd with as many templates as members reconstructs every member exactly, linear layers included
    soft = st.apply(copy.deepcopy(reference), scope="block", templates=2, init="svd", input_size=SIZE)
    assert any(isinstance(soft.get_submodule(m), nn.Linear) for g in st.get_plan(soft).groups for m in g.members)
    assert st.get_reconstruction(soft).total < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(soft(x), expected, rtol=1e-4, atol=1e-5)
    # mean-scaled folds scales into a BatchNorm, which ConvNeXt's layers do not feed: refused, nothing changed
    model = copy.deepcopy(reference)
    with pytest.raises(st.WarmStartError, match="mean-scaled"):
        st.apply(model, scope="block", init="mean-scaled", input_size=SIZE)
    assert st.get_plan(model) is None and not tensor_aliases(model)


def test_exclude_keeps_layers_of_the_block_scope_their_own() -> None:
    with torch.device("meta"):
        model = timm.create_model("resnet50")
    p = st.plan(model, scope="block", exclude=["layer4"])
    branches = resnet50_branches(model)
    assert p.params_after == original(model) - saved_by_stages(branches[:3])
    assert {c.path for c in p.spatial_convs if c.kept_because == "excluded"} == {
        f"layer4.{b}.conv{i}" for b in range(3) for i in (1, 2, 3)
    }


def test_each_shared_linear_gets_the_sum_of_its_members_gradients() -> None:
    torch.manual_seed(0)
    shared = st.apply(small_convnext().double(), scope="block", input_size=SIZE)
    untied = st.untie(copy.deepcopy(shared))
    assert tensor_aliases(shared) and not tensor_aliases(untied)
    x = torch.randn(4, *SIZE, dtype=torch.float64)
    for model in (shared, untied):
        model.train()
        model(x).square().mean().backward()
    linear = [g for g in st.get_plan(shared).groups if isinstance(g.signature, LinearSignature)]
    assert linear
    for g in st.get_plan(shared).groups:
        layer = shared.get_submodule(g.members[0])
        for attr in ("weight", "bias"):
            expected = sum(getattr(untied.get_submodule(m), attr).grad for m in g.members)
            torch.testing.assert_close(getattr(layer, attr).grad, expected, rtol=1e-10, atol=1e-12)


def test_soft_block_on_convnext_mixes_templates_saves_loads_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_convnext()
    reference = copy.deepcopy(model)
    st.apply(model, scope="block", templates=2, input_size=SIZE)
    plan = st.get_plan(model)
    assert plan.templates == 2 and not any(g.shares_bias for g in plan.groups)
    members = [m for g in plan.groups for m in g.members]
    assert all(is_soft(model.get_submodule(m)) for m in members)
    assert any(isinstance(model.get_submodule(m), nn.Linear) for m in members)
    # The soft model is the plain one whose member weights are the explicit mixes; biases stay each member's.
    with torch.no_grad():
        for m in members:
            layer = model.get_submodule(m)
            bank, coefficients = bank_of(layer), coefficients_of(layer)
            mix = sum(c * t for c, t in zip(coefficients, bank.templates))
            reference.get_submodule(m).weight.copy_(mix)
            assert layer.bias is not reference.get_submodule(m).bias
            assert torch.equal(layer.bias, reference.get_submodule(m).bias)
    x = torch.randn(2, *SIZE)
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    # Unique parameters: per group the bank (2 templates) and 2 coefficients per member, biases untouched.
    expected = original(reference) - sum(len(g.members) * g.numel - 2 * (g.numel + len(g.members)) for g in plan.groups)
    assert st.count_parameters(model) == plan.params_after == expected

    path = st.save(model, tmp_path / "soft.safetensors")
    loaded = st.load(path)
    assert st.get_plan(loaded) == plan and st.is_tied(loaded)
    state, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(state)
    assert all(torch.equal(state[k], got[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))

    result = export_onnx(model, tmp_path / "soft.onnx", input_size=SIZE)
    assert result.baked_convs == len(members)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    other = torch.randn(3, *SIZE)
    with torch.no_grad():
        expected_out = model(other).numpy()
    got_out = session.run(None, {"input": other.numpy()})[0]
    assert abs(got_out - expected_out).max() < 1e-4
    assert all(is_soft(model.get_submodule(m)) for m in members)  # the export baked a copy


def test_hard_block_exports_to_onnx_and_compiles(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = st.apply(small_convnext(), scope="block", input_size=SIZE).eval()
    result = export_onnx(model, tmp_path / "hard.onnx", input_size=SIZE)
    assert result.conv_weight_initializers == distinct_conv_weights(model) == result.distinct_conv_weights
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert st.is_tied(model)


def test_hard_block_file_round_trip_keeps_biases_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = st.apply(small_convnext(), scope="block", input_size=SIZE)
    path = st.save(model, tmp_path / "hard.safetensors")
    info = st.read_info(path)
    plan = st.get_plan(model)
    assert info.plan == plan and all(g.shares_bias for g in info.plan.groups)
    assert info.stored_numel == st.count_parameters(model) + sum(b.numel() for b in model.buffers())
    loaded = st.load(path)
    assert st.is_tied(loaded) and st.count_parameters(loaded) == st.count_parameters(model)
    g = plan.groups[0]
    assert loaded.get_submodule(g.members[1]).bias is loaded.get_submodule(g.members[0]).bias


def test_plan_json_of_the_old_scopes_is_unchanged_and_block_plans_round_trip() -> None:
    with torch.device("meta"):
        model = timm.create_model("convnext_tiny")
    # a plan of the paper's scope writes the keys it wrote before scope "block": old readers read new files
    last = st.plan(model).to_dict()
    assert set(last["groups"][0]) == {"stage", "resolution", "signature", "members", "numel", "templates"}
    assert "kind" not in last["groups"][0]["signature"]
    assert st.SharePlan.from_dict(json.loads(json.dumps(last))) == st.plan(model)
    # and a file of that layout (no kind, no shares_bias) reads as convs that tie their weight only
    group = st.SharePlan.from_dict(last).groups[0]
    assert isinstance(group.signature, st.ConvSignature) and not group.shares_bias
    block = st.plan(model, scope="block")
    data = json.loads(json.dumps(block.to_dict()))
    assert data["groups"][1]["signature"]["kind"] == "linear" and data["groups"][1]["shares_bias"] is True
    assert st.SharePlan.from_dict(data) == block


def test_a_tampered_block_file_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = st.save(st.apply(small_convnext(), scope="block", input_size=SIZE), tmp_path / "block.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    plan, aliases = json.loads(metadata["sharetx.plan"]), json.loads(metadata["sharetx.aliases"])
    # a group that claims to keep its members' biases while the file ties them
    untied = json.loads(json.dumps(plan))
    untied["groups"][1]["shares_bias"] = False
    bad = tmp_path / "untied.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, "sharetx.plan": json.dumps(untied)})
    with pytest.raises(st.FileFormatError, match="shares_bias must be true exactly"):
        st.load(bad)
    # a shared bias stored twice instead of once with an alias
    alias = next(a for a in aliases if a.endswith("mlp.fc1.bias"))
    twice = {k: v for k, v in aliases.items() if k != alias}
    bad = tmp_path / "twice.safetensors"
    save_file(
        {**tensors, alias: tensors[aliases[alias]].clone()},
        str(bad),
        metadata={**metadata, "sharetx.aliases": json.dumps(twice)},
    )
    with pytest.raises(st.FileFormatError, match="shared bias must be stored once"):
        st.load(bad)


# ---------------------------------------------------------------------------------------- timm's API


def test_features_only_and_forward_intermediates_on_block_shared_convnext_and_resnet50() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    small = {
        "convnext_tiny": {"depths": (2, 2, 3, 2), "dims": (8, 16, 32, 64)},
        "resnet50": {"layers": [2, 3, 2, 2], "channels": (8, 16, 32, 64)},
    }
    for name, kwargs in small.items():
        features = timm.create_model(name, features_only=True, out_indices=(1, 2, 3), **kwargs)
        plain = copy.deepcopy(features)
        st.apply(features, scope="block", input_size=(3, 64, 64))
        plan = st.get_plan(features)
        assert plan.groups and st.is_tied(features)
        maps = features(x)
        assert [f.shape for f in maps] == [f.shape for f in plain(x)]
        names = list(features.state_dict())
        assert f"{plan.groups[0].members[0]}.weight" in names and f"{plan.groups[0].members[1]}.weight" not in names

        model = timm.create_model(name, **kwargs).eval()
        st.apply(model, scope="block", input_size=(3, 64, 64))
        final, intermediates = model.forward_intermediates(x)
        assert len(intermediates) == (4 if name.startswith("convnext") else 5)
        torch.testing.assert_close(final, model.forward_features(x))


# ------------------------------------------------------------------------------------------ bad input


class NormOnlyBranches(nn.Module):
    """Residual blocks whose branches hold a norm and an activation: nothing a scope can share."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norms = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for norm in self.norms:
            x = x + torch.relu(norm(x))
        return x


def test_branches_with_nothing_shareable_name_the_model() -> None:
    model = NormOnlyBranches()
    with pytest.raises(
        st.NoSpatialConvError, match=r"^NormOnlyBranches: found no residual block with a conv or linear"
    ):
        st.plan(model, scope="block", input_size=(3, 8, 8))
    with pytest.raises(st.NoSpatialConvError, match=r"^NormOnlyBranches: found no residual block with a spatial conv"):
        st.plan(model, scope="last", input_size=(3, 8, 8))


def test_cli_scope_block_on_a_model_without_residual_branches_is_one_line() -> None:
    result = CliRunner().invoke(cli, ["plan", "--model", "mobilenetv1_100", "--scope", "block"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("sharetx: error: mobilenetv1_100: found no residual block with a conv or linear layer")
    assert result.stdout == ""


def test_cli_plan_and_sweep_take_scope_block() -> None:
    result = CliRunner().invoke(cli, ["plan", "--model", "resnet50", "--scope", "block", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["options"]["scope"] == "block" and data["total"]["params_after"] == 14_587_944
    result = CliRunner().invoke(cli, ["sweep", "--model", "resnet50", "--scope", "block", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["scope"] for r in rows} == {"block"}
    assert min(r["unique_params"] for r in rows if r["templates"] is None) == 14_587_944
