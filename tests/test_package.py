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


def test_every_public_name_resolves_to_its_modules_object() -> None:
    import importlib

    import share_transform

    # Looking a name up, even after its submodule loaded (share_transform.planning defines plan), gives the
    # object of the one module whose __all__ lists it: tie.apply, not the module share_transform.tie.
    import share_transform.planning  # noqa: F401
    import share_transform.tie  # noqa: F401

    listed: dict[str, str] = {}
    for module_name in share_transform._API:
        module = importlib.import_module(f"share_transform.{module_name}")
        assert module.__all__, module_name
        for name in module.__all__:
            assert name not in listed, f"{name} is listed by both {listed[name]} and {module_name}"
            listed[name] = module_name
            assert getattr(share_transform, name) is getattr(module, name), f"share_transform.{name}"
    assert sorted(listed) == share_transform.__all__
    assert set(listed) <= set(dir(share_transform))
    assert callable(share_transform.apply) and callable(share_transform.plan)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = share_transform.no_such_name  # type: ignore[attr-defined]


def test_the_type_checking_imports_name_exactly_the_api_modules() -> None:
    import ast

    import share_transform

    tree = ast.parse((ROOT / "share_transform" / "__init__.py").read_text())
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    assert len(blocks) == 1
    imports = [n for n in blocks[0].body if isinstance(n, ast.ImportFrom)]
    assert len(imports) == len(blocks[0].body)  # the block holds the star imports and nothing else
    assert all(n.level == 1 and [a.name for a in n.names] == ["*"] for n in imports)
    assert sorted(str(n.module) for n in imports) == sorted(share_transform._API)


# --------------------------------------------------------------------------------------------- import graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in (ROOT / "share_transform").rglob("*.py")}
ROOT_PACKAGE = "share_transform"
TRAIN = "share_transform.train"


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports, wherever the import stands (a lazy import
    inside a function counts). ``from .x import name`` imports x; ``from . import x`` imports x when x is a
    module, else the package itself (for a name it defines)."""
    import ast

    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                target = (f"{base}.{node.module}" if node.module else base) if node.level else str(node.module)
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    found.add(submodule if submodule in MODULES else target)
        graph[name] = {m for m in found if m in MODULES and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _is_train(module: str) -> bool:
    return module == TRAIN or module.startswith(TRAIN + ".")


def test_the_import_graph_reads_imports_as_python_does() -> None:
    graph = _imports()
    assert "share_transform.planning" in graph["share_transform.tie"]  # from .planning import ...
    assert "share_transform.models.wrn" in graph["share_transform.models.registry"]  # from . import wrn, lazily
    assert "share_transform.train.errors" in graph["share_transform.train.args"]  # from .errors import ...
    assert "share_transform.errors" in graph["share_transform.train.errors"]  # from ..errors import ...
    # Tarjan finds a planted circle, and only it.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_nothing_of_the_training_stack() -> None:
    graph = _imports()
    core = [m for m in graph if not _is_train(m)]
    offenders = sorted(f"{m} -> {d}" for m in core for d in graph[m] if _is_train(d))
    assert len(core) > 20 and offenders == []


@pytest.mark.parametrize("part", ["core", "train"])
def test_no_import_cycles(part: str) -> None:
    graph = _imports()
    keep = {m for m in graph if _is_train(m) == (part == "train")}
    assert len(keep) > 10
    assert _cycles({m: graph[m] & keep for m in keep}) == []


def test_nothing_inside_the_package_imports_the_package_root() -> None:
    graph = _imports()
    assert sorted(m for m, deps in graph.items() if ROOT_PACKAGE in deps) == []


@pytest.mark.parametrize(
    "recipe",
    ["train_imagenet", "train_cifar", "reproduce", "digits_experiment", "sharing_experiment", "compress_experiment"],
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
