"""Rendering: the :class:`Report` of a set of runs as markdown and JSON, and the files :func:`write_report` writes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import write_text
from .figures import FIGURE4_FILE, FIGURE5_FILE, plot_figure4, plot_figure5
from .results import (
    EQUAL_SIZE_TOLERANCE,
    Result,
    Table2Entry,
    Table3Entry,
    dataset_name,
    group_results,
    paper_model_name,
    table2,
    table3,
)
from .runs import Run, find_runs

__all__ = ["REPORT_JSON", "REPORT_MD", "Report", "build_report", "write_report"]

REPORT_MD = "report.md"
REPORT_JSON = "report.json"


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


@dataclass
class Report:
    """Everything the report says, computed from the runs; :meth:`markdown` and :meth:`to_json` render it."""

    runs: list[Run]
    results: list[Result]
    table2: list[Table2Entry]
    table3: list[Table3Entry]
    figures: dict[str, str] = field(default_factory=dict)  # name -> file written

    def markdown_table2(self) -> str:
        has_top5 = any(e.original.top5 and e.shared.top5 for e in self.table2)
        head = (
            "| dataset | model | params original → shared | decrease | epochs | seeds "
            "| top-1 err original | top-1 err shared | diff | paper top-1 original → shared (diff) |"
        )
        align = "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
        if has_top5:
            head += " top-5 err original | top-5 err shared | diff | paper top-5 original → shared (diff) |"
            align += "--:|--:|--:|--:|"
        lines = [head, align]
        for e in self.table2:
            o, s, p = e.original, e.shared, e.paper
            paper1 = "—" if p is None else f"{p.top1_original:.2f} → {p.top1_shared:.2f} ({p.top1_diff:+.2f})"
            model = paper_model_name(o.config.arch)
            model += s.label.removeprefix(f"{model} Share")  # the sharing options, when not the paper's
            line = (
                f"| {dataset_name(o.config.dataset)} | {model} "
                f"| {o.params:,} → {s.params:,} | {e.decrease_pct:.1f}% | {o.config.epochs} "
                f"| {o.top1.n} / {s.top1.n} | {o.top1} | {s.top1} | {_fmt(e.top1_diff, True)} | {paper1} |"
            )
            if has_top5:
                o5, s5 = o.top5, s.top5
                paper5 = (
                    "—"
                    if p is None or p.top5_original is None
                    else f"{p.top5_original:.2f} → {p.top5_shared:.2f} ({p.top5_diff:+.2f})"
                )
                line += f" {o5 or '—'} | {s5 or '—'} | {_fmt(e.top5_diff, True)} | {paper5} |"
            lines.append(line)
        return "\n".join(lines)

    def markdown_table3(self) -> str:
        lines = [
            "| dataset | model | params | top-1 err | paper model | paper params | paper top-1 err |",
            "|---|---|--:|--:|---|--:|--:|",
        ]
        for e in self.table3:
            for result, p in ((e.shared, e.paper_shared), (e.baseline, e.paper_baseline)):
                paper_cols = "— | — | —" if p is None else f"{p.model} | {p.params:.2f} M | {100.0 - p.accuracy:.2f}"
                lines.append(
                    f"| {dataset_name(result.config.dataset)} | {result.label} | {result.params:,} "
                    f"| {result.top1} | {paper_cols} |"
                )
        return "\n".join(lines)

    def markdown(self) -> str:
        unfinished = [r for r in self.runs if not r.complete]
        out = [
            "# ShaResNet: measured against the paper",
            "",
            (
                f"{len(self.runs)} runs, {len(self.results)} configurations. Errors are the final epoch's test "
                "error in percent, mean ± sample standard deviation over seeds. The paper prints its CIFAR rows as "
                "accuracies; they appear here as errors (100 − accuracy). Its differences are recomputed from its "
                "columns (it prints 0.52 for ResNet-34's top-1 gap, whose columns give 1.52)."
            ),
            "",
            "## Table 2: original against shared",
            "",
            self.markdown_table2() if self.table2 else "No architecture was trained both shared and original.",
            "",
            "## Table 3: shared against an unshared net of equal size",
            "",
            (
                self.markdown_table3()
                if self.table3
                else f"No shared net has an unshared net of another architecture within "
                f"{EQUAL_SIZE_TOLERANCE:.0%} of its parameters."
            ),
            "",
        ]
        if self.figures:
            out += ["## Figures", ""]
            out += [f"* {name}: `{file}`" for name, file in self.figures.items()]
            out.append("")
        out += ["## Model selection", "", self.markdown_selection(), ""]
        if unfinished:
            out += ["## Unfinished runs (left out of the tables)", ""]
            out += [
                f"* `{r.path}`: {len(r.trained)}/{r.epochs} epochs"
                + ("" if len(r.trained) < r.epochs else ", the test set not yet evaluated (--resume evaluates it)")
                for r in unfinished
            ]
            out.append("")
        return "\n".join(out)

    def markdown_selection(self) -> str:
        """Which held-out set chose each run's ``checkpoint-best``."""
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.best_chosen_on] = counts.get(r.best_chosen_on, 0) + 1
        lines = [
            "The tables report each run's final model on the test set. Its `checkpoint-best` was chosen on:",
            "",
        ]
        for chosen_on, n in sorted(counts.items()):
            note = (
                " (an optimistic choice: the same images then judge it; train with `--val-split N`)"
                if chosen_on == "the test set"
                else " (the test set evaluated once, on the final and the best checkpoints)"
            )
            lines.append(f"* {chosen_on}: {n} run{'s' if n != 1 else ''}{note}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "table2": [e.to_json() for e in self.table2],
            "table3": [e.to_json() for e in self.table3],
            "results": [r.to_json() for r in self.results],
            "unfinished": [
                {"path": str(r.path), "epochs_done": len(r.trained), "epochs": r.epochs}
                for r in self.runs
                if not r.complete
            ],
            "figures": self.figures,
            "best_chosen_on": {str(r.path): r.best_chosen_on for r in self.runs},
        }


def build_report(runs: Sequence[Run]) -> Report:
    """Group ``runs`` into results and pair them into Tables 2 and 3 (no files written)."""
    results = group_results(runs)
    return Report(list(runs), results, table2(results), table3(results))


def write_report(run_paths: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> Report:
    """Collect the runs under ``run_paths`` and write the report into ``out_dir``.

    Writes ``report.md``, ``report.json``, ``figure5_error_vs_params.png`` and, when some architecture was
    trained both ways, ``figure4_curves.png``, each atomically (a crash leaves the old file or none). Draws on
    matplotlib's Agg canvas directly: no display needed and the global backend is left alone. Returns the
    :class:`Report`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(find_runs(run_paths))
    if report.results:
        plot_figure5(report.results, out / FIGURE5_FILE)
        report.figures["Figure 5 (top-1 error against parameters)"] = FIGURE5_FILE
    if report.table2:
        plot_figure4(report.table2, out / FIGURE4_FILE)
        report.figures["Figure 4 (training loss and test accuracy of each pair)"] = FIGURE4_FILE
    write_text(out / REPORT_MD, report.markdown())
    write_text(out / REPORT_JSON, json.dumps(report.to_json(), indent=2) + "\n")
    return report
