"""Each bad input raises a specific ShareError subclass whose message names the model and what to do."""

from __future__ import annotations

from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[1]
#: The head of the error table in the docs: every error class, its group and its built-in parents.
ERROR_TABLE_HEAD = "| class | base | built-in parent | when |"
GROUPS = ("ShareError", "PlanError", "FileError", "TrainingError")


def _error_classes() -> dict[str, type[Exception]]:
    import share_transform.errors as errors
    import share_transform.train.errors as train_errors

    classes = {n: getattr(errors, n) for n in errors.__all__} | {
        n: getattr(train_errors, n) for n in train_errors.__all__
    }
    return {n: c for n, c in classes.items() if isinstance(c, type) and issubclass(c, Exception)}


def test_all_errors_derive_from_share_error_and_one_group() -> None:
    classes = _error_classes()
    assert len(classes) >= 20 and all(issubclass(c, st.ShareError) for c in classes.values())
    for name, cls in classes.items():
        groups = [g for g in GROUPS[1:] if issubclass(cls, classes[g])]
        assert len(groups) <= 1, name  # at most one group: plan, file or training
    import share_transform.errors as errors

    assert set(errors.__all__) <= set(st.__all__)  # the core's at the top level, the training stack's not
    assert not {"ConfigError", "DataError", "TrainingError"} & set(st.__all__)


def _documented_errors() -> dict[str, tuple[str, set[str]]]:
    """class -> (base, built-in parents) from the error table in docs/."""
    tables = [p for p in sorted((ROOT / "docs").glob("*.md")) if ERROR_TABLE_HEAD in p.read_text().splitlines()]
    assert len(tables) == 1, "one error table in docs/"
    lines = tables[0].read_text().splitlines()
    start = lines.index(ERROR_TABLE_HEAD) + 2
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cls, base, builtin, _ = (cell.strip() for cell in line.strip("|").split("|", 3))
        rows[cls.strip("`")] = (base.strip("`"), {b.strip(" `") for b in builtin.split(",") if b.strip()})
    return rows


def test_the_docs_table_of_errors_is_the_hierarchy() -> None:
    classes = _error_classes()
    documented = _documented_errors()
    assert set(documented) == set(classes)
    for name, cls in classes.items():
        own = [b for b in cls.__bases__ if issubclass(b, st.ShareError)]
        base = own[0].__name__ if own else "Exception"
        builtins = {b.__name__ for b in cls.__bases__ if not issubclass(b, st.ShareError) and b is not Exception}
        assert documented[name] == (base, builtins), name


#: Built-in exceptions the package may raise as such: each where it is what a Python user expects.
BUILTIN_RAISES = {
    ("__init__.py", "AttributeError"),  # module __getattr__: an unknown attribute
    ("fs.py", "OSError"),  # re-raised naming the user's path instead of the temporary one
    ("files.py", "OSError"),  # safetensors' I/O failure (a full disk) raised as the OSError it is
}


def test_every_raise_names_a_specific_error() -> None:
    """No raise of a group base (ShareError, PlanError, ...) or of a bare built-in: each rule its own class."""
    import ast
    import builtins

    groups = set(GROUPS)
    wrong = []
    for path in sorted((ROOT / "share_transform").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if not isinstance(exc, ast.Name):
                continue  # a module's class (argparse.ArgumentTypeError, click's Exit): its library's contract
            where = f"{path.relative_to(ROOT)}:{node.lineno} raises {exc.id}"
            builtin = getattr(builtins, exc.id, None)
            if exc.id in groups:
                wrong.append(where)
            elif isinstance(builtin, type) and issubclass(builtin, BaseException):
                if (path.name, exc.id) not in BUILTIN_RAISES:
                    wrong.append(where)
    assert wrong == []


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("wrn_27_4", lambda: st.wide_resnet(27, 4)),
        ("wrn_28_0", lambda: st.wide_resnet(28, 0)),
        ("preact_resnet30", lambda: st.preact_resnet(30)),
    ],
)
def test_a_size_off_the_formula_is_one_error_by_name_or_by_argument(name: str, build) -> None:
    with pytest.raises(st.ModelArgumentError) as by_name:
        st.build_model(name)
    with pytest.raises(st.ModelArgumentError) as by_argument:
        build()
    assert str(by_name.value) == str(by_argument.value)
    assert str(by_name.value).startswith(f"{name}: a ")
    assert not timm.is_model(name)  # refused before registration: timm's registry is as it was


def test_run_recipe_prints_the_traceback_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from share_transform.train import ConfigError, run_recipe

    def main(args: argparse.Namespace) -> None:
        raise ConfigError("--epochs must be at least 1, got 0")

    monkeypatch.delenv("SHARETX_DEBUG", raising=False)
    assert run_recipe(main, argparse.Namespace()) == 2
    assert capsys.readouterr().err == "error: --epochs must be at least 1, got 0\n"
    monkeypatch.setenv("SHARETX_DEBUG", "1")
    assert run_recipe(main, argparse.Namespace()) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert any(line.strip() == 'raise ConfigError("--epochs must be at least 1, got 0")' for line in lines)
    assert lines[-2:] == [
        "share_transform.train.errors.ConfigError: --epochs must be at least 1, got 0",
        "error: --epochs must be at least 1, got 0",
    ]


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
