"""Soft sharing costs what it counts: the bytes a soft model holds, its files, pickling it, and half precision.

Each soft member holds k coefficients in a storage of its own and nothing of the weight it replaced, so the
storages a soft model holds add up to its unique parameters and buffers times their element size.
"""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_model, save_model
from torch import nn

import share_transform as st
from share_transform.soft import bank_of, coefficients_of, is_soft, share_softly

SIZE = (3, 32, 32)


def tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def held_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors(model)}
    return sum(storages.values())


def counted_bytes(model: nn.Module) -> int:
    """Unique parameters plus buffers, times their element size (``parameters()`` lists a shared one once)."""
    return sum(t.numel() * t.element_size() for t in tensors(model))


def soft_wrn(seed: int = 0, templates: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return st.apply(st.build_model("wrn_22_1"), "swrn", templates=templates)


def soft_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("resnet50", layers=[3, 4, 3, 2], channels=(8, 16, 32, 64), num_classes=5)
    return st.apply(model, input_size=SIZE, templates=2)


def members(model: nn.Module) -> list[list[nn.Conv2d]]:
    modules = dict(model.named_modules())
    return [[modules[p] for p in g.members] for g in st.get_plan(model).groups]


@pytest.mark.parametrize("build", [soft_wrn, soft_resnet], ids=["swrn", "resnet-k2"])
def test_a_soft_model_holds_its_unique_parameters_and_buffers_and_nothing_else(build) -> None:
    model = build()
    k = st.get_plan(model).templates
    assert held_bytes(model) == counted_bytes(model)
    for group in members(model):
        for conv in group:  # k coefficients in a storage of k elements (not a view of a weight-sized buffer)
            coefficients = coefficients_of(conv)
            assert coefficients.untyped_storage().nbytes() == k * coefficients.element_size()
    # What torch.save writes of the state dict is the storages it references: no more than the model counts.
    state = model.state_dict()
    written = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    assert sum(written.values()) == sum(t.numel() * t.element_size() for t in state.values())


def test_soft_state_dict_file_is_smaller_than_the_unshared_one() -> None:
    torch.manual_seed(0)
    plain = st.build_model("wrn_22_1")
    soft = soft_wrn()
    assert st.count_parameters(soft) < st.count_parameters(plain)
    sizes = []
    for model in (plain, soft):
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        sizes.append(len(buffer.getvalue()))
    saved = 4 * (st.count_parameters(plain) - st.count_parameters(soft))  # float32
    # The difference is the parameters soft sharing removes, up to the archive's bookkeeping: a zip record per
    # tensor (3 more: the banks) and longer names (the members' parametrizations), a few KB in all.
    assert sizes[0] - sizes[1] == pytest.approx(saved, abs=8_000)


def test_safetensors_save_model_and_load_model_on_a_soft_model(tmp_path: Path) -> None:
    model = soft_wrn(seed=0).eval()
    path = tmp_path / "soft.safetensors"
    save_model(model, str(path))
    other = soft_wrn(seed=1).eval()
    missing, unexpected = load_model(other, str(path))
    assert (missing, unexpected) == (set(), [])
    assert st.is_tied(other)
    for a, b in zip(members(model), members(other)):
        assert torch.equal(bank_of(a[0]).templates, bank_of(b[0]).templates)
        assert all(bank_of(c) is bank_of(b[0]) for c in b)
        assert all(torch.equal(coefficients_of(x), coefficients_of(y)) for x, y in zip(a, b))
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def _pickle(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


def _torch_save(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole module is a pickle: trusted input only


@pytest.mark.parametrize("copier", [_pickle, _torch_save, copy.deepcopy], ids=["pickle", "torch.save", "deepcopy"])
def test_a_soft_model_pickles_and_copies_with_its_banks_and_coefficients(copier) -> None:
    model = soft_wrn().eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        expected = model(x)
    copied = copier(model)
    assert st.get_plan(copied) == st.get_plan(model) and st.is_tied(copied)
    assert st.count_parameters(copied) == st.count_parameters(model)
    assert held_bytes(copied) == counted_bytes(copied)
    assert all(bank_of(a[0]) is not bank_of(b[0]) for a, b in zip(members(model), members(copied)))
    coefficients = [coefficients_of(c) for group in members(copied) for c in group]
    assert len({id(c) for c in coefficients}) == len(coefficients)
    with torch.no_grad():
        assert torch.equal(copied(x), expected)
    # The copy trains: gradients reach its templates and coefficients.
    copied.train()
    copied(x).sum().backward()
    assert all(coefficients_of(c).grad is not None for group in members(copied) for c in group)
    assert all(bank_of(group[0]).templates.grad is not None for group in members(copied))
    # and a copy of the copy still pickles (deepcopy keeps the member's class)
    assert torch.equal(_pickle(copied).eval()(x), copied.eval()(x))


def test_pickling_a_soft_model_with_its_optimizer_keeps_the_parameters_shared() -> None:
    model = soft_wrn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model2, optimizer2 = pickle.loads(pickle.dumps((model, optimizer)))
    assert [id(p) for p in optimizer2.param_groups[0]["params"]] == [id(p) for p in model2.parameters()]


def test_soft_sharing_hard_tied_convs_gives_each_its_own_coefficients() -> None:
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(3)]
    for c in convs[1:]:
        c.weight = convs[0].weight
    bank = share_softly(convs, templates=2)
    coefficients = [coefficients_of(c) for c in convs]
    assert len({id(c) for c in coefficients}) == 3 and all(bank_of(c) is bank for c in convs)
    rows = torch.stack([c.detach() for c in coefficients])  # (members x k) with orthogonal columns
    torch.testing.assert_close(rows.T @ rows, torch.eye(2), atol=1e-6, rtol=0)
    x = torch.randn(1, 4, 5, 5)
    assert not torch.allclose(convs[0](x), convs[1](x))  # the members no longer compute one weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soft_apply_works_in_half_precision(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = st.apply(st.build_model("wrn_22_1").to(dtype), "swrn", templates=2)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert held_bytes(model) == counted_bytes(model)
    out = model.eval()(torch.randn(2, *SIZE, dtype=dtype))
    assert out.dtype == dtype and out.shape == (2, 10) and bool(out.isfinite().all())
    # Assigning a weight solves least squares in float32 and stores k coefficients in the model's dtype.
    conv = members(model)[0][0]
    bank = bank_of(conv).templates.detach()
    target = torch.randn(conv.weight.shape).to(dtype)
    conv.weight = target
    coefficients = coefficients_of(conv)
    assert coefficients.dtype == dtype and coefficients.untyped_storage().nbytes() == 2 * coefficients.element_size()
    basis = bank.float().reshape(2, -1).T
    expected = torch.linalg.lstsq(basis, target.float().reshape(-1, 1)).solution.reshape(-1)
    torch.testing.assert_close(coefficients.float(), expected.to(dtype).float(), rtol=0, atol=0)
    assert is_soft(conv)
