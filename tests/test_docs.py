"""The docs say what the code does: links resolve, and every example the README and docs/ show is run.

What runs, by block type (a fenced block's info string):

* README ``python`` blocks are executed verbatim; a ``text`` block right after one is its exact stdout.
* README ``bash`` lines are either the two set-up lines (which ``.ci/run`` runs verbatim) or ``sharetx`` lines,
  run in order in one temporary directory (exit status 0).
* ``console`` blocks, in the README and docs/: each ``$ sharetx ...`` line runs in-process (click's CliRunner),
  in order, in one temporary directory per document; the lines shown under it are its output (stdout and stderr,
  as a terminal shows them), compared exactly; ``| head -N`` keeps the first N lines; numbers in scientific
  notation (onnxruntime's difference) are not compared. A line with no output shown must exit 0 and is not
  compared; output starting with ``sharetx: error:`` must exit 2 (the CLI's bad-input status).
* ``pycon`` blocks (``>>>`` prompts) are doctests, one namespace per document, run in a temporary directory.

Other blocks in docs/ (recipe and torchrun commands, which need data and hours) are not run.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv ")]


def test_ci_runs_the_readme_commands_verbatim() -> None:
    readme = _commands(README.read_text(encoding="utf-8"))
    ci = _commands((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert len(readme) == 2 and readme[1].endswith("python -m pytest -q")
    assert ci == readme


# --- Markdown, as much of it as the checks need -----------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence


def code_blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of ``markdown``, in order."""
    blocks, lines = [], markdown.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})\s*([\w-]*)", lines[i])
        if fence is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence.group(1)):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"line {start + 1}: unclosed code block")
        blocks.append(Block(fence.group(2), "\n".join(body) + "\n", start + 1))
        i += 1
    return blocks


def prose(markdown: str) -> str:
    """``markdown`` without its code blocks and inline code spans (which hold no links or headings)."""
    out, in_block = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        out.append("" if in_block else re.sub(r"`[^`\n]*`", "code", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = "".join(c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of ``markdown``; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    in_block = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        heading = None if in_block else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def broken_links(page: Path) -> list[str]:
    """The relative links (and #anchors) of ``page`` that do not resolve."""
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text(encoding="utf-8"))):
            broken.append(f"{target}: no heading with this anchor in {dest.name}")
    return broken


# --- Links ------------------------------------------------------------------------------------------------


def test_the_doc_set_is_there() -> None:
    names = {p.name for p in DOCS}
    assert {"api.md", "cli.md", "training.md", "file-format.md", "benchmarks.md", "design.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", DOCS, ids=_id)
def test_each_doc_says_what_it_covers_and_links_back_to_the_readme(page: Path) -> None:
    title, first, *_ = page.read_text(encoding="utf-8").split("\n\n")
    assert title.startswith("# ") and "\n" not in title, "a title, then a sentence on what the page covers"
    assert not first.startswith("#") and first.rstrip().endswith(".") and first.count(". ") == 0
    assert "](../README.md)" in first


def test_the_readme_links_every_doc() -> None:
    links = set(LINK.findall(prose(README.read_text(encoding="utf-8"))))
    assert {f"docs/{p.name}" for p in DOCS} <= links


def test_slugs_are_githubs() -> None:
    assert slug("The sharing dial: group size, scope, soft templates, budget") == (
        "the-sharing-dial-group-size-scope-soft-templates-budget"
    )
    assert slug("Training on CIFAR: `recipes/train_cifar.py`") == "training-on-cifar-recipestrain_cifarpy"
    assert slug("Trust: files and runs") == "trust-files-and-runs"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_link_check_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Part two\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#part-two) [ok](#page) [web](https://example.org/x) `[code](nowhere.md)`\n"
        "[gone](missing.md) [bad anchor](other.md#part-three) ![image](img.png)\n"
        "```\n[in a block](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#part-three: no heading with this anchor in other.md",
        "img.png: no such file",
    ]


# --- The README's code blocks -------------------------------------------------------------------------------


def _readme_blocks() -> list[Block]:
    return code_blocks(README.read_text(encoding="utf-8"))


def _shell_lines(block: Block) -> list[str]:
    return [line.strip() for line in block.text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _outputs(blocks: list[Block]) -> list[tuple[Block, Block | None]]:
    """Each python block with the text block (its output) that follows it, if any."""
    pairs = []
    for i, block in enumerate(blocks):
        if block.lang == "python":
            after = blocks[i + 1] if i + 1 < len(blocks) and blocks[i + 1].lang == "text" else None
            pairs.append((block, after))
    return pairs


def test_every_readme_code_block_is_covered() -> None:
    """Every block is one this file runs: python (+ its text output), the set-up lines, sharetx lines, console."""
    blocks = _readme_blocks()
    setup = _commands(README.read_text(encoding="utf-8"))
    outputs = {id(out) for _, out in _outputs(blocks) if out is not None}
    assert any(b.lang == "python" for b in blocks) and any(b.lang == "bash" for b in blocks)
    for block in blocks:
        where = f"README.md line {block.line}"
        assert block.lang in {"python", "text", "bash", "console"}, f"{where}: a {block.lang!r} block is not run"
        if block.lang == "text":
            assert id(block) in outputs, f"{where}: a text block must be the output of the python block before it"
        if block.lang == "bash":
            for line in _shell_lines(block):
                assert line in setup or line.startswith("sharetx "), f"{where}: {line!r} is not run by a test"


def test_readme_python_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for block, output in _outputs(_readme_blocks()):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(block.text, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
        if output is not None:
            assert stdout.getvalue() == output.text, f"README.md line {output.line}: the output shown"


def _sharetx(args: list[str]) -> tuple[int, str]:
    from click.testing import CliRunner

    from share_transform.cli import main

    result = CliRunner().invoke(main, args, prog_name="sharetx")
    return result.exit_code, result.output


def test_readme_sharetx_lines_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lines = [line for b in _readme_blocks() if b.lang == "bash" for line in _shell_lines(b)]
    lines = [line for line in lines if line.startswith("sharetx ")]
    assert len(lines) >= 3
    for line in lines:
        code, output = _sharetx(shlex.split(line, comments=True)[1:])
        assert code == 0, f"{line}\n{output}"


# --- Console sessions and doctests, in the README and docs/ -------------------------------------------------

_FLOAT = re.compile(r"\b\d(?:\.\d+)?e[-+]\d+\b")


def console_steps(block: Block) -> list[tuple[str, list[str]]]:
    """(command, output lines shown) for each ``$`` line of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:].strip(), []))
        elif steps:
            steps[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"line {block.line}: output before any $ command")
    return steps


def run_console_line(command: str) -> tuple[int, list[str]]:
    """Run ``sharetx ... [| head -N]``; (exit status, output lines)."""
    command, _, pipe = command.partition(" | ")
    args = shlex.split(command)
    assert args[0] == "sharetx", f"{command!r}: console examples are sharetx commands"
    code, output = _sharetx(args[1:])
    lines = output.splitlines()
    if pipe:
        head = re.fullmatch(r"head -(\d+)", pipe.strip())
        assert head, f"{pipe!r}: only '| head -N' is understood"
        lines = lines[: int(head.group(1))]
    return code, lines


CONSOLE_PAGES = [p for p in PAGES if any(b.lang == "console" for b in code_blocks(p.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("page", CONSOLE_PAGES, ids=_id)
def test_console_examples_print_what_the_docs_show(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for block in code_blocks(page.read_text(encoding="utf-8")):
        if block.lang != "console":
            continue
        for command, shown in console_steps(block):
            code, lines = run_console_line(command)
            where = f"{page.name} line {block.line}: $ {command}"
            expected = 2 if shown and shown[0].startswith("sharetx: error:") else 0
            assert code == expected, f"{where}: exit status {code}\n" + "\n".join(lines)
            if shown:
                assert [_FLOAT.sub("<x>", s) for s in lines] == [_FLOAT.sub("<x>", s) for s in shown], where


def pycon_script(markdown: str) -> str:
    """``markdown`` with every line outside ``pycon`` blocks blanked, so doctest line numbers are the file's."""
    out, lang = [], None
    for line in markdown.splitlines():
        fence = re.match(r"^```\s*([\w-]*)", line)
        if fence:
            lang = fence.group(1) if lang is None else None
            out.append("")
        else:
            out.append(line if lang == "pycon" else "")
    return "\n".join(out) + "\n"


PYCON_PAGES = [p for p in PAGES if any(b.lang == "pycon" for b in code_blocks(p.read_text(encoding="utf-8")))]


@pytest.mark.parametrize("page", PYCON_PAGES, ids=_id)
def test_pycon_examples_are_doctests(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    script = pycon_script(page.read_text(encoding="utf-8"))
    test = doctest.DocTestParser().get_doctest(script, {"__name__": "__doc__"}, page.name, str(page), 0)
    assert test.examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_the_doc_runners_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong count in a console example or a doctest is caught (the checks above are not vacuous)."""
    monkeypatch.chdir(tmp_path)
    block = code_blocks("```console\n$ sharetx plan --model resnet18 | head -1\nShaResNet resnet19\n```\n")[0]
    ((command, shown),) = console_steps(block)
    assert run_console_line(command) == (0, ["ShaResNet resnet18 (timm), policy imagenet, input 3x224x224"])
    assert run_console_line(command)[1] != shown
    script = pycon_script("```pycon\n>>> 6 * 7\n43\n```\n")
    runner = doctest.DocTestRunner()
    runner.run(doctest.DocTestParser().get_doctest(script, {}, "x", "x.md", 0), out=lambda _: None)
    assert runner.failures == 1


# --- The API reference covers the API ------------------------------------------------------------------------


def test_every_public_name_is_in_the_api_reference() -> None:
    import share_transform

    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in share_transform.__all__ if not re.search(rf"`[\w.]*\b{name}\b", api)]
    assert missing == []


def test_the_readme_beyond_resnets_table_is_measured() -> None:
    """Every row of the README's "Beyond ResNets" table, planned again on the meta device."""
    import re

    import timm
    import torch

    import share_transform

    text = (ROOT / "README.md").read_text(encoding="utf-8").split("## Beyond ResNets", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+) \| ([\d,]+) \| ([\d.]+)% \| ([\d.]+)% \|$", text, re.M)
    assert len(rows) == 5
    for name, params, last, block in rows:
        with torch.device("meta"):
            model = timm.create_model(name)
        plans = {s: share_transform.plan(model, scope=s) for s in ("last", "block")}
        assert plans["last"].params_before == int(params.replace(",", "")), name
        assert f"{100 * plans['last'].decrease:.1f}" == last, name
        assert f"{100 * plans['block'].decrease:.1f}" == block, name
