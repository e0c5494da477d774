"""The sharing dial: group size, scope, soft template banks and a parameter budget.

Every expected parameter count is derived here from widths x kernels x members, never copied from the
code's output; the soft-sharing reference figures (Savarese & Maire's SWRN-28-10) are checked against both.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import share_transform as st
from share_transform.export import export_onnx
from share_transform.soft import bank_of, coefficients_of, is_soft

K3 = 3 * 3  # a 3x3 kernel


def wrn_params(depth: int, k: int, classes: int) -> tuple[int, tuple[int, ...], int]:
    """(parameters, stage widths, blocks per stage) of WRN-depth-k, by arithmetic (no conv bias)."""
    n = (depth - 4) // 6
    widths = (16 * k, 32 * k, 64 * k)
    total = 3 * 16 * K3  # stem
    in_c = 16
    for w in widths:
        # first block: BN(in), 3x3 in->w, BN(w), 3x3 w->w, a 1x1 shortcut in->w where the width changes
        total += 2 * in_c + in_c * w * K3 + 2 * w + w * w * K3 + (in_c * w if in_c != w else 0)
        # the other n - 1 blocks: BN, 3x3, BN, 3x3 at width w
        total += (n - 1) * (2 * w + w * w * K3 + 2 * w + w * w * K3)
        in_c = w
    total += 2 * widths[-1] + widths[-1] * classes + classes  # final BN, classifier
    return total, widths, n


def swrn_params(depth: int, k: int, classes: int, templates: int | None) -> int:
    """The soft-sharing WRN: both 3x3s of blocks 2..n of a stage share (hard: one weight; soft: a bank)."""
    total, widths, n = wrn_params(depth, k, classes)
    members = 2 * (n - 1)
    for w in widths:
        total -= members * w * w * K3
        total += w * w * K3 if templates is None else templates * w * w * K3 + templates * members
    return total


@pytest.fixture(scope="module")
def wrn_28_10() -> nn.Module:
    with torch.device("meta"):  # counting only: nothing is allocated
        return timm.create_model("wrn_28_10", num_classes=10)


@pytest.mark.parametrize(
    ("templates", "reference"), [(1, 12_287_212), (2, 17_125_630), (4, 26_802_466), (6, 36_479_302)]
)
def test_swrn_28_10_matches_the_soft_sharing_reference(wrn_28_10: nn.Module, templates: int, reference: int) -> None:
    assert wrn_params(28, 10, 10)[0] == 36_479_194  # WRN-28-10, 10 classes
    expected = swrn_params(28, 10, 10, templates)
    assert expected == reference
    p = st.plan(wrn_28_10, "swrn", templates=templates)
    assert (p.params_before, p.params_after) == (wrn_params(28, 10, 10)[0], expected)
    assert [len(g.members) for g in p.groups] == [6, 6, 6]
    assert all(g.templates == templates for g in p.groups)


def test_hard_scope_all_is_the_k1_architecture_without_coefficients(wrn_28_10: nn.Module) -> None:
    p = st.plan(wrn_28_10, "cifar", scope="all")
    assert p.params_after == swrn_params(28, 10, 10, None) == 12_287_194
    assert p.templates is None


def test_group_size_one_is_the_original_and_defaults_are_table1() -> None:
    model = timm.create_model("resnet34")
    original = sum(p.numel() for p in model.parameters())
    assert st.plan(model, group_size=1).params_after == original
    assert st.plan(model, group_size=1).groups == ()
    # The defaults are the paper's: Table 1's ResNet-34 row.
    assert (st.plan(model).params_before, st.plan(model).params_after) == (21_797_672, 13_613_864)


# ResNet-34: basic blocks of widths 64/128/256/512, 3/4/6/3 blocks. With scope "last" every block's second
# 3x3 (w->w, stride 1) is sharable; with "all" also the first 3x3 of every block but each stage's first
# (strided, or in stage 1 the same 64->64 shape) ...
R34 = ((64, 3), (128, 4), (256, 6), (512, 3))


def test_group_size_cuts_each_stage_into_runs() -> None:
    model = timm.create_model("resnet34")
    original = sum(p.numel() for p in model.parameters())
    p = st.plan(model, group_size=2)
    # runs of 2 over n sharable convs: n // 2 runs of two, each saving one w x w x 3 x 3 weight
    saved = sum((n // 2) * w * w * K3 for w, n in R34)
    assert p.params_after == original - saved
    assert [len(g.members) for g in p.groups] == [2, 2, 2, 2, 2, 2, 2]
    assert p.group_size == 2
    # a run of one keeps its own weight and says why
    alone = [c for c in p.spatial_convs if c.kept_because == "alone in its run of group_size"]
    assert [c.path for c in alone] == ["layer1.2.conv2", "layer4.2.conv2"]
    # group_size 3 on stage 3 (6 sharable): two runs of three
    p3 = st.plan(model, group_size=3)
    assert p3.params_after == original - sum((n // 3) * 2 * w * w * K3 + max(n % 3 - 1, 0) * w * w * K3 for w, n in R34)


def test_scope_all_shares_both_3x3s_of_a_basic_block() -> None:
    model = timm.create_model("resnet34")
    original = sum(p.numel() for p in model.parameters())
    p = st.plan(model, scope="all")
    # Stage 1: 2 convs x 3 blocks, all 64->64 stride 1. Stages 2-4: the first block's first 3x3 is strided.
    members = [2 * n if i == 0 else 2 * n - 1 for i, (_, n) in enumerate(R34)]
    assert [len(g.members) for g in p.groups] == members
    assert p.params_after == original - sum((m - 1) * w * w * K3 for (w, _), m in zip(R34, members))
    assert p.groups[1].members[:3] == ("layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2")
    strided = [c for c in p.spatial_convs if c.kept_because == "strided"]
    assert [c.path for c in strided] == ["layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"]


def test_bottleneck_scope_all_equals_last() -> None:
    # A bottleneck has one spatial conv: both scopes give the same plan counts.
    model = timm.create_model("resnet50")
    assert st.plan(model, scope="all").params_after == st.plan(model).params_after == 20_469_800


@pytest.mark.parametrize("budget", [0.9, 0.75, 0.7])
def test_budget_picks_the_least_sharing_that_fits(budget: float) -> None:
    model = timm.create_model("resnet101")
    p = st.plan(model, budget=budget)
    assert p.budget == budget and isinstance(p.group_size, int)
    assert p.params_after <= budget * p.params_before
    smaller = st.plan(model, group_size=p.group_size - 1)
    assert smaller.params_after > budget * p.params_before  # minimal: one less does not reach it
    assert st.plan(model, group_size=p.group_size).params_after == p.params_after
    again = st.SharePlan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p and again.group_size == p.group_size


def test_unreachable_budget_names_the_smallest_fraction() -> None:
    model = timm.create_model("resnet101")
    least = st.plan(model)  # the whole stage is the most sharing
    fraction = least.params_after / least.params_before
    with pytest.raises(st.ShareOptionError, match=f"{fraction:.4f}"):
        st.plan(model, budget=0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_size": 0}, "group_size must be an integer >= 1"),
        ({"templates": 0}, "templates must be an integer >= 1"),
        ({"scope": "every"}, "unknown scope 'every'"),
        ({"budget": 0.0}, r"budget is a fraction .* in \(0, 1\]"),
        ({"budget": 1.5}, r"budget is a fraction .* in \(0, 1\]"),
        ({"budget": 0.8, "group_size": 2}, "budget or group_size, not both"),
        ({"policy": "swrn"}, "policy 'swrn' is soft sharing; give templates"),
    ],
)
def test_bad_options_raise_one_clear_error(kwargs: dict, match: str) -> None:
    model = st.wide_resnet(10, 1)
    policy = kwargs.pop("policy", "cifar")
    with pytest.raises(st.ShareOptionError, match=match):
        st.plan(model, policy, **kwargs)
    with pytest.raises(st.ShareOptionError, match=match):
        st.apply(model, policy, **kwargs)


# ---------------------------------------------------------------------------------------- soft sharing


def soft_wrn(templates: int = 2) -> nn.Module:
    """WRN-22-1 (3 blocks a stage): 4 soft members per stage."""
    torch.manual_seed(0)
    model = st.build_model("wrn_22_1")
    for m in model.modules():  # BN at random affine values, so no gradient is trivially zero
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return st.apply(model, "swrn", templates=templates)


def members(model: nn.Module) -> list[list[nn.Conv2d]]:
    modules = dict(model.named_modules())
    return [[modules[p] for p in g.members] for g in st.get_plan(model).groups]


def test_soft_members_mix_one_bank_and_init_as_reference() -> None:
    model = soft_wrn(3)
    total, widths, n = wrn_params(22, 1, 10)
    assert st.count_parameters(model) == swrn_params(22, 1, 10, 3)
    for group, w in zip(members(model), widths):
        bank = bank_of(group[0])
        assert all(bank_of(c) is bank for c in group) and bank.templates.shape == (3, w, w, 3, 3)
        assert all(isinstance(c, nn.Conv2d) and is_soft(c) for c in group)
        coefficients = torch.stack([coefficients_of(c) for c in group])  # (members x k), orthogonal columns
        assert coefficients.shape == (2 * (n - 1), 3)
        torch.testing.assert_close(coefficients.T @ coefficients, torch.eye(3), atol=1e-5, rtol=0)
    assert st.is_tied(model)


def test_soft_forward_equals_conv2d_with_the_combined_weight() -> None:
    model = soft_wrn()
    conv = members(model)[1][2]
    x = torch.randn(2, conv.in_channels, 16, 16)
    c, t = coefficients_of(conv), bank_of(conv).templates
    combined = c[0] * t[0] + c[1] * t[1]
    torch.testing.assert_close(conv(x), F.conv2d(x, combined, padding=1), rtol=1e-5, atol=1e-5)


def test_template_gradient_is_coefficient_weighted_sum_of_member_gradients() -> None:
    model = soft_wrn()
    plain = st.untie(copy.deepcopy(model))  # each member a plain conv holding its effective weight
    x = torch.randn(4, 3, 32, 32)
    model(x).logsumexp(1).sum().backward()
    plain(x).logsumexp(1).sum().backward()
    modules = dict(plain.named_modules())
    for group, paths in zip(members(model), (g.members for g in st.get_plan(model).groups)):
        member_grads = torch.stack([modules[p].weight.grad for p in paths])  # dL/dW_m
        coefficients = torch.stack([coefficients_of(c).detach() for c in group])  # (m, k)
        templates = bank_of(group[0]).templates
        expected = torch.einsum("mk,moihw->koihw", coefficients, member_grads)
        torch.testing.assert_close(templates.grad, expected, rtol=1e-4, atol=1e-6)
        # each coefficient receives <dL/dW_m, T_i>, and none is zero
        for conv, grad in zip(group, member_grads):
            got = coefficients_of(conv).grad
            torch.testing.assert_close(got, (templates.detach() * grad).sum(dim=(1, 2, 3, 4)), rtol=1e-4, atol=1e-6)
            assert bool((got != 0).all())


def test_soft_compile_matches_eager() -> None:
    model = soft_wrn().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_untie_bakes_effective_weights_into_plain_convs() -> None:
    model = soft_wrn()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(x)
    effective = {
        p: dict(model.named_modules())[p].weight.detach().clone() for g in st.get_plan(model).groups for p in g.members
    }
    st.untie(model)
    modules = dict(model.named_modules())
    assert not any(is_soft(m) for m in model.modules())
    assert all(type(modules[p]) is nn.Conv2d and torch.equal(modules[p].weight, w) for p, w in effective.items())
    assert st.count_parameters(model) == wrn_params(22, 1, 10)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_soft_apply_is_idempotent_and_refuses_hard_over_soft() -> None:
    model = soft_wrn()
    banks = [bank_of(g[0]) for g in members(model)]
    st.apply(model, plan=st.get_plan(model))
    assert [bank_of(g[0]) for g in members(model)] == banks
    with pytest.raises(st.PlanMismatchError, match="untie"):
        st.apply(model, "cifar", scope="all")


def test_soft_file_round_trips_bit_exactly_storing_each_tensor_once(tmp_path: Path) -> None:
    model = soft_wrn()
    path = st.save(model, tmp_path / "soft.safetensors")
    info = st.read_info(path)
    assert info.plan.templates == 2 and info.plan.scope == "all" and info.plan.policy == "swrn"
    banks = [n for n in info.tensors if n.endswith(".bank.templates")]
    assert len(banks) == 3  # one bank per stage, stored once
    coefficients = [n for n in info.tensors if n.endswith("parametrizations.weight.original")]
    assert len(coefficients) == 12  # 4 members x 3 stages
    assert info.stored_numel == st.count_parameters(model) + sum(b.numel() for b in model.buffers())
    loaded = st.load(path)
    assert st.get_plan(loaded) == st.get_plan(model) and st.is_tied(loaded)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded.eval(), model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_soft_onnx_export_bakes_member_weights(tmp_path: Path) -> None:
    model = soft_wrn().eval()
    result = export_onnx(model, tmp_path / "soft.onnx")
    assert is_soft(members(model)[0][0])  # the caller's model keeps its templates
    graph = onnx.load(str(tmp_path / "soft.onnx")).graph
    weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    # every conv of WRN-22-1 reads its own initializer: the stem, 3 stages x 3 blocks x 2, 2 shortcuts
    # (stage 1 keeps 16 channels: no shortcut conv)
    assert len(weights) == len(set(weights)) == 1 + 3 * 3 * 2 + 2
    assert result.baked_convs == 12
    x = torch.randn(3, 3, 32, 32)
    got = ort.InferenceSession(str(tmp_path / "soft.onnx")).run(["output"], {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


def test_state_dict_lists_each_bank_once_and_load_fills_the_members() -> None:
    model = soft_wrn()
    state = model.state_dict()
    banks = [k for k in state if k.endswith(".bank.templates")]
    assert banks == [f"stages.{s}.1.conv1.parametrizations.weight.0.bank.templates" for s in range(3)]
    assert sum(k.endswith("parametrizations.weight.original") for k in state) == 12  # coefficients: one each
    torch.manual_seed(1)
    other = st.apply(st.build_model("wrn_22_1"), "swrn", templates=2)
    other.load_state_dict(state)
    assert st.is_tied(other)
    for a, b in zip(members(model), members(other)):
        assert torch.equal(bank_of(b[0]).templates, bank_of(a[0]).templates)
        assert all(bank_of(c) is bank_of(b[0]) for c in b)  # every member mixes the loaded bank
        assert all(torch.equal(coefficients_of(x), coefficients_of(y)) for x, y in zip(a, b))


def test_the_plan_table_signs_a_growth_in_parameters() -> None:
    # Four templates per group on ResNet-50 hold more than the convs they replace: the total goes up.
    model = timm.create_model("resnet50", pretrained=False)
    p = st.plan(model, templates=4)
    assert p.params_after > p.params_before
    growth = 100 * (p.params_after - p.params_before) / p.params_before
    assert str(p).splitlines()[-2] == f"parameters: {p.params_before:,} -> {p.params_after:,} (+{growth:.1f}%)"


# ------------------------------------------------------------------------------------------------- exclude

# ResNet-50: bottlenecks whose 3x3 (conv2) is w -> w; widths 64/128/256/512, 3/4/6/3 blocks. Under the paper's
# policy a stage shares every stride-1 3x3: stage 1 all of its 3 (no stride), stages 2-4 all but the first.
R50 = ((64, 3), (128, 4), (256, 6), (512, 3))


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    with torch.device("meta"):
        return timm.create_model("resnet50")


def test_excluded_layers_keep_their_weights_resnet50(resnet50: nn.Module) -> None:
    original = sum(p.numel() for p in resnet50.parameters())
    sharable = [n if stage == 0 else n - 1 for stage, (_, n) in enumerate(R50)]
    # layer4.* takes stage 4 out; layer3.2 (a block) takes one member from stage 3.
    excluded = ["layer3.2.conv2", "layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2"]
    members = [sharable[0], sharable[1], sharable[2] - 1, 0]
    saved = sum((m - 1) * w * w * K3 for (w, _), m in zip(R50, members) if m > 1)

    p = st.plan(resnet50, exclude=["layer4.*", "layer3.2"])
    assert p.params_before == original
    assert p.params_after == original - saved
    assert [len(g.members) for g in p.groups] == [m for m in members if m > 1]
    assert p.options.exclude == ("layer4.*", "layer3.2")
    assert [c.path for c in p.spatial_convs if c.kept_because == "excluded"] == excluded
    assert not {m for g in p.groups for m in g.members} & set(excluded)
    assert str(p).splitlines()[-1] == f"excluded (keep their own weights): {', '.join(excluded)}"
    assert "exclude layer4.* layer3.2" in str(p).splitlines()[0]

    # Tied: each excluded conv holds a weight no other conv holds; the count is the arithmetic's.
    model = copy.deepcopy(resnet50)
    st.apply(model, plan=p)
    modules = dict(model.named_modules())
    weights = [id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(weights.count(id(modules[path].weight)) == 1 for path in excluded)
    assert st.count_parameters(model) == original - saved
    # A pattern may name a block, a stage or a conv: these three say the same.
    same = st.plan(resnet50, exclude=["layer4", "layer3.2.conv2"])
    assert same.groups == p.groups and same.params_after == p.params_after


def test_an_exclude_pattern_that_matches_nothing_is_an_error() -> None:
    model = st.wide_resnet(16, 1)
    with pytest.raises(st.ShareOptionError, match=r"^wrn_16_1: exclude pattern 'stage2\.\*' matches no module"):
        st.plan(model, "cifar", exclude=["stages.1.*", "stage2.*"])
    with pytest.raises(st.ShareOptionError, match=r"not one string: exclude=\['stages.1'\]"):
        st.plan(model, "cifar", exclude="stages.1")  # type: ignore[arg-type]
    with pytest.raises(st.ShareOptionError, match="exclude takes a list"):
        st.SharingOptions(exclude=("stages.1", "")).check("wrn_16_1", st.POLICIES["cifar"])


def test_exclude_is_recorded_in_the_plan_and_the_file(tmp_path: Path) -> None:
    model = st.build_model("wrn_22_1", num_classes=10)
    p = st.plan(model, "cifar", exclude=["stages.2.*"])
    assert [len(g.members) for g in p.groups] == [2, 2]  # stage 3's blocks 2 and 3 keep their own weights
    data = json.loads(json.dumps(p.to_dict()))
    assert data["exclude"] == ["stages.2.*"]
    assert st.SharePlan.from_dict(data) == p
    # A plan written before exclude existed loads as excluding nothing.
    del data["exclude"]
    assert st.SharePlan.from_dict(data).options.exclude == ()

    st.apply(model, plan=p)
    path = st.save(model, tmp_path / "wrn.safetensors")
    assert st.read_info(path).plan == p
    loaded = st.load(path)
    assert st.get_plan(loaded) == p and st.count_parameters(loaded) == st.count_parameters(model)
    assert loaded.stages[2][1].conv2.weight is not loaded.stages[2][2].conv2.weight


def test_a_shared_model_keeps_its_exclusions() -> None:
    model = st.apply(st.build_model("wrn_22_1", num_classes=10), "cifar", exclude=["stages.2"])
    recorded = st.get_plan(model)
    assert st.apply(model, "cifar", exclude=["stages.2"]) is model and st.get_plan(model) is recorded
    refused = r"shared already \(policy cifar, exclude stages.2\); re-planning it \(policy cifar\) is refused"
    with pytest.raises(st.PlanMismatchError, match=refused):
        st.apply(model, "cifar")
    assert st.get_plan(model) is recorded


def test_sweep_keeps_the_exclusion_in_every_plan() -> None:
    model = st.build_model("wrn_22_1", num_classes=10)
    plans = st.sweep(model, "cifar", exclude=["stages.0"])
    assert plans and all(q.options.exclude == ("stages.0",) for q in plans)
    assert all(g.stage != 1 for q in plans for g in q.groups)
    stage = next(q for q in plans if q.scope == "last" and q.group_size is None and q.templates is None)
    assert stage == st.plan(model, "cifar", exclude=["stages.0"])


# ----------------------------------------------------------------------------------------- register_policy


@pytest.fixture
def every_block():
    """A registered policy, removed after the test."""
    policy = st.register_policy(
        "every-block", keep_first_block=False, scope="all", description="every stride-1 3x3 of the branch shares"
    )
    yield policy
    del st.POLICIES["every-block"]


def test_a_registered_policy_plans_as_its_settings_say(every_block: st.Policy) -> None:
    assert st.POLICIES["every-block"] is every_block and every_block.scope == "all"
    model = timm.create_model("resnet34")
    p = st.plan(model, "every-block")
    assert p.policy == "every-block" and p.scope == "all"
    assert p.groups == st.plan(model, "imagenet", scope="all").groups
    # The policy's scope is a default: the caller's wins.
    assert st.plan(model, "every-block", scope="last").groups == st.plan(model).groups


def test_register_policy_refuses_a_taken_or_malformed_name(every_block: st.Policy) -> None:
    before = dict(st.POLICIES)
    with pytest.raises(st.RegistrationError, match="policy 'every-block' exists; pass replace=True"):
        st.register_policy("every-block", keep_first_block=True, description="again")
    with pytest.raises(st.RegistrationError, match="policy 'cifar' exists"):
        st.register_policy("cifar", keep_first_block=False, description="not the authors'")
    with pytest.raises(st.RegistrationError, match="one word"):
        st.register_policy("two words", keep_first_block=False, description="")
    with pytest.raises(st.RegistrationError, match="unknown scope 'first'"):
        st.register_policy("firsts", keep_first_block=False, description="", scope="first")
    assert st.POLICIES == before  # nothing refused was registered
    again = st.register_policy("every-block", keep_first_block=True, description="again", replace=True)
    assert st.POLICIES["every-block"] is again and again.keep_first_block


def test_the_recipes_take_exclude_and_record_it_in_run_json() -> None:
    import argparse

    from share_transform.train import ConfigError
    from share_transform.train.args import add_training_args, resolve_args
    from share_transform.train.trainer import TrainConfig, build_recipe_model, run_info

    parser = add_training_args(
        argparse.ArgumentParser(),
        arch="wrn_22_1",
        epochs=1,
        batch_size=8,
        lr=0.1,
        lr_reference_batch=128,
        weight_decay=5e-4,
        milestones=(1,),
        gamma=0.2,
        policy="cifar",
        init="fan_in",
        model_kwargs_example="{}",
    )
    flags = ["--exclude", "stages.2.*", "--exclude", "stages.1.2", "--device", "cpu"]
    args = resolve_args(parser.parse_args(flags), recipe="cifar")
    model, unshared, unique = build_recipe_model(args, 10)
    # Policy cifar on WRN-22-1 (3 blocks a stage): blocks 2 and 3 of a stage share their second 3x3. Stage 2 loses
    # block 3 to the exclusion (one member left: no group), stage 3 all of it: only stage 1's pair shares.
    total, widths, _ = wrn_params(22, 1, 10)
    assert (unshared, unique) == (total, total - widths[0] * widths[0] * K3)
    assert st.get_plan(model).options.exclude == ("stages.2.*", "stages.1.2")  # type: ignore[union-attr]
    record = run_info(
        args, recipe="cifar", dataset="cifar10", config=TrainConfig.from_args(args), params_unshared=unshared,
        unique_params=unique,
    )  # fmt: skip
    assert record["sharing"]["exclude"] == ["stages.2.*", "stages.1.2"]
    assert json.loads(json.dumps(record, default=str))["args"]["exclude"] == ["stages.2.*", "stages.1.2"]
    with pytest.raises(ConfigError, match="--exclude is a sharing option; it needs --share"):
        resolve_args(parser.parse_args([*flags, "--no-share"]), recipe="cifar")
