"""The re-apply rule: a shared model keeps its plan until it is untied.

Applying the plan a model records again changes nothing; any other plan is refused in one line, before anything
changes, through every route that reaches ``apply``: the API, ``sharesnet*`` names, ``sharetx convert`` and the
training recipes. ``untie`` is the way out, and names a network shared by construction for what it becomes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

import share_transform as st
from share_transform.cli import main as sharetx_main
from share_transform.files import load, read_info, save
from share_transform.modelinfo import model_name
from share_transform.soft import is_soft
from share_transform.tie import alias_groups, install_tie_hooks

SIZE = (3, 32, 32)
SMALL_ARCH = {"layers": [2, 2, 2, 2], "channels": [8, 16, 32, 64]}  # resnet18 at reduced width
SMALL = {**SMALL_ARCH, "num_classes": 5}
ROOT = Path(__file__).resolve().parents[1]


def small_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", **SMALL)


def snapshot(model: nn.Module) -> tuple[object, ...]:
    """What a refused apply must leave as it was: the plan, the ties, the Parameter objects, the soft convs."""
    return (
        st.get_plan(model),
        alias_groups(model),
        [id(p) for p in model.parameters()],
        [n for n, m in model.named_modules() if is_soft(m)],
    )


def refusal(name: str, recorded: str, requested: str, way_out: str = "call share_transform.untie(model) first") -> str:
    """The rule's one line (docs/api.md), as a regular expression matching all of the message."""
    return (
        f"^{re.escape(f'{name} is shared already ({recorded}); re-planning it ({requested}) is refused: {way_out}')}$"
    )


@pytest.mark.parametrize(
    ("kwargs", "requested"),
    [
        ({"group_size": 1}, "policy imagenet, group size 1"),
        ({"templates": 2}, "policy imagenet, 2 templates"),  # today: a bare lstsq RuntimeError, half-parametrized
        ({"scope": "all"}, "policy imagenet, scope all"),
        ({"policy": "cifar"}, "policy cifar"),
    ],
)
def test_applying_other_options_to_a_shared_model_is_refused_and_changes_nothing(kwargs, requested) -> None:
    model = st.apply(small_resnet(), input_size=SIZE)
    before = snapshot(model)
    with pytest.raises(st.PlanMismatchError, match=refusal("resnet18", "policy imagenet", requested)):
        st.apply(model, input_size=SIZE, **kwargs)
    assert snapshot(model) == before and st.is_tied(model)
    assert model(torch.randn(2, *SIZE)).shape == (2, 5)


def test_a_plan_made_elsewhere_is_refused_on_a_shared_model() -> None:
    model = st.apply(small_resnet(), input_size=SIZE)
    other = st.plan(small_resnet(), input_size=SIZE, templates=2)
    before = snapshot(model)
    with pytest.raises(st.PlanMismatchError, match="re-planning it \\(policy imagenet, 2 templates\\) is refused"):
        st.apply(model, plan=other)
    assert snapshot(model) == before


def test_a_soft_model_refuses_hard_sharing_and_another_k() -> None:
    torch.manual_seed(0)
    model = st.apply(st.build_model("wrn_16_2"), "swrn", templates=2)
    before = snapshot(model)
    for kwargs in ({"policy": "cifar", "scope": "all"}, {"policy": "swrn", "templates": 3}):
        with pytest.raises(st.PlanMismatchError, match="^wrn_16_2 is shared already \\(policy swrn, scope all, 2 "):
            st.apply(model, **kwargs)
        assert snapshot(model) == before


def test_applying_the_same_plan_again_changes_nothing() -> None:
    model = st.apply(small_resnet(), input_size=SIZE, budget=0.9)
    plan, before = st.get_plan(model), snapshot(model)
    st.apply(model, input_size=SIZE, budget=0.9)  # the same request
    st.apply(model, input_size=SIZE, group_size=plan.group_size)  # what the budget chose, asked for by name
    st.apply(model, plan=st.plan(small_resnet(), input_size=SIZE, budget=0.9))  # an equal plan, made elsewhere
    st.apply(model, plan=st.plan(small_resnet(), input_size=SIZE, group_size=plan.group_size))  # the same groups
    st.apply(model, input_size=SIZE, budget=0.9, init="mean")  # init only says how to start a new shared weight
    assert snapshot(model) == before and st.get_plan(model) is plan


def test_after_untie_another_plan_applies() -> None:
    model = st.apply(small_resnet(), input_size=SIZE)
    st.untie(model)
    st.apply(model, "cifar", input_size=SIZE, templates=2)
    assert st.get_plan(model).policy == "cifar" and st.is_tied(model)
    members = {p for g in st.get_plan(model).groups for p in g.members}
    assert members == {n for n, m in model.named_modules() if is_soft(m)}
    assert alias_groups(model) == frozenset()  # no hard tie of the first plan is left behind


@pytest.mark.parametrize("policy", ["imagenet", "cifar"])
def test_ties_the_plan_does_not_describe_are_refused_before_anything_changes(policy: str) -> None:
    model = small_resnet()
    # A tie made by hand between a block's first 3x3 (never a member: scope last) and a 3x3 that is a member
    # under imagenet and not under cifar (its stage's only candidate). load could not rebuild either tie.
    model.layer1[0].conv1.weight = model.layer1[1].conv2.weight
    before = snapshot(model)
    match = "^resnet18: layer1.0.conv1 and layer1.1.conv2 share one weight, which the plan does not say; call "
    with pytest.raises(st.PlanMismatchError, match=match):
        st.apply(model, policy, input_size=SIZE)
    assert snapshot(model) == before


# --------------------------------------------------------------------------------- sharesnet* names


def test_a_sharesnet_refuses_another_policy_and_untie_names_it_resnet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = st.build_model("sharesnet18", **SMALL)
    before = snapshot(model)
    way_out = "start from resnet18, or call share_transform.untie(model) first"
    with pytest.raises(st.PlanMismatchError, match=refusal("sharesnet18", "policy imagenet", "policy cifar", way_out)):
        st.apply(model, "cifar")
    assert snapshot(model) == before
    st.apply(model)  # its own plan: nothing to do
    assert snapshot(model) == before

    st.untie(model)
    assert model_name(model) == "resnet18" and model.pretrained_cfg["architecture"] == "resnet18"
    assert st.build_spec(model)["name"] == "resnet18"
    st.apply(model, "cifar", input_size=SIZE)
    path = save(model, tmp_path / "r18.safetensors")
    assert read_info(path).build["name"] == "resnet18" and read_info(path).plan.policy == "cifar"
    loaded = load(path)
    assert st.get_plan(loaded) == st.get_plan(model) and st.is_tied(loaded)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_timm_sharesnet_untied_is_resnet_by_every_name() -> None:
    model = st.untie(timm.create_model("sharesnet18", **SMALL))
    assert model.pretrained_cfg["architecture"] == model.default_cfg["architecture"] == "resnet18"
    assert st.get_plan(model) is None and alias_groups(model) == frozenset()
    assert st.count_parameters(model) == st.count_parameters(small_resnet())


# ------------------------------------------------------------------------------------------- the CLI


def test_convert_a_sharesnet_with_another_policy_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "s18.safetensors"
    args = ["convert", "--model", "sharesnet18", "--num-classes", "10", "-o", str(out)]
    result = CliRunner().invoke(sharetx_main, [*args, "--policy", "cifar"], prog_name="sharetx")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "sharetx: error: sharesnet18 is shared already (policy imagenet); re-planning it (policy cifar) is "
        "refused: start from resnet18, or call share_transform.untie(model) first"
    ]
    assert list(tmp_path.iterdir()) == []
    # Its own policy converts, reports the sharing it was built with, and writes a file load takes back.
    result = CliRunner().invoke(sharetx_main, [*args, "--json"], prog_name="sharetx")
    assert result.exit_code == 0, result.output
    plain = st.count_parameters(timm.create_model("resnet18", num_classes=10))
    loaded = load(out)
    assert st.is_tied(loaded) and st.get_plan(loaded).params_before == plain
    assert st.count_parameters(loaded) < plain
    total = json.loads(result.stdout)["total"]
    assert (total["params_before"], total["params_after"]) == (plain, st.count_parameters(loaded))


def test_plan_reports_a_sharesnet_as_built_and_refuses_another_policy() -> None:
    args = ["plan", "--model", "sharesnet18", "--num-classes", "10"]
    result = CliRunner().invoke(sharetx_main, [*args, "--policy", "cifar"], prog_name="sharetx")
    assert result.exit_code == 2 and result.stdout == ""
    assert "re-planning it (policy cifar) is refused: start from resnet18" in result.stderr
    result = CliRunner().invoke(sharetx_main, [*args, "--json"], prog_name="sharetx")
    assert result.exit_code == 0, result.output
    total = json.loads(result.stdout)["total"]
    plain = st.count_parameters(timm.create_model("resnet18", num_classes=10))
    shared = st.count_parameters(timm.create_model("sharesnet18", num_classes=10))
    assert (total["params_before"], total["params_after"]) == (plain, shared) and shared < plain


# ----------------------------------------------------------------------------------------- the recipes


def _recipe():
    spec = importlib.util.spec_from_file_location("train_cifar_reapply", ROOT / "recipes" / "train_cifar.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            "--no-share",
            "error: --arch sharesnet18 is shared by construction (policy imagenet); for an unshared run use "
            "--arch resnet18",
        ),
        (
            "--policy cifar",
            "error: sharesnet18 is shared already (policy imagenet); re-planning it (policy cifar) is refused: "
            "start from resnet18, or call share_transform.untie(model) first",
        ),
    ],
)
def test_a_recipe_never_runs_a_sharesnet_as_something_else(tmp_path: Path, capsys, flags: str, message: str) -> None:
    from share_transform.train.trainer import run_recipe

    recipe = _recipe()
    out = tmp_path / "run"
    argv = f"--output {out} --synthetic --arch sharesnet18 --epochs 1 --batch-size 2 --workers 0 --device cpu"
    args = recipe.get_args_parser().parse_args([*argv.split(), *flags.split()])
    assert run_recipe(recipe.main, args) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert not (out / "run.json").exists()


def test_a_recipe_counts_a_sharesnet_before_sharing() -> None:
    from share_transform.train import resolve_args
    from share_transform.train.trainer import build_recipe_model

    recipe = _recipe()
    args = recipe.get_args_parser().parse_args(["--arch", "sharesnet18", "--policy", "imagenet", "--synthetic"])
    args = resolve_args(args, recipe="imagenet")  # the recipe's defaults (--init among them) are resolved first
    args.model_kwargs = dict(SMALL_ARCH)
    model, unshared, unique = build_recipe_model(args, 5)
    assert unshared == st.count_parameters(small_resnet()) and unique == st.count_parameters(model) < unshared


# ------------------------------------------------------------------------------------------- bad input


def test_install_tie_hooks_refuses_a_non_module() -> None:
    with pytest.raises(st.NotAModuleError, match="expected a torch.nn.Module, got str"):
        install_tie_hooks("x")
    assert issubclass(st.NotAModuleError, TypeError)
