"""Compressing a trained model: warm starts with a closed form, what sharing loses, BatchNorm recalibration, and
an allocation that follows the weights (exact against brute force). Reduced-width models throughout."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file
from torch import nn

import share_transform as st
from share_transform.checkpoints import read_checkpoint
from share_transform.cli import main
from share_transform.files import load, save

SIZE = (3, 32, 32)


def realistic(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BatchNorm affine weights and running statistics (timm zero-inits the last gamma of a block and
    starts every norm at mean 0, var 1, which would hide errors in a fold), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=gen) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.1
            m.running_mean.data = torch.randn(m.weight.shape, generator=gen) * 0.1
            m.running_var.data = torch.rand(m.weight.shape, generator=gen) + 0.5
    return model.eval()


def bottleneck(layers: tuple[int, ...] = (3, 4, 2, 2), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # build_model records its arguments, so save can write how to rebuild the model.
    model = st.build_model("resnet50", layers=list(layers), channels=[8, 16, 32, 64], num_classes=5)
    return realistic(model, seed + 1)


def basic(layers: tuple[int, ...] = (2, 2, 2, 2), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = st.build_model("resnet18", layers=list(layers), channels=[8, 16, 32, 64], num_classes=5)
    return realistic(model, seed + 1)


def weights_of(model: nn.Module, paths: tuple[str, ...]) -> torch.Tensor:
    """The members' current weights, stacked and flattened, in float64."""
    modules = dict(model.named_modules())
    return torch.stack([modules[p].weight.detach().reshape(-1).double() for p in paths])


# ------------------------------------------------------------------------------------------- warm starts


@pytest.mark.parametrize(("make", "scope"), [(bottleneck, "last"), (basic, "all")])
def test_svd_with_templates_equal_to_members_computes_the_original(make, scope) -> None:
    model = make()
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        before = model(x)
    plan = st.plan(model, input_size=SIZE, scope=scope, group_size=2, templates=2)
    assert plan.groups and all(len(g.members) == 2 for g in plan.groups)
    st.apply(model, plan=plan, init="svd")
    assert st.is_tied(model)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() < 1e-4
    assert st.get_reconstruction(model).total < 1e-5
    # The check has teeth: the reference init of the same plan changes the outputs.
    fresh = make()
    st.apply(fresh, plan=plan)
    with torch.no_grad():
        assert (fresh(x) - before).abs().max() > 1e-2


@pytest.mark.parametrize("templates", [1, 2])
def test_svd_error_is_the_closed_form_of_the_discarded_singular_values(templates: int) -> None:
    model = bottleneck()
    plan = st.plan(model, input_size=SIZE, templates=templates)
    originals = [weights_of(model, g.members) for g in plan.groups]
    st.apply(model, plan=plan, init="svd")
    report = st.get_reconstruction(model)
    assert report.init == "svd" and [g.group for g in report.groups] == list(range(len(plan.groups)))
    errors, norms = 0.0, 0.0
    for i, (g, w) in enumerate(zip(plan.groups, originals)):
        sigma = torch.linalg.svdvals(w)
        closed = math.sqrt(float(sigma[templates:].square().sum() / sigma.square().sum()))
        assert report.groups[i].relative == pytest.approx(closed, rel=1e-4)
        # ... and it is what the members now compute: their effective weights are that approximation.
        shared = weights_of(model, g.members)
        assert float((w - shared).norm() / w.norm()) == pytest.approx(closed, rel=1e-4)
        errors += float(sigma[templates:].square().sum())
        norms += float(sigma.square().sum())
    assert report.total == pytest.approx(math.sqrt(errors / norms), rel=1e-4)


def test_mean_is_the_members_average_and_its_error_is_measured() -> None:
    model = bottleneck()
    plan = st.plan(model, input_size=SIZE)
    originals = [weights_of(model, g.members) for g in plan.groups]
    st.apply(model, plan=plan, init="mean")
    report = st.get_reconstruction(model)
    modules = dict(model.named_modules())
    for i, (g, w) in enumerate(zip(plan.groups, originals)):
        shared = modules[g.members[0]].weight
        assert all(modules[m].weight is shared for m in g.members)
        assert torch.allclose(shared.detach().reshape(-1).double(), w.mean(dim=0), atol=1e-6)
        expected = float((w - w.mean(dim=0)).norm() / w.norm())
        assert report.groups[i].relative == pytest.approx(expected, rel=1e-5)


def test_mean_scaled_keeps_each_member_output_where_kernels_are_positive_multiples() -> None:
    model = bottleneck()
    plan = st.plan(model, input_size=SIZE)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for g in plan.groups:
            base = modules[g.members[0]].weight.clone()
            for path in g.members[1:]:
                scale = torch.rand(base.shape[0], 1, 1, 1, generator=gen) * 3 + 0.1
                modules[path].weight.copy_(base * scale)
    norms = {m: modules[m.replace("conv2", "bn2")] for g in plan.groups for m in g.members}
    outputs: dict[str, torch.Tensor] = {}
    hooks = [bn.register_forward_hook(lambda _m, _i, o, p=p: outputs.__setitem__(p, o)) for p, bn in norms.items()]
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        logits = model(x)
    before = dict(outputs)
    plain = copy.deepcopy(model)
    st.apply(model, plan=plan, init="mean-scaled")
    with torch.no_grad():
        after_logits = model(x)
    for h in hooks:
        h.remove()
    assert st.get_reconstruction(model).total < 1e-5
    for path in norms:
        assert torch.allclose(outputs[path], before[path], atol=1e-4), path
    assert (after_logits - logits).abs().max() < 1e-4
    # The plain mean of the same weights changes the outputs: the scales matter.
    st.apply(plain, plan=plan, init="mean")
    assert st.get_reconstruction(plain).total > 0.1
    with torch.no_grad():
        assert (plain(x) - logits).abs().max() > 1e-2


def test_mean_scaled_keeps_a_dead_channel_constant() -> None:
    """A member channel of zero weights (s = 0) cannot be divided into its BatchNorm: the channel's output, a
    constant, goes into the norm's bias instead (gamma 0)."""
    model = bottleneck()
    plan = st.plan(model, input_size=SIZE)
    modules = dict(model.named_modules())
    group = plan.groups[0]
    with torch.no_grad():
        base = modules[group.members[0]].weight.clone()
        for i, path in enumerate(group.members):
            weight = base * (i + 1)
            weight[3] = 0.0 if i == 1 else weight[3]  # member 1's channel 3 is dead
            modules[path].weight.copy_(weight)
    x = torch.randn(4, *SIZE)
    bn = modules[group.members[1].replace("conv2", "bn2")]
    seen: list[torch.Tensor] = []
    hook = bn.register_forward_hook(lambda _m, _i, o: seen.append(o))
    with torch.no_grad():
        model(x)
        st.apply(model, plan=plan, init="mean-scaled")
        model(x)
    hook.remove()
    assert bn.weight[3] == 0 and torch.allclose(seen[1], seen[0], atol=1e-4)
    assert st.get_reconstruction(model).of_members(group.members).relative < 1e-5


def test_mean_scaled_on_trained_like_weights_folds_exactly_what_it_reports() -> None:
    """In general mean-scaled approximates member j by s_j * K: the model then computes what the original
    computes with those weights, BatchNorm in eval mode."""
    model = bottleneck()
    plan = st.plan(model, input_size=SIZE)
    reference = copy.deepcopy(model)
    st.apply(model, plan=plan, init="mean-scaled")
    # Rebuild s_j * K per member from the folded model: K shared, s_j from the BatchNorm's new statistics.
    modules, ref_modules = dict(model.named_modules()), dict(reference.named_modules())
    with torch.no_grad():
        for g in plan.groups:
            for path in g.members:
                bn, ref_bn = modules[path.replace("conv2", "bn2")], ref_modules[path.replace("conv2", "bn2")]
                s = ref_bn.running_var.sqrt() / bn.running_var.sqrt()  # var' = var / s^2
                s = s * torch.sign(ref_bn.running_mean / bn.running_mean)
                ref_modules[path].weight.copy_(s[:, None, None, None] * modules[path].weight)
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() < 1e-3
    errors = [weights_of(reference, g.members) - weights_of(bottleneck(), g.members) for g in plan.groups]
    norms = [weights_of(bottleneck(), g.members) for g in plan.groups]
    total = math.sqrt(sum(float(e.square().sum()) for e in errors) / sum(float(n.square().sum()) for n in norms))
    assert st.get_reconstruction(model).total == pytest.approx(total, rel=1e-3)


def test_mean_scaled_without_a_batchnorm_is_refused_and_changes_nothing() -> None:
    model = st.models.wide_resnet(22, 1).eval()  # pre-activation: the spatial conv feeds the add
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(st.WarmStartError, match=r"conv2's output goes to .*add.*not to a BatchNorm alone.*mean"):
        st.apply(model, "cifar", init="mean-scaled")
    assert st.get_plan(model) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    st.apply(model, "cifar", scope="all", init="mean")  # the plain mean needs no norm


def test_an_init_that_does_not_fit_the_groups_is_refused_before_any_change() -> None:
    model = bottleneck()
    params = [id(p) for p in model.parameters()]
    with pytest.raises(st.WarmStartError, match="init='svd' warm-starts soft groups"):
        st.apply(model, input_size=SIZE, init="svd")
    with pytest.raises(st.WarmStartError, match="soft groups .* warm-start with init='svd'"):
        st.apply(model, input_size=SIZE, templates=2, init="mean")
    assert [id(p) for p in model.parameters()] == params and st.get_plan(model) is None
    assert issubclass(st.WarmStartError, ValueError) and issubclass(st.WarmStartError, st.ShareError)


def test_first_records_nothing_and_untie_forgets_the_error() -> None:
    model = st.apply(bottleneck(), input_size=SIZE)
    assert st.get_reconstruction(model) is None
    assert st.summarize(model, st.get_plan(model)).reconstruction is None
    model = st.apply(bottleneck(), input_size=SIZE, init="mean")
    assert st.get_reconstruction(model) is not None
    st.untie(model)
    assert st.get_reconstruction(model) is None


def test_summary_reports_each_group_and_the_total() -> None:
    model = bottleneck()
    plan = st.plan(model, input_size=SIZE)
    st.apply(model, plan=plan, init="mean")
    report = st.get_reconstruction(model)
    summary = st.summarize(model, plan)
    data = summary.to_dict()
    assert data["reconstruction_error"] == {"init": "mean", "total": report.total}
    assert [g["relative_error"] for g in data["groups"]] == [g.relative for g in report.groups]
    text = str(summary)
    for g in report.groups:
        assert f"relative error {g.relative:.4f}" in text
    assert f"reconstruction error (init mean): {report.total:.4f}" in text
    # Another plan's groups are not the ones measured: no error is shown for them.
    other = st.plan(bottleneck(), input_size=SIZE, group_size=2)
    assert st.summarize(model, other).reconstruction is None


# -------------------------------------------------------------------------------------- recalibration


def test_recalibrate_bn_is_the_cumulative_average_and_restores_flags() -> None:
    model = bottleneck()
    model.train()
    model.layer1.eval()  # a submodule's own flag is kept
    momenta = {id(m): m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(6, *SIZE, generator=gen) for _ in range(5)]
    drawn = []

    def loader() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in batches:
            drawn.append(b)
            yield b, torch.zeros(len(b))

    assert st.recalibrate_bn(model, loader(), 3) == 3
    assert len(drawn) == 3  # no batch drawn beyond the n used
    # The stem's BatchNorm reads conv1(x), which no norm precedes: its statistics have a closed form.
    with torch.no_grad():
        feats = [model.conv1(b) for b in batches[:3]]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(model.bn1.running_mean, mean, atol=1e-5)
    assert torch.allclose(model.bn1.running_var, var, rtol=1e-4)
    assert int(model.bn1.num_batches_tracked) == 3
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(m.momentum == momenta[id(m)] for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_recalibrate_bn_refuses_nothing_to_do_and_keeps_the_statistics() -> None:
    model = bottleneck()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(st.ShareOptionError, match="batches yielded nothing"):
        st.recalibrate_bn(model, [], 4)
    with pytest.raises(st.ShareOptionError, match="integer >= 1"):
        st.recalibrate_bn(model, [torch.randn(2, *SIZE)], 0)
    with pytest.raises(RuntimeError):
        st.recalibrate_bn(model, [torch.randn(2, 5, 32, 32)], 1)  # the forward fails: statistics put back
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(st.ShareOptionError, match="no BatchNorm"):
        st.recalibrate_bn(nn.Linear(2, 2), [torch.randn(1, 2)], 1)


# ------------------------------------------------------------------------------- allocate="weights"


def clustered(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give each sharable list's members weights of unequal likeness: a base plus noise of varying size."""
    gen = torch.Generator().manual_seed(seed)
    plan = st.plan(model, input_size=SIZE)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g in plan.groups:
            base = torch.randn(modules[g.members[0]].weight.shape, generator=gen)
            for path in g.members:
                noise = float(torch.rand(1, generator=gen)) * 1.5
                modules[path].weight.copy_(base + noise * torch.randn(base.shape, generator=gen))
    return model


def compositions(n: int) -> Iterator[tuple[int, ...]]:
    """Every cut of n members into consecutive runs, as run lengths."""
    for cuts in itertools.product((False, True), repeat=n - 1):
        runs, length = [], 1
        for cut in cuts:
            if cut:
                runs.append(length)
                length = 1
            else:
                length += 1
        yield (*runs, length)


def run_error(w: torch.Tensor, templates: int | None) -> float:
    """Squared error of sharing the rows of ``w`` (float64), computed directly."""
    if len(w) < 2:
        return 0.0
    if templates is None:
        return float((w - w.mean(dim=0)).square().sum())
    return float(torch.linalg.svdvals(w)[templates:].square().sum())


def run_saving(length: int, numel: int, templates: int | None) -> int:
    if length < 2:
        return 0
    return (length - 1) * numel if templates is None else length * numel - templates * (numel + length)


@pytest.mark.parametrize("templates", [None, 2])
def test_weights_allocation_beats_every_consecutive_partition(templates: int | None) -> None:
    model = clustered(basic((5, 6, 1, 1)))
    lists = st.plan(model, input_size=SIZE).groups  # the whole stage: the two candidate lists (5 and 6 members)
    assert [len(g.members) for g in lists] == [5, 6]
    weights = [weights_of(model, g.members) for g in lists]
    numels = [g.numel for g in lists]
    before = st.count_parameters(model)
    # Every way to cut both lists, with its saving and squared error, computed without the code under test.
    options = []
    for runs in itertools.product(*(list(compositions(len(g.members))) for g in lists)):
        saving = error = 0.0
        for w, numel, cut in zip(weights, numels, runs):
            start = 0
            for length in cut:
                saving += run_saving(length, numel, templates)
                error += run_error(w[start : start + length], templates)
                start += length
        options.append((saving, error, runs))
    most = max(s for s, _, _ in options)
    for fraction in (0.1, 0.35, 0.6, 0.9, 1.0):
        budget = (before - fraction * most) / before
        plan = st.plan(model, input_size=SIZE, budget=budget, allocate="weights", templates=templates)
        assert plan.params_after <= budget * before
        assert plan.group_size is None and plan.allocate == "weights"
        chosen = 0.0
        for g in plan.groups:
            chosen += run_error(weights_of(model, g.members), templates)
        best = min(e for s, e, _ in options if before - s <= budget * before)
        assert chosen <= best * (1 + 1e-6) + 1e-9, (fraction, chosen, best)


def test_weights_allocation_cuts_two_clusters_between_them() -> None:
    model = basic((1, 1, 6, 1))
    plan = st.plan(model, input_size=SIZE)
    (group,) = plan.groups
    modules = dict(model.named_modules())
    a, b = torch.randn(32, 32, 3, 3), torch.randn(32, 32, 3, 3)
    with torch.no_grad():
        for i, path in enumerate(group.members):
            modules[path].weight.copy_(a if i < 2 else b)
    before = st.count_parameters(model)
    budget = (before - 4 * group.numel) / before  # two runs of the six
    chosen = st.plan(model, input_size=SIZE, budget=budget, allocate="weights")
    assert [g.members for g in chosen.groups] == [group.members[:2], group.members[2:]]
    assert chosen.params_after == before - 4 * group.numel
    # The uniform allocation at the same budget cuts in the middle, across the clusters.
    assert [len(g.members) for g in st.plan(model, input_size=SIZE, budget=budget).groups] == [3, 3]
    st.apply(model, plan=chosen, init="mean")
    assert st.get_reconstruction(model).total == pytest.approx(0.0, abs=1e-6)


def test_weights_allocation_meets_the_budget_and_replays_from_json_and_files(tmp_path: Path) -> None:
    model = clustered(bottleneck((3, 4, 6, 3)))
    before = st.count_parameters(model)
    for budget in (0.97, 0.93, 0.9):
        plan = st.plan(model, input_size=SIZE, budget=budget, allocate="weights")
        assert plan.params_after <= budget * before
        assert plan.describe_options() == f"budget {budget:g}, allocated by weights"
    again = st.SharePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    lengths = sorted(len(g.members) for g in plan.groups)
    shared = st.apply(copy.deepcopy(model), plan=again, init="mean")
    assert st.count_parameters(shared) == plan.params_after
    path = save(shared, tmp_path / "weights.safetensors")
    loaded_plan = st.read_info(path).plan
    assert loaded_plan == plan and sorted(len(g.members) for g in loaded_plan.groups) == lengths


def test_allocate_is_recorded_only_where_it_is_not_uniform() -> None:
    model = clustered(basic((1, 1, 6, 1)))
    uniform = st.plan(model, input_size=SIZE, budget=0.9)
    weights = st.plan(model, input_size=SIZE, budget=0.9, allocate="weights")
    assert "allocate" not in uniform.to_dict() and uniform.allocate == "uniform"  # records stay as before
    assert weights.to_dict()["allocate"] == "weights"
    assert st.SharePlan.from_dict(uniform.to_dict()) == uniform
    assert st.SharingOptions.from_dict({"budget": 0.9}) == st.SharingOptions(budget=0.9, allocate="uniform")


def test_a_model_allocated_by_weights_keeps_its_plan_until_untied() -> None:
    model = clustered(basic((1, 1, 6, 1)))
    st.apply(model, input_size=SIZE, budget=0.9, allocate="weights", init="mean")
    params = [id(p) for p in model.parameters()]
    st.apply(model, input_size=SIZE, budget=0.9, allocate="weights")  # the same request: nothing changes
    assert [id(p) for p in model.parameters()] == params
    with pytest.raises(st.PlanMismatchError, match=r"allocated by weights\); re-planning it \(policy imagenet, budget"):
        st.apply(model, input_size=SIZE, budget=0.9)  # uniform runs are another plan
    assert [id(p) for p in model.parameters()] == params


def test_weights_allocation_needs_a_budget_and_weights() -> None:
    with pytest.raises(st.ShareOptionError, match="allocate='weights' .* give budget"):
        st.plan(bottleneck(), input_size=SIZE, allocate="weights")
    with pytest.raises(st.ShareOptionError, match="unknown allocate 'random'"):
        st.plan(bottleneck(), input_size=SIZE, allocate="random", budget=0.9)
    with torch.device("meta"):
        meta = timm.create_model("resnet50", layers=[3, 4, 2, 2], channels=(8, 16, 32, 64), num_classes=5)
    with pytest.raises(st.ShareOptionError, match="reads the trained weights.*meta"):
        st.plan(meta, input_size=SIZE, allocate="weights", budget=0.9)
    with pytest.raises(st.ShareOptionError, match="budget 0.3 is unreachable"):
        st.plan(bottleneck(), input_size=SIZE, allocate="weights", budget=0.3)


# ------------------------------------------------------------------------------------------------ CLI

SMALL = ["--model", "resnet18", "--num-classes", "10"]


def sharetx(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="sharetx")


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sharetx: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A resnet18 with 10 classes and weights unlike a fresh init (stand-in for trained ones), as safetensors."""
    torch.manual_seed(5)
    model = clustered(st.build_model("resnet18", num_classes=10), seed=5)
    path = tmp_path_factory.mktemp("trained") / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def test_convert_svd_reports_the_error_it_wrote(tmp_path: Path, trained: tuple[Path, nn.Module]) -> None:
    checkpoint, model = trained
    out = tmp_path / "svd.safetensors"
    args = ["convert", *SMALL, "--checkpoint", str(checkpoint), "--templates", "1", "--init", "svd"]
    result = sharetx(*args, "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = st.apply(copy.deepcopy(model), templates=1, init="svd")
    report = st.get_reconstruction(expected)
    assert data["reconstruction_error"]["init"] == "svd"
    assert data["reconstruction_error"]["total"] == pytest.approx(report.total, rel=1e-6)
    assert [g["relative_error"] for g in data["groups"]] == pytest.approx([g.relative for g in report.groups])
    loaded = load(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), expected.eval()(x), atol=1e-4)
    text = sharetx(*args, "-o", str(tmp_path / "text.safetensors")).stdout
    assert f"reconstruction error (init svd): {report.total:.4f}" in text


def test_convert_with_a_checkpoint_warm_starts_by_default(tmp_path: Path, trained: tuple[Path, nn.Module]) -> None:
    checkpoint, model = trained
    result = sharetx("convert", *SMALL, "--checkpoint", str(checkpoint), "-o", str(tmp_path / "a.safetensors"))
    assert result.exit_code == 0, result.output
    assert "reconstruction error (init mean)" in result.stdout
    fresh = sharetx("convert", *SMALL, "-o", str(tmp_path / "b.safetensors"))
    assert fresh.exit_code == 0 and "reconstruction error" not in fresh.stdout


def test_convert_allocate_weights(tmp_path: Path, trained: tuple[Path, nn.Module]) -> None:
    checkpoint, model = trained
    out = tmp_path / "w.safetensors"
    args = ["convert", *SMALL, "--checkpoint", str(checkpoint), "--budget", "0.8", "--allocate", "weights"]
    result = sharetx(*args, "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["options"]["allocate"] == "weights"
    plan = st.plan(model, budget=0.8, allocate="weights")
    assert [g["members"] for g in data["groups"]] == [list(g.members) for g in plan.groups]
    assert data["total"]["params_after"] <= 0.8 * data["total"]["params_before"]
    assert st.get_plan(load(out)) == plan


@pytest.fixture(scope="module")
def timm_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints laid out as timm's train.py writes them (CheckpointSaver): state_dict, EMA, optimizer, args."""
    tmp_path = tmp_path_factory.mktemp("timm-checkpoints")
    torch.manual_seed(2)
    model = st.build_model("resnet18", num_classes=10)
    state = model.state_dict()
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=300, sched="cosine", mean=None, input_size=[3, 224, 224])
    saved = {
        "epoch": 299,
        "arch": "resnet18",
        "state_dict": state,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
        "version": 2,
        "args": args,
        "metric": 71.5,
        "state_dict_ema": {k: v + 1 if v.is_floating_point() else v for k, v in state.items()},
    }
    torch.save(saved, tmp_path / "model_best.pth.tar")
    torch.save({**saved, "args": {"when": Path("/tmp")}}, tmp_path / "checkpoint-9.pth.tar")
    torch.save(st.build_model("resnet34", num_classes=10).state_dict(), tmp_path / "resnet34.pth")
    return tmp_path


def test_a_timm_train_checkpoint_loads_with_its_namespace(timm_checkpoints: Path) -> None:
    state = read_checkpoint(timm_checkpoints / "model_best.pth.tar")
    torch.manual_seed(2)
    expected = st.build_model("resnet18", num_classes=10).state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())  # the model's weights, not the EMA's
    result = sharetx(
        "convert", *SMALL, "--checkpoint", str(timm_checkpoints / "model_best.pth.tar"), "-o",
        str(timm_checkpoints / "out.safetensors"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (timm_checkpoints / "out.safetensors").unlink()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "checkpoint-9.pth.tar"], "holds a pickled pathlib.PosixPath object"),
        (["--checkpoint", "resnet34.pth"], "does not fit resnet18"),
        (["--init", "svd"], "--init svd warm-starts soft groups; give --templates K"),
        (["--init", "mean", "--templates", "2"], "--init mean makes one hard-shared weight; with --templates use"),
        (["--budget", "0.8", "--allocate", "weights"], "--allocate weights chooses the runs from trained weights"),
        (["--allocate", "weights", "--checkpoint", "resnet34.pth"], "allocate='weights' chooses the runs"),
    ],
)
def test_convert_errors_are_one_line_exit_2_and_write_nothing(
    timm_checkpoints: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(timm_checkpoints)
    before = sorted(p.name for p in timm_checkpoints.iterdir())
    line = one_line_error(sharetx("convert", *SMALL, *args))
    assert message in line
    assert sorted(p.name for p in timm_checkpoints.iterdir()) == before
