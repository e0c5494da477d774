"""apply / untie / retie: tensor identities, the gradient law (paper eq. 5), and what keeps or breaks ties."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import share_transform as st

SIZE = (3, 32, 32)


def small_resnet(**kwargs) -> nn.Module:
    """A reduced-width timm ResNet-18: two blocks a stage, so every stage has a share group."""
    torch.manual_seed(0)
    return timm.create_model("resnet18", layers=[2, 2, 2, 2], channels=(8, 16, 32, 64), num_classes=5, **kwargs)


def small_bottleneck() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet50", layers=[3, 3, 2, 2], channels=(8, 16, 32, 64), num_classes=5)


def randomise_batchnorm(model: nn.Module) -> None:
    # timm zero-inits each block's last BN gamma, which would make the members' grads zero and a
    # gradient test pass for nothing.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=gen) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.1


def group_convs(model: nn.Module, plan: st.SharePlan) -> list[list[nn.Conv2d]]:
    modules = dict(model.named_modules())
    return [[modules[p] for p in g.members] for g in plan.groups]


def test_apply_ties_members_to_one_parameter_in_place() -> None:
    model = small_resnet()
    cls, cfg = type(model), dict(model.pretrained_cfg)
    x = torch.randn(2, *SIZE)
    features = model.forward_features(x).shape
    modules = dict(model.named_modules())
    first_weights = {g.members[0]: modules[g.members[0]].weight for g in st.plan(model, input_size=SIZE).groups}
    out = st.apply(model, input_size=SIZE)
    assert out is model and type(model) is cls and model.pretrained_cfg == cfg
    assert model.forward_features(x).shape == features
    plan = st.get_plan(model)
    for convs, g in zip(group_convs(model, plan), plan.groups):
        assert all(c.weight is convs[0].weight for c in convs)
        # init="first": the first member's Parameter object itself is kept.
        assert convs[0].weight is first_weights[g.members[0]]
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert len(list(model.parameters())) == len(list(small_resnet().parameters())) - plan.spatial_convs_removed
    # timm's own API keeps working on the shared model.
    model.reset_classifier(3)
    assert model(torch.randn(2, *SIZE)).shape == (2, 3)
    assert model.forward_features(torch.randn(2, *SIZE)).shape == (2, 64, 1, 1)
    assert model.pretrained_cfg["architecture"] == "resnet18"


def test_apply_is_idempotent() -> None:
    model = st.apply(small_resnet(), input_size=SIZE)
    params = [id(p) for p in model.parameters()]
    again = st.plan(model, input_size=SIZE)
    assert again.params_before == again.params_after == st.count_parameters(model)
    st.apply(model, input_size=SIZE, init="mean")
    assert [id(p) for p in model.parameters()] == params


def test_init_mean_averages_kernels() -> None:
    model = small_resnet()
    plan = st.plan(model, input_size=SIZE)
    expected = [torch.stack([c.weight.detach().clone() for c in convs]).mean(0) for convs in group_convs(model, plan)]
    st.apply(model, plan=plan, init="mean")
    for convs, mean in zip(group_convs(model, plan), expected):
        assert all(c.weight is convs[0].weight for c in convs)
        torch.testing.assert_close(convs[0].weight.detach(), mean)


def test_gradient_of_shared_weight_is_sum_of_members_grads() -> None:
    untied = small_bottleneck()
    randomise_batchnorm(untied)
    plan = st.plan(untied, input_size=SIZE)
    # The untied copy holds, in every member, the weight the shared model keeps.
    for convs in group_convs(untied, plan):
        for c in convs[1:]:
            c.weight.data = convs[0].weight.data.clone()
    shared = st.apply(copy.deepcopy(untied), plan=plan)
    x = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(2))
    target = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    for m in (untied, shared):
        m.train()
        (m(x) * target).sum().backward()
    for u_convs, s_convs in zip(group_convs(untied, plan), group_convs(shared, plan)):
        member_grads = [c.weight.grad for c in u_convs]
        assert all(g is not None and g.abs().sum() > 0 for g in member_grads)
        torch.testing.assert_close(s_convs[0].weight.grad, torch.stack(member_grads).sum(0), rtol=1e-4, atol=1e-5)


def test_sgd_momentum_updates_shared_weight_once() -> None:
    model = small_resnet()
    randomise_batchnorm(model)
    st.apply(model, input_size=SIZE)
    shared = group_convs(model, st.get_plan(model))[-1][0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert sum(p is shared for group in opt.param_groups for p in group["params"]) == 1
    x = torch.randn(4, *SIZE, generator=torch.Generator().manual_seed(4))
    w = shared.detach().clone()
    velocity = None
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        grad = shared.grad.detach().clone()
        velocity = grad if velocity is None else 0.9 * velocity + grad
        w = w - 0.1 * velocity
        opt.step()
        torch.testing.assert_close(shared.detach(), w)
    assert len(opt.state) == len(list(model.parameters()))


def test_ties_survive_deepcopy_and_dtype() -> None:
    model = st.apply(small_resnet(), input_size=SIZE)
    assert st.is_tied(copy.deepcopy(model))
    as_double = copy.deepcopy(model).to(torch.float64)
    assert st.is_tied(as_double) and all(p.dtype == torch.float64 for p in as_double.parameters())
    assert st.is_tied(copy.deepcopy(model).to(torch.bfloat16).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a move between devices needs a GPU")
def test_ties_survive_a_move_to_cuda_and_back() -> None:
    model = st.apply(small_resnet(), input_size=SIZE)
    on_gpu = copy.deepcopy(model).to("cuda")
    assert st.is_tied(on_gpu) and all(p.is_cuda for p in on_gpu.parameters())
    assert st.is_tied(on_gpu.to("cpu"))


def test_meta_and_to_empty_untie_and_retie_restores() -> None:
    # Moving to meta or materialising a meta model makes a new Parameter per module: the ties break.
    model = st.apply(small_resnet(), input_size=SIZE)
    on_meta = copy.deepcopy(model).to("meta")
    assert not st.is_tied(on_meta)
    assert st.is_tied(st.retie(on_meta))

    with torch.device("meta"):
        lazy = small_resnet()
    st.apply(lazy, input_size=SIZE)
    assert st.is_tied(lazy)
    lazy.to_empty(device="cpu")
    assert not st.is_tied(lazy)
    st.retie(lazy)
    assert st.is_tied(lazy)
    lazy.load_state_dict(model.state_dict())  # every alias key holds the same value
    assert st.is_tied(lazy)
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(lazy.eval()(x), model.eval()(x))


def test_untie_gives_each_conv_its_own_copy() -> None:
    reference = small_resnet()
    model = st.apply(copy.deepcopy(reference), input_size=SIZE)
    st.untie(model)
    assert st.count_parameters(model) == st.count_parameters(reference)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len({id(w) for w in weights}) == len(weights)
    assert st.get_plan(model) is None
    with pytest.raises(st.ShareError, match="no share plan"):
        st.retie(model)


def test_train_mode_forward_backward_and_compile_matches_eager() -> None:
    model = st.apply(small_resnet(), input_size=SIZE)
    model.train()
    loss = model(torch.randn(4, *SIZE)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert st.is_tied(model)
