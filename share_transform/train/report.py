"""Turn recorded training runs into the ShaResNet paper's Table 2, Table 3, Figure 4 and Figure 5.

Each run directory written by ``recipes/train_cifar.py`` or ``recipes/train_imagenet.py`` holds ``run.json``
(what was trained: recipe, arch, dataset, share, policy, seed, epochs, parameter counts) and
``metrics.jsonl`` (one line per finished epoch, errors in percent). This module reads only those two files:

* runs of the same configuration (dataset, arch, epochs, shared or not, policy) that differ only by seed are
  one *result*: the mean and spread of their final-epoch errors;
* **Table 2**: each architecture trained both ways, original beside shared, top-1 (and top-5) error;
* **Table 3**: each shared net beside an unshared net of another architecture with about as many parameters
  (within :data:`EQUAL_SIZE_TOLERANCE`), as the paper set ResNet-164 Share beside ResNet-92;
* **Figure 5**: top-1 error against parameters (millions), one curve for the originals and one for the
  shared nets, per dataset;
* **Figure 4**: training loss and test accuracy per epoch of each original/shared pair.

Wherever the paper has a figure for the same dataset and architecture (:mod:`share_transform.paper`), the
tables set it beside the measured one and the figures draw it as hollow markers.

Paper: `ShaResNet: reducing residual network parameter number by sharing weights` -
https://arxiv.org/abs/1702.08782

Example::

    from share_transform.train.report import write_report
    report = write_report(["runs/"], "report/")  # report.md, report.json, figure4_curves.png, figure5_...
    print(report.markdown())
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import paper
from ..errors import FileFormatError, ReportError
from ..fs import atomic_write
from .metrics import METRICS_FILE, RUN_FILE, read_metrics, write_text

__all__ = [
    "EQUAL_SIZE_TOLERANCE",
    "FIGURE4_FILE",
    "FIGURE5_FILE",
    "Config",
    "Report",
    "ReportError",
    "Result",
    "Run",
    "Stat",
    "Table2Entry",
    "Table3Entry",
    "build_report",
    "find_runs",
    "load_run",
    "paper_model_name",
    "write_report",
]

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
FIGURE4_FILE = "figure4_curves.png"
FIGURE5_FILE = "figure5_error_vs_params.png"

#: Table 3 pairs a shared net with an unshared one whose parameter count is within this fraction of its own
#: (the paper's pairs differ by at most 3.1%: 0.93 M against 0.96 M).
EQUAL_SIZE_TOLERANCE = 0.10

_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet"}


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One training run as recorded in its directory."""

    path: Path
    recipe: str
    arch: str
    dataset: str
    share: bool
    policy: str | None
    seed: int | None
    epochs: int  # planned
    unique_params: int
    params_unshared: int | None
    metrics: tuple[dict[str, Any], ...]  # one per finished epoch, in epoch order

    @property
    def final(self) -> dict[str, Any] | None:
        """The last finished epoch's metrics, or None before the first epoch ends."""
        return self.metrics[-1] if self.metrics else None

    @property
    def complete(self) -> bool:
        return len(self.metrics) >= self.epochs


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read ``run.json`` and ``metrics.jsonl`` of one run directory."""
    path = Path(path)
    try:
        info = json.loads((path / RUN_FILE).read_text())
    except FileNotFoundError:
        raise ReportError(f"{path} is not a run directory: no {RUN_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path / RUN_FILE} is not valid JSON ({e})") from e
    missing = [k for k in ("arch", "dataset", "share", "epochs", "unique_params") if k not in info]
    if missing:
        raise ReportError(f"{path / RUN_FILE} lacks {', '.join(missing)}")
    metrics_file = path / METRICS_FILE
    try:
        metrics = read_metrics(metrics_file) if metrics_file.exists() else []
    except FileFormatError as e:
        raise ReportError(str(e)) from e
    return Run(
        path=path,
        recipe=str(info.get("recipe", "")),
        arch=str(info["arch"]),
        dataset=str(info["dataset"]),
        share=bool(info["share"]),
        policy=info.get("policy") if info["share"] else None,
        seed=info.get("seed"),
        epochs=int(info["epochs"]),
        unique_params=int(info["unique_params"]),
        params_unshared=info.get("params_unshared"),
        metrics=tuple(metrics),
    )


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Run]:
    """Every run directory at or below ``paths`` (a directory holding ``run.json``), in path order."""
    dirs: set[Path] = set()
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"{p} is not a directory")
        dirs.update(f.parent for f in p.rglob(RUN_FILE))
    if not dirs:
        raise ReportError(f"no run directories ({RUN_FILE}) under {', '.join(map(str, paths))}")
    return [load_run(d) for d in sorted(dirs)]


# ---------------------------------------------------------------------------------------------------------------
# Results: runs of one configuration over seeds
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of one figure over seeds."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def n(self) -> int:
        return len(self.values)

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n > 1 else f"{self.mean:.2f}"

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


@dataclass(frozen=True, order=True)
class Config:
    """What makes runs comparable: they differ only by seed."""

    dataset: str
    arch: str
    epochs: int
    share: bool
    policy: str | None


@dataclass
class Result:
    """The finished runs of one configuration and their final-epoch errors."""

    config: Config
    runs: list[Run]

    @property
    def params(self) -> int:
        return self.runs[0].unique_params

    @property
    def top1(self) -> Stat:
        return Stat(tuple(float(r.final["val_top1_err"]) for r in self.runs))  # type: ignore[index]

    @property
    def top5(self) -> Stat | None:
        values = [r.final.get("val_top5_err") for r in self.runs]  # type: ignore[union-attr]
        return Stat(tuple(map(float, values))) if None not in values else None

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def label(self) -> str:
        return paper_model_name(self.config.arch) + (" Share" if self.config.share else "")

    def to_json(self) -> dict[str, Any]:
        top5 = self.top5
        return {
            "dataset": self.config.dataset,
            "arch": self.config.arch,
            "epochs": self.config.epochs,
            "share": self.config.share,
            "policy": self.config.policy,
            "params": self.params,
            "top1_err": self.top1.to_json(),
            "top5_err": top5.to_json() if top5 else None,
            "seeds": self.seeds,
            "runs": [str(r.path) for r in self.runs],
        }


def group_results(runs: Sequence[Run]) -> list[Result]:
    """Results of the finished runs (all planned epochs done), one per configuration."""
    groups: dict[Config, list[Run]] = defaultdict(list)
    for r in runs:
        if r.complete:
            groups[Config(r.dataset, r.arch, r.epochs, r.share, r.policy)].append(r)
    return [Result(c, sorted(rs, key=lambda r: (r.seed is None, r.seed or 0))) for c, rs in sorted(groups.items())]


def paper_model_name(arch: str) -> str:
    """The paper's name for an architecture: ``wrn_28_10`` -> WRN-28-10, ``preact_resnet164`` -> ResNet-164."""
    arch = arch.split(":")[-1]
    if m := re.fullmatch(r"wrn_(\d+)_(\d+)", arch):
        return f"WRN-{m[1]}-{m[2]}"
    if m := re.fullmatch(r"(?:preact_)?resnet(\d+)", arch):
        return f"ResNet-{m[1]}"
    return arch


def dataset_name(dataset: str) -> str:
    return _DATASET_NAMES.get(dataset, dataset)


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


def _paper_table2_row(dataset: str, arch: str) -> paper.Table2Row | None:
    arch = arch.split(":")[-1]
    for row1 in paper.TABLE1:
        if row1.arch == arch and row1.dataset == dataset_name(dataset):
            return next((r for r in paper.TABLE2 if (r.dataset, r.model) == (row1.dataset, row1.model)), None)
    return None


def _paper_table3_row(dataset: str, arch: str, shared: bool) -> paper.Table3Row | None:
    arch = arch.split(":")[-1]
    return next(
        (
            r
            for r in paper.TABLE3
            if r.arch == arch and r.dataset == dataset_name(dataset) and (r.policy is not None) == shared
        ),
        None,
    )


@dataclass
class Table2Entry:
    """One architecture trained both ways (paper Table 2), with the paper's figures where it has them."""

    original: Result
    shared: Result
    paper: paper.Table2Row | None

    @property
    def decrease_pct(self) -> float:
        return 100.0 * (1.0 - self.shared.params / self.original.params)

    @property
    def top1_diff(self) -> float:
        return self.shared.top1.mean - self.original.top1.mean

    @property
    def top5_diff(self) -> float | None:
        o, s = self.original.top5, self.shared.top5
        return s.mean - o.mean if o and s else None

    def to_json(self) -> dict[str, Any]:
        p = self.paper
        return {
            "dataset": self.original.config.dataset,
            "model": paper_model_name(self.original.config.arch),
            "original": self.original.to_json(),
            "shared": self.shared.to_json(),
            "decrease_pct": self.decrease_pct,
            "top1_diff": self.top1_diff,
            "top5_diff": self.top5_diff,
            "paper": None
            if p is None
            else {
                "top1_original": p.top1_original,
                "top1_shared": p.top1_shared,
                "top1_diff": p.top1_diff,
                "top5_original": p.top5_original,
                "top5_shared": p.top5_shared,
                "top5_diff": p.top5_diff,
            },
        }


@dataclass
class Table3Entry:
    """A shared net beside an unshared net of about its size (paper Table 3)."""

    shared: Result
    baseline: Result
    paper_shared: paper.Table3Row | None
    paper_baseline: paper.Table3Row | None

    @property
    def size_ratio(self) -> float:
        return self.baseline.params / self.shared.params

    def to_json(self) -> dict[str, Any]:
        def paper_json(r: paper.Table3Row | None) -> dict[str, Any] | None:
            return (
                None
                if r is None
                else {
                    "model": r.model,
                    "params_m": r.params,
                    "accuracy": r.accuracy,
                    "top1_err": round(100.0 - r.accuracy, 2),
                }
            )

        return {
            "dataset": self.shared.config.dataset,
            "shared": self.shared.to_json(),
            "baseline": self.baseline.to_json(),
            "size_ratio": self.size_ratio,
            "paper_shared": paper_json(self.paper_shared),
            "paper_baseline": paper_json(self.paper_baseline),
        }


def table2(results: Sequence[Result]) -> list[Table2Entry]:
    """Pair each shared result with the original of the same dataset, arch and epochs."""
    originals = {(r.config.dataset, r.config.arch, r.config.epochs): r for r in results if not r.config.share}
    entries = []
    for s in results:
        key = (s.config.dataset, s.config.arch, s.config.epochs)
        if s.config.share and key in originals:
            entries.append(Table2Entry(originals[key], s, _paper_table2_row(s.config.dataset, s.config.arch)))
    return entries


def table3(results: Sequence[Result], tolerance: float = EQUAL_SIZE_TOLERANCE) -> list[Table3Entry]:
    """Pair each shared result with the closest-sized original of another arch (same dataset and epochs)."""
    entries = []
    for s in (r for r in results if r.config.share):
        candidates = [
            o
            for o in results
            if not o.config.share
            and o.config.arch != s.config.arch
            and (o.config.dataset, o.config.epochs) == (s.config.dataset, s.config.epochs)
            and abs(o.params / s.params - 1.0) <= tolerance
        ]
        if candidates:
            base = min(candidates, key=lambda o: abs(o.params - s.params))
            entries.append(
                Table3Entry(
                    s,
                    base,
                    _paper_table3_row(s.config.dataset, s.config.arch, shared=True),
                    _paper_table3_row(base.config.dataset, base.config.arch, shared=False),
                )
            )
    return entries


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


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
            line = (
                f"| {dataset_name(o.config.dataset)} | {paper_model_name(o.config.arch)} "
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
        if unfinished:
            out += ["## Unfinished runs (left out of the tables)", ""]
            out += [f"* `{r.path}`: {len(r.metrics)}/{r.epochs} epochs" for r in unfinished]
            out.append("")
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "table2": [e.to_json() for e in self.table2],
            "table3": [e.to_json() for e in self.table3],
            "results": [r.to_json() for r in self.results],
            "unfinished": [
                {"path": str(r.path), "epochs_done": len(r.metrics), "epochs": r.epochs}
                for r in self.runs
                if not r.complete
            ],
            "figures": self.figures,
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
        plot_figure5(report, out / FIGURE5_FILE)
        report.figures["Figure 5 (top-1 error against parameters)"] = FIGURE5_FILE
    if report.table2:
        plot_figure4(report, out / FIGURE4_FILE)
        report.figures["Figure 4 (training loss and test accuracy of each pair)"] = FIGURE4_FILE
    write_text(out / REPORT_MD, report.markdown())
    write_text(out / REPORT_JSON, json.dumps(report.to_json(), indent=2) + "\n")
    return report


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------

_ORIGINAL_COLOUR, _SHARED_COLOUR = "tab:blue", "tab:green"  # the paper's Figure 5 colours


def _figure(figsize: tuple[float, float]) -> Any:
    """A figure on its own Agg canvas: no display needed, and matplotlib's global backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``path`` atomically (a crash leaves the old figure or none)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _paper_points(dataset: str) -> tuple[list[tuple[float, float, str]], list[tuple[float, float, str]]]:
    """The paper's (params M, top-1 error, name) for ``dataset``: originals and shared nets."""
    originals, shared = [], []
    for row1 in paper.TABLE1:
        if row1.dataset != dataset_name(dataset):
            continue
        row2 = _paper_table2_row(dataset, row1.arch)
        if row2 is not None:
            originals.append((row1.params_original, row2.top1_original, row1.model))
            shared.append((row1.params_shared, row2.top1_shared, row1.model))
    for row3 in paper.TABLE3:
        if row3.dataset == dataset_name(dataset) and row3.policy is None:
            originals.append((row3.params, 100.0 - row3.accuracy, row3.model))
    return sorted(originals), sorted(shared)


def plot_figure5(report: Report, path: str | os.PathLike[str]) -> Path:
    """Top-1 error against millions of parameters, originals and shared nets, one panel per dataset."""
    datasets = sorted({r.config.dataset for r in report.results})
    fig = _figure((6 * len(datasets), 4.5))
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for share, colour in ((False, _ORIGINAL_COLOUR), (True, _SHARED_COLOUR)):
            points = sorted(
                (r.params / 1e6, r.top1.mean, r.top1.std, r.label)
                for r in report.results
                if r.config.dataset == dataset and r.config.share == share
            )
            if points:
                x, y, err, labels = zip(*points)
                ax.errorbar(
                    x,
                    y,
                    yerr=err,
                    fmt="o-",
                    color=colour,
                    capsize=3,
                    label=("ShaResNet" if share else "ResNet") + " (measured)",
                )
                for xi, yi, label in zip(x, y, labels):
                    ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        paper_originals, paper_shared = _paper_points(dataset)
        for points, colour, name in (
            (paper_originals, _ORIGINAL_COLOUR, "ResNet"),
            (paper_shared, _SHARED_COLOUR, "ShaResNet"),
        ):
            if points:
                x, y, _ = zip(*points)
                ax.plot(x, y, "o--", color=colour, markerfacecolor="none", alpha=0.6, label=f"{name} (paper)")
        ax.set_title(dataset_name(dataset))
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Figure 5: top-1 error against model size")
    fig.tight_layout()
    return _save_png(fig, path)


def _curve(result: Result, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per epoch: mean, min and max of ``key`` over the result's seeds (epochs all of them reached)."""
    per_run = [{int(m["epoch"]): float(m[key]) for m in r.metrics if m.get(key) is not None} for r in result.runs]
    epochs = sorted(set.intersection(*(set(c) for c in per_run)))
    values = [[c[e] for c in per_run] for e in epochs]
    return epochs, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_figure4(report: Report, path: str | os.PathLike[str]) -> Path:
    """For each original/shared pair: training loss (left) and test accuracy (right) per epoch."""
    from matplotlib.ticker import MaxNLocator

    rows = len(report.table2)
    fig = _figure((11, 3.6 * rows))
    axes = fig.subplots(rows, 2, squeeze=False)
    for (ax_loss, ax_acc), entry in zip(axes, report.table2):
        title = f"{paper_model_name(entry.original.config.arch)}, {dataset_name(entry.original.config.dataset)}"
        for result, colour in ((entry.original, _ORIGINAL_COLOUR), (entry.shared, _SHARED_COLOUR)):
            label = f"{result.label} (n={len(result.runs)})"
            for ax, key, to_acc in ((ax_loss, "train_loss", False), (ax_acc, "val_top1_err", True)):
                epochs, mean, low, high = _curve(result, key)
                if to_acc:  # the paper plots test accuracy; metrics.jsonl holds errors
                    mean, low, high = ([100.0 - v for v in vs] for vs in (mean, high, low))
                ax.plot(epochs, mean, color=colour, label=label)
                if len(result.runs) > 1:
                    ax.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)
        ax_loss.set(title=f"{title}: training loss", xlabel="epoch", ylabel="loss")
        ax_acc.set(title=f"{title}: test accuracy", xlabel="epoch", ylabel="top-1 accuracy (%)")
        for ax in (ax_loss, ax_acc):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Figure 4: training loss and test accuracy, original against shared")
    fig.tight_layout()
    return _save_png(fig, path)
