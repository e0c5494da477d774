"""The package's front door: a cheap import, lazy names, timm registration in either import order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "matplotlib", "share_transform.train")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_import_loads_neither_torch_nor_timm_nor_the_training_stack() -> None:
    proc = run_python(f"import sys, share_transform; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["convert", "--help"], ["models", "--help"]])
def test_cli_answers_help_and_version_without_torch(argv: list[str]) -> None:
    code = (
        "import sys\nfrom share_transform.cli import main\n"
        f"rc = main({argv!r}, standalone_mode=False)\n"
        f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "LOADED []"
    assert "Usage: " in proc.stdout or "version 0.1.0" in proc.stdout


@pytest.mark.parametrize("first", ["share_transform", "timm"])
def test_cifar_networks_register_with_timm_in_either_import_order(first: str) -> None:
    second = "timm" if first == "share_transform" else "share_transform"
    proc = run_python(f"import {first}, {second}\nprint(sorted(timm.list_models('wrn_40_4*')))")
    assert proc.returncode == 0, proc.stderr
    assert "'wrn_40_4'" in proc.stdout


def test_lazy_names_resolve_to_the_functions_even_after_their_submodules_load() -> None:
    import share_transform
    import share_transform.planning
    import share_transform.tie
    from share_transform.planning import plan
    from share_transform.tie import apply

    assert share_transform.apply is apply and share_transform.plan is plan
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = share_transform.no_such_name  # type: ignore[attr-defined]


def test_the_core_imports_nothing_of_the_training_stack() -> None:
    # Lazy imports inside functions count too: the core must work with the training stack absent.
    import ast

    core = [p for p in (ROOT / "share_transform").rglob("*.py") if "train" not in p.relative_to(ROOT).parts[1:2]]
    offenders = []
    for path in core:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                names = [f"{base}.{node.module}" if node.level else str(node.module)]
                if node.module is None:
                    names = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("share_transform.train")]
    assert len(core) > 20 and offenders == []


@pytest.mark.parametrize(
    "recipe", ["train_imagenet", "train_cifar", "reproduce", "digits_experiment", "sharing_experiment"]
)
def test_each_recipe_help_states_every_default_once(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import re

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))  # the experiments import the recipes they drive
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", ROOT / "recipes" / f"{recipe}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = " ".join(module.get_args_parser().format_help().split())
    options = re.split(r" (?=--?\w[\w-]* )", text.split("options:", 1)[1])
    twice = [o for o in options if o.count("default") > 1]
    assert len(options) > 3 and twice == []
    assert "(default: None)" not in text
