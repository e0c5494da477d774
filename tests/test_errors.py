"""Each bad input raises a specific ShareError subclass whose message names the model and what to do."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import share_transform as st


def test_vit_has_no_residual_spatial_conv() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    with pytest.raises(st.NoSpatialConvError, match=r"vit_tiny_patch16_224: found no residual block"):
        st.plan(model, input_size=(3, 32, 32))


def test_vgg_has_no_residual_block() -> None:
    with pytest.raises(st.NoSpatialConvError, match=r"^VGG: found no residual block.*ResNet"):
        st.plan(torchvision.models.vgg11(), input_size=(3, 32, 32))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x + self.conv(x)
        return x


def test_untraceable_model() -> None:
    with pytest.raises(st.TraceError, match=r"^Untraceable: torch.fx could not trace.*register_notrace_module"):
        st.plan(Untraceable())


def test_input_size_the_model_rejects() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)  # asserts its input size
    rejected = r"^vit_tiny_patch16_224: the model rejected input size 3x64x64.*input_size="
    with pytest.raises(st.InputSizeError, match=rejected):
        st.plan(model, input_size=(3, 64, 64))
    with pytest.raises(st.InputSizeError, match="3x2x2"):
        st.plan(timm.create_model("resnet18"), input_size=(3, 2, 2))
    with pytest.raises(
        st.InputSizeError,
        match=r"^resnet18: input_size must be \(C, H, W\), three positive integers, got \(224, 224\)$",
    ):
        st.plan(timm.create_model("resnet18"), input_size=(224, 224))


@pytest.mark.parametrize("bad", ["resnet50", None, {"weight": torch.zeros(1)}])
def test_not_a_module(bad: object) -> None:
    with pytest.raises(st.NotAModuleError, match="expected a torch.nn.Module"):
        st.apply(bad)
    with pytest.raises(TypeError):  # also the built-in a Python user would catch
        st.plan(bad)


def test_unknown_policy_and_init() -> None:
    model = timm.create_model("resnet18")
    unknown = r"resnet18: unknown policy 'paper'; choose one of cifar, imagenet"
    with pytest.raises(st.UnknownPolicyError, match=unknown):
        st.plan(model, policy="paper")
    with pytest.raises(st.UnknownInitError, match=r"unknown init 'zero'; choose one of first, mean"):
        st.apply(model, init="zero")
    assert st.get_plan(model) is None


def test_plan_from_another_model() -> None:
    plan = st.plan(timm.create_model("resnet50"))
    mismatch = r"resnet18: the plan \(made for resnet50\) expects a conv 64x64x3x3"
    with pytest.raises(st.PlanMismatchError, match=mismatch):
        st.apply(timm.create_model("resnet18"), plan=plan)


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(st.UnknownModelError, match=r"unknown timm model 'resnet105'; did you mean .*resnet101"):
        st.build_model("resnet105")
    with pytest.raises(st.UnknownModelError, match=r"unknown torchvision model 'resnet51'; did you mean resnet50"):
        st.build_model("torchvision:resnet51")


def test_constructor_arguments_the_model_rejects() -> None:
    with pytest.raises(st.ModelArgumentError, match=r"timm model 'resnet18' rejected its arguments \{'depth': 3\}"):
        st.build_model("resnet18", depth=3)
    with pytest.raises(TypeError):
        st.build_model("torchvision:resnet18", depth=3)


def test_all_errors_derive_from_share_error() -> None:
    import inspect

    import share_transform.errors as errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) >= 14
    assert all(issubclass(c, st.ShareError) for c in classes)
    assert {c.__name__ for c in classes} <= set(st.__all__)


def _resnet() -> nn.Module:
    return st.build_model("resnet18", num_classes=10)


def _init_weights(*args: object) -> None:
    from share_transform.init import init_weights

    init_weights(*args)  # type: ignore[arg-type]


def _set_epoch(*args: object) -> None:
    from share_transform.train import set_epoch

    set_epoch(*args)  # type: ignore[arg-type]


BAD_PUBLIC_CALLS = {
    "wide_resnet depth off 6n+4": lambda: st.wide_resnet(27, 4),
    "wide_resnet widen_factor 0": lambda: st.wide_resnet(28, 0),
    "preact_resnet depth off 9n+2": lambda: st.preact_resnet(27),
    "init_weights unknown mode": lambda: _init_weights(_resnet(), "bogus"),
    "set_epoch on a plain loader": lambda: _set_epoch(torch.utils.data.DataLoader([1, 2]), 1),
    "plan with a zero input size": lambda: st.plan(_resnet(), input_size=(3, 0, 0)),
    "plan with a fractional input size": lambda: st.plan(_resnet(), input_size=(3, 32.5, 32)),
    "plan with two numbers": lambda: st.plan(_resnet(), input_size=(32, 32)),
    "save of a meta model": lambda: st.save(_resnet().to("meta"), "never.safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_PUBLIC_CALLS))
def test_a_public_functions_bad_argument_is_a_share_error(case: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(st.ShareError):
        BAD_PUBLIC_CALLS[case]()
    assert list(tmp_path.iterdir()) == []  # nothing half-written
