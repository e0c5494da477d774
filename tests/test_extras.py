"""Optional dependencies: a missing one is one clear message naming the extra of this package that installs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = re.compile(r"pip install 'share-transform\[(\w+)\]'")


def extras() -> dict[str, set[str]]:
    """``pyproject.toml``'s extras: name -> distribution names (version specifiers dropped)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {name: {re.split(r"[<>=!~ \[]", req)[0] for req in reqs} for name, reqs in optional.items()}


def install_messages() -> list[tuple[str, str]]:
    """``(file:line, text)`` of every source line of the package and the recipes that says ``pip install``."""
    found = []
    for path in sorted([*(ROOT / "share_transform").rglob("*.py"), *(ROOT / "recipes").glob("*.py")]):
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if "pip install" in line:
                found.append((f"{path.relative_to(ROOT)}:{n}", line))
    return found


def test_every_install_message_names_an_extra_that_holds_the_package() -> None:
    known = extras()
    optional = set().union(*(dists for name, dists in known.items() if name != "test"))
    messages = install_messages()
    assert len(messages) >= 3  # onnx for export, matplotlib for figures, scikit-learn for the digits
    for where, text in messages:
        match = INSTALL.search(text)
        assert match is not None, f"{where}: an install message must name an extra: {text.strip()}"
        named = {dist for dist in optional if re.search(rf"\b{re.escape(dist)}\b", text)}
        assert named, f"{where}: the message names no package: {text.strip()}"
        assert named <= known[match[1]], f"{where}: [{match[1]}] does not hold {sorted(named - known[match[1]])}"


def run_without(modules: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in which ``modules`` (space-separated) cannot be imported, as if they
    were not installed."""
    blocked = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules.split())
    return subprocess.run([sys.executable, "-c", blocked + code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_the_core_runs_without_any_extra_and_never_loads_the_training_stack(tmp_path: Path) -> None:
    code = (
        "import share_transform as st\n"
        "from share_transform import paper\n"
        "from share_transform.cli import main\n"
        "model = st.apply(st.build_model('resnet18', num_classes=10))\n"
        f"st.save(model, {str(tmp_path / 'a.safetensors')!r})\n"
        f"assert st.count_parameters(st.load({str(tmp_path / 'a.safetensors')!r})) == st.count_parameters(model)\n"
        "assert paper.TABLE1[0].arch == 'preact_resnet164'\n"
        f"main(['convert', '--model', 'resnet18', '--out', {str(tmp_path / 'b.safetensors')!r}],"
        " standalone_mode=False)\n"
        "heavy = ('share_transform.train', 'matplotlib')\n"
        "print('LOADED', sorted(m for m, mod in sys.modules.items() if mod and m.startswith(heavy)))\n"
    )
    proc = run_without("matplotlib sklearn onnx onnxruntime onnxscript", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "LOADED []"
    assert (tmp_path / "b.safetensors").stat().st_size > 0


def test_figures_without_matplotlib_name_the_train_extra(tmp_path: Path) -> None:
    code = (
        "from share_transform.errors import MissingExtraError\n"
        "from share_transform.train.metrics import plot_curves\n"
        "try:\n"
        f"    plot_curves(__import__('pathlib').Path({str(tmp_path / 'curves.png')!r}), [])\n"
        "except MissingExtraError as e:\n"
        "    print(e)\n"
    )
    proc = run_without("matplotlib", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("pip install 'share-transform[train]'")
    assert not (tmp_path / "curves.png").exists()


def test_digits_experiment_without_scikit_learn_is_one_line_and_exit_2() -> None:
    code = (
        f"sys.path.insert(0, {str(ROOT / 'recipes')!r})\n"
        f"sys.argv = ['digits_experiment.py', '--help']\n"
        "import runpy\n"
        f"runpy.run_path({str(ROOT / 'recipes' / 'digits_experiment.py')!r}, run_name='__main__')\n"
    )
    proc = run_without("sklearn", code)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: the digits come with scikit-learn")
    assert line.endswith("pip install 'share-transform[train]'")


def test_export_without_onnx_names_the_onnx_extra(tmp_path: Path) -> None:
    code = (
        "import torch\n"
        "from share_transform.errors import ExportError\n"
        "from share_transform.export import export_onnx\n"
        "try:\n"
        f"    export_onnx(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), {str(tmp_path / 'm.onnx')!r},"
        " input_size=(3, 8, 8))\n"
        "except ExportError as e:\n"
        "    print(e)\n"
    )
    proc = run_without("onnx", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("pip install 'share-transform[onnx]'")
    assert not (tmp_path / "m.onnx").exists()
