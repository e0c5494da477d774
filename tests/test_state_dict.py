"""What a tied model's state dict lists, and the tools that walk it: load_state_dict, EMA, torch.compile, fx.

Each shared tensor is listed once, under its first name; loading fills the other names, refuses an
unshared state dict and keeps the ties with ``assign=True``. timm's ``ModelEmaV3`` then decays every
shared weight once per update.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_model, save_model
from timm.models._features_fx import create_feature_extractor, get_graph_node_names
from timm.utils import ModelEmaV2, ModelEmaV3
from torch import nn
from torch.nn.utils import parametrize

import share_transform as st
from share_transform.errors import CheckpointError
from share_transform.models import register_cifar_size
from share_transform.tie import install_tie_hooks, tensor_aliases


def small_shared(seed: int = 0) -> nn.Module:
    """A reduced timm ResNet-50, shared: groups of 3, 3, 2 and 2 members (one alias each but the first two)."""
    torch.manual_seed(seed)
    model = timm.create_model("resnet50", layers=[3, 4, 3, 3], channels=(8, 16, 32, 64), num_classes=5)
    return st.apply(model, input_size=(3, 32, 32))


def all_names(model: nn.Module) -> list[str]:
    """Every state-dict name of the model, aliases included, from the modules themselves."""
    names = []
    for path, m in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        names += [prefix + n for n, p in m._parameters.items() if p is not None]
        names += [prefix + n for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
    return names


def group_weights(model: nn.Module) -> list[list[str]]:
    plan = st.get_plan(model)
    assert plan is not None
    return [[f"{m}.weight" for m in g.members] for g in plan.groups]


def test_state_dict_lists_each_shared_weight_once_under_its_first_name() -> None:
    model = small_shared()
    groups = group_weights(model)
    assert [len(g) for g in groups] == [3, 3, 2, 2]
    assert tensor_aliases(model) == groups
    dropped = {name for g in groups for name in g[1:]}
    assert list(model.state_dict()) == [n for n in all_names(model) if n not in dropped]
    assert list(model.state_dict(keep_vars=True)) == list(model.state_dict())
    # A wrapper's prefix reaches the hook: the aliases under it are dropped too.
    wrapper = nn.Sequential(model)
    assert list(wrapper.state_dict()) == [f"0.{n}" for n in model.state_dict()]


def test_load_state_dict_fills_aliases_refuses_unshared_and_keeps_ties() -> None:
    source, target = small_shared(seed=1), small_shared(seed=2)
    target.load_state_dict(source.state_dict())  # first names only: the aliases are filled
    assert st.is_tied(target)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))

    # Every alias present with equal values loads as well (a checkpoint saved before apply, of a tied model).
    full = {n: t.detach().clone() for n, t in zip(all_names(source), _tensors(source))}
    small_shared(seed=3).load_state_dict(full)

    # Different values under the names of one shared weight: an unshared checkpoint, refused before any copy.
    unshared = dict(full)
    name = group_weights(source)[1][2]
    unshared[name] = unshared[name] + 1
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"different weights under layer2.1.conv2.weight and {name}"):
        target.load_state_dict(unshared)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in all_names(model)]


@pytest.mark.parametrize("first_names_only", [True, False])
def test_load_state_dict_with_assign_keeps_the_ties(first_names_only: bool) -> None:
    source, target = small_shared(seed=1), small_shared(seed=2)
    if first_names_only:
        state = {k: v.clone() for k, v in source.state_dict().items()}
    else:
        state = {n: t.detach().clone() for n, t in zip(all_names(source), _tensors(source))}
    target.load_state_dict(state, assign=True)
    assert st.is_tied(target)
    assert st.count_parameters(target) == st.count_parameters(source)
    first = group_weights(target)[0][0]
    assert target.get_parameter(first) is target.get_parameter(group_weights(target)[0][2])
    assert torch.equal(target.get_parameter(first), source.get_parameter(first))


def test_plain_safetensors_save_model_and_load_model(tmp_path: Path) -> None:
    source, target = small_shared(seed=1), small_shared(seed=2)
    save_model(source, str(tmp_path / "m.safetensors"))  # refuses shared tensors: the aliases must be gone
    missing, unexpected = load_model(target, str(tmp_path / "m.safetensors"))
    assert (missing, unexpected) == (set(), [])
    assert st.is_tied(target)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


@pytest.mark.parametrize("ema_class", [ModelEmaV3, ModelEmaV2])
def test_ema_decays_every_shared_weight_once(ema_class: type) -> None:
    model = small_shared()
    decay = 0.9
    ema = ema_class(model, decay=decay)  # timm's defaults otherwise: foreach, buffers included
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    if ema_class is ModelEmaV3:
        step = 10  # timm's train.py passes the update count; the first update (step 1) copies
        assert ema.get_decay(step) == decay
        ema.update(model, step=step)
    else:
        ema.update(model)
    after, now = ema.module.state_dict(), model.state_dict()
    for group in group_weights(model):
        w = group[0]
        expected = decay * before[w] + (1 - decay) * now[w]
        torch.testing.assert_close(after[w], expected, rtol=1e-6, atol=1e-6)
        # Decayed twice it would be this far from the asked value.
        twice = decay * expected + (1 - decay) * now[w]
        assert not torch.allclose(after[w], twice, rtol=1e-6, atol=1e-6)
    assert st.is_tied(ema.module)


class Bank(nn.Module):
    """A soft-sharing parametrization: each holder's weight is a mix of one bank of templates."""

    def __init__(self, templates: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.bank = nn.Parameter(torch.randn(templates, *shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bank.sum(0)


def test_hooks_work_on_any_tensor_held_by_several_modules() -> None:
    # The same parametrization module (holding one bank) on two convs: the bank has two names.
    def build() -> nn.Module:
        net = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
        bank = Bank(2, (4, 4, 3, 3))
        for conv in net:
            parametrize.register_parametrization(conv, "weight", bank)
        return install_tie_hooks(install_tie_hooks(net))  # idempotent

    torch.manual_seed(0)
    source, target = build(), build()
    names = ["0.parametrizations.weight.0.bank", "1.parametrizations.weight.0.bank"]
    assert tensor_aliases(source) == [names]
    assert names[0] in source.state_dict() and names[1] not in source.state_dict()
    assert len(source._state_dict_hooks) == 1
    target.load_state_dict(source.state_dict(), assign=True)
    assert target.get_parameter(names[0]) is target.get_parameter(names[1])
    assert torch.equal(target.get_parameter(names[1]), source.get_parameter(names[0]))


def test_compiled_model_is_planned_tied_and_listed_through_the_wrapper() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet50", layers=[3, 4, 3, 3], channels=(8, 16, 32, 64), num_classes=5)
    compiled = torch.compile(model, backend="eager")
    plan = st.plan(compiled, input_size=(3, 32, 32))
    assert plan.groups == st.plan(model, input_size=(3, 32, 32)).groups
    assert st.apply(compiled, plan=plan) is compiled
    assert st.is_tied(compiled) and st.is_tied(model) and st.get_plan(compiled) is plan
    keys = list(compiled.state_dict())
    assert keys == [f"_orig_mod.{k}" for k in model.state_dict()]
    assert "_orig_mod.layer1.1.conv2.weight" not in keys
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled.eval()(x), model.eval()(x))
    st.untie(compiled)
    assert st.get_plan(model) is None and model.layer1[0].conv2.weight is not model.layer1[1].conv2.weight


def test_plan_keeps_no_reference_to_the_parameters() -> None:
    enabled = gc.isenabled()
    gc.disable()  # what plan leaves behind must go by reference counting alone
    swap = torch.__future__.get_swap_module_params_on_conversion()
    try:
        model = timm.create_model("resnet18", layers=[2, 2, 2, 2], channels=(8, 16, 32, 64), num_classes=5)
        st.apply(model, input_size=(3, 32, 32))
        # swap_tensors (the new default for .half() et al.) refuses a tensor that anything still watches.
        torch.__future__.set_swap_module_params_on_conversion(True)
        model.half()
        assert {p.dtype for p in model.parameters()} == {torch.float16}
        assert st.is_tied(model)
        ref = weakref.ref(model.fc.weight)
        del model
        assert ref() is None
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
        if enabled:
            gc.enable()


@pytest.mark.parametrize("name", ["preact_resnet29", "wrn_22_1"])
@pytest.mark.parametrize("shared", [False, True])
def test_cifar_models_pass_fx_to_torchscript(name: str, shared: bool) -> None:
    # timm's test_model_forward_fx_torchscript: fx writes forward's annotations into its generated code,
    # which TorchScript must resolve.
    register_cifar_size(name)
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    if shared:
        st.apply(model, "cifar")
    _, eval_nodes = get_graph_node_names(model)
    scripted = torch.jit.script(create_feature_extractor(model, [eval_nodes[-1]]))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x)[eval_nodes[-1]], model(x))
