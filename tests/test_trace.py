"""Shape propagation: the closed-form rules against torch's own meta kernels, the rule registry, and errors that
say whose fault a failure is (the model's, for an input size it rejects; the pass's, for a rule that breaks)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn

import share_transform as st
from share_transform import trace
from share_transform.errors import InputSizeError, RegistrationError, TraceError

#: The rules share_transform itself defines; a user's (docs/api.md registers one for GroupNorm) are theirs to test.
BUILT_IN = {c for c, rule in trace.SHAPE_RULES.items() if rule.__module__ == trace.__name__}

# Inputs every rule sees: odd and even sizes, a 1x1 map, too few channels, a vector, a 3-D map.
SHAPES = [(2, 8, 7, 9), (2, 8, 16, 16), (1, 8, 1, 1), (2, 3, 7, 9), (2, 8, 2, 3), (2, 16), (3, 8, 5)]

# The modules each rule is checked on: what the rule claims to cover (kernels, strides, padding, dilation,
# groups, ceil_mode) and what it must leave to the layer (string padding, returned indices, refused inputs).
CASES: dict[type[nn.Module], list[Callable[[], nn.Module]]] = {
    nn.Conv2d: [
        lambda: nn.Conv2d(8, 4, 3),
        lambda: nn.Conv2d(8, 4, 3, stride=2, padding=1),
        lambda: nn.Conv2d(8, 4, (3, 1), stride=(2, 1), padding=(1, 0)),
        lambda: nn.Conv2d(8, 4, 3, dilation=2, padding=2),
        lambda: nn.Conv2d(8, 8, 3, padding=1, groups=4),
        lambda: nn.Conv2d(8, 4, 7, stride=2, padding=3),
        lambda: nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"),
        lambda: nn.Conv2d(8, 4, 3, padding="same"),
        lambda: nn.Conv2d(8, 4, 1, stride=2),
    ],
    nn.BatchNorm2d: [lambda: nn.BatchNorm2d(8)],
    nn.MaxPool2d: [
        lambda: nn.MaxPool2d(3, 2, 1),
        lambda: nn.MaxPool2d(2),
        lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True),
        lambda: nn.MaxPool2d(2, 2, ceil_mode=True),
        lambda: nn.MaxPool2d(3, 2, 1, dilation=2),
        lambda: nn.MaxPool2d(2, 2, 1, ceil_mode=True),  # on width 3 the last window would start in the padding
        lambda: nn.MaxPool2d(3, 1, 2),  # padding over half the kernel: torch refuses it
        lambda: nn.MaxPool2d(3, 1, 2, dilation=2),  # ... the undilated kernel, whatever the dilation
        lambda: nn.MaxPool2d(2, return_indices=True),
    ],
    nn.AvgPool2d: [
        lambda: nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),  # timm's avg_down shortcut
        lambda: nn.AvgPool2d(3, 1, 1),
        lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True),
        lambda: nn.AvgPool2d(2, 2, 1, ceil_mode=True),
        lambda: nn.AvgPool2d((2, 3), stride=None),
        lambda: nn.AvgPool2d(5),
    ],
    nn.AdaptiveAvgPool2d: [
        lambda: nn.AdaptiveAvgPool2d(1),
        lambda: nn.AdaptiveAvgPool2d((3, 5)),
        lambda: nn.AdaptiveAvgPool2d((None, 2)),
    ],
    nn.AdaptiveMaxPool2d: [lambda: nn.AdaptiveMaxPool2d(2), lambda: nn.AdaptiveMaxPool2d(1, return_indices=True)],
    nn.Linear: [lambda: nn.Linear(16, 5), lambda: nn.Linear(9, 4)],
    nn.Flatten: [lambda: nn.Flatten(), lambda: nn.Flatten(2), lambda: nn.Flatten(0, -1)],
    nn.LeakyReLU: [lambda: nn.LeakyReLU(0.1)],
    nn.ELU: [lambda: nn.ELU(0.5)],
    nn.Dropout: [lambda: nn.Dropout(0.3)],
    nn.Dropout2d: [lambda: nn.Dropout2d(0.3)],
}
# The rest take no arguments that could change a shape.
for _cls in BUILT_IN:
    CASES.setdefault(_cls, [_cls])


def _meta_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """What torch's meta kernels say the module gives for ``shape``; None where the module refuses it."""
    try:
        out = module.to("meta").eval()(torch.empty(shape, device="meta"))
    except (RuntimeError, ValueError, IndexError):
        return None
    return tuple(out.shape) if isinstance(out, torch.Tensor) else None  # a pair (return_indices): no shape


def test_every_built_in_rule_has_cases() -> None:
    assert len(BUILT_IN) >= 18
    assert set(CASES) == {c for c, rule in trace.SHAPE_RULES.items() if rule.__module__ == trace.__name__}


@pytest.mark.parametrize("cls", sorted(BUILT_IN, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_the_shape_rule_agrees_with_torchs_meta_kernels(cls: type[nn.Module]) -> None:
    rule = trace.SHAPE_RULES[cls]
    covered = 0
    for make in CASES[cls]:
        for shape in SHAPES:
            module = make()
            expected = _meta_shape(module, shape)
            got = rule(module, torch.Size(shape))
            # A rule may decline (None): the layer then runs on meta or fake tensors. But when it answers, it
            # answers what the layer gives, and it never answers for an input the layer refuses.
            if got is not None:
                assert expected is not None, f"{module} refuses {shape}, yet its rule answers {got}"
                assert tuple(got) == expected, f"{module} on {shape}"
                covered += 1
    assert covered >= len(CASES[cls])  # the rule answers: the comparison is not vacuous


def test_the_rules_cover_what_they_claim() -> None:
    # ceil_mode, dilation and padding of the pools, and a strided conv on an odd size: answered, not declined.
    rules = trace.SHAPE_RULES
    assert rules[nn.MaxPool2d](nn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.Size((2, 8, 7, 9))) == (2, 8, 4, 5)
    assert rules[nn.AvgPool2d](nn.AvgPool2d(2, 2, ceil_mode=True), torch.Size((2, 8, 7, 9))) == (2, 8, 4, 5)
    assert rules[nn.MaxPool2d](nn.MaxPool2d(3, 2, 1, dilation=2), torch.Size((2, 8, 16, 16))) == (2, 8, 7, 7)
    assert rules[nn.Conv2d](nn.Conv2d(8, 4, 3, stride=2, padding=1), torch.Size((2, 8, 7, 9))) == (2, 4, 4, 5)


# --------------------------------------------------------------------------------------------- the registry


class Residual(nn.Module):
    """A stem and two residual blocks whose branches hold a GroupNorm, a layer without a shape rule."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.fixture
def rules(monkeypatch: pytest.MonkeyPatch) -> dict[type[nn.Module], trace.ShapeRule]:
    """The built-in rules alone, and the registry as it was after the test, whatever it registered."""
    monkeypatch.setattr(trace, "_SHAPE_RULES", {c: trace._SHAPE_RULES[c] for c in BUILT_IN})
    monkeypatch.setattr(trace, "SHAPE_RULES", trace.MappingProxyType(trace._SHAPE_RULES))
    return trace._SHAPE_RULES


def test_a_registered_rule_is_used_for_its_layer(rules: dict[type[nn.Module], trace.ShapeRule]) -> None:
    without = st.plan(Residual(), input_size=(3, 8, 8))
    calls: list[tuple[int, ...]] = []

    def group_norm(module: nn.GroupNorm, shape: torch.Size) -> tuple[int, ...] | None:
        calls.append(tuple(shape))
        return tuple(shape) if len(shape) >= 2 and shape[1] == module.num_channels else None

    assert st.register_shape_rule(nn.GroupNorm, group_norm) is group_norm
    assert trace.SHAPE_RULES[nn.GroupNorm] is group_norm
    assert st.plan(Residual(), input_size=(3, 8, 8)) == without
    assert calls == [(2, 8, 8, 8)] * 2  # one call per GroupNorm node, batch of 2


def test_register_shape_rule_refuses_what_it_cannot_hold(rules: dict[type[nn.Module], trace.ShapeRule]) -> None:
    before = dict(rules)
    with pytest.raises(RegistrationError, match=r"torch.nn.modules.conv.Conv2d has a shape rule already.*replace"):
        st.register_shape_rule(nn.Conv2d, lambda m, s: tuple(s))
    with pytest.raises(RegistrationError, match="is not a torch.nn.Module subclass"):
        st.register_shape_rule(int, lambda m, s: tuple(s))  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match="not callable"):
        st.register_shape_rule(nn.GroupNorm, "same")  # type: ignore[arg-type]
    assert rules == before
    assert isinstance(RegistrationError("x"), st.PlanError | ValueError)


# ------------------------------------------------------------------------------------------------- errors


def _small_resnet() -> nn.Module:
    return timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=[8, 8, 8, 8], stem_width=8, num_classes=3)


def test_a_broken_shape_rule_is_a_trace_error_naming_the_node(rules: dict[type[nn.Module], trace.ShapeRule]) -> None:
    def broken(module: nn.Module, shape: torch.Size) -> tuple[int, ...]:
        return {"channels": shape[1]}["width"]  # type: ignore[return-value]  # a KeyError: the rule's own bug

    st.register_shape_rule(nn.BatchNorm2d, broken, replace=True)
    with pytest.raises(TraceError) as caught:
        st.plan(_small_resnet(), input_size=(3, 32, 32))
    assert not isinstance(caught.value, InputSizeError)
    assert str(caught.value).startswith(
        "resnet18: shape propagation failed at node bn1 (call_module bn1): the shape rule for "
        "torch.nn.modules.batchnorm.BatchNorm2d raised KeyError: 'width'."
    )
    assert isinstance(caught.value.__cause__, KeyError)

    # A rule that answers what is not a shape is the rule's fault too.
    st.register_shape_rule(nn.BatchNorm2d, lambda m, s: "wide", replace=True)  # type: ignore[arg-type,return-value]
    with pytest.raises(TraceError, match=r"at node bn1 \(call_module bn1\): the shape rule for .*BatchNorm2d raised"):
        st.plan(_small_resnet(), input_size=(3, 32, 32))


def test_the_model_rejecting_the_size_is_an_input_size_error_naming_the_node() -> None:
    # One channel for a three-channel stem: the conv rule declines, and torch's kernel refuses the input.
    with pytest.raises(InputSizeError) as caught:
        st.plan(_small_resnet(), input_size=(1, 32, 32))
    message = str(caught.value)
    assert message.startswith("resnet18: the model rejected input size 1x32x32 at node conv1 (call_module conv1) (")
    assert "to have 3 channels, but got 1 channels" in message
    assert message.endswith("Pass input_size=(C, H, W) that the model accepts.")


def test_a_failure_of_the_interpreter_is_a_trace_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The interpreter's own code, outside the model's, breaks on the residual addition.
    def boom(args: object, kwargs: object) -> None:
        raise AttributeError("no shape")

    monkeypatch.setattr(trace, "_elementwise_shape", boom)
    with pytest.raises(TraceError, match=r"^resnet18: shape propagation failed at node add \(call_function .*add\)"):
        st.plan(_small_resnet(), input_size=(3, 32, 32))
