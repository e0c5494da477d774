"""Figures 4 and 5 of the paper from a report's results and Table 2 pairs, drawn with matplotlib."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...figure import new_figure
from ...fs import atomic_write
from ...paper import TABLE1, TABLE3
from .results import Result, Table2Entry, _paper_table2_row, dataset_name, paper_model_name

__all__ = ["FIGURE4_FILE", "FIGURE5_FILE", "figure4", "figure5", "plot_figure4", "plot_figure5"]

FIGURE4_FILE = "figure4_curves.png"
FIGURE5_FILE = "figure5_error_vs_params.png"

_ORIGINAL_COLOUR, _SHARED_COLOUR = "tab:blue", "tab:green"  # the paper's Figure 5 colours


def _save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``path`` atomically (a crash leaves the old figure or none)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _paper_points(dataset: str) -> tuple[list[tuple[float, float, str]], list[tuple[float, float, str]]]:
    """The paper's (params M, top-1 error, name) for ``dataset``: originals and shared nets."""
    originals, shared = [], []
    for row1 in TABLE1:
        if row1.dataset != dataset_name(dataset):
            continue
        row2 = _paper_table2_row(dataset, row1.arch)
        if row2 is not None:
            originals.append((row1.params_original, row2.top1_original, row1.model))
            shared.append((row1.params_shared, row2.top1_shared, row1.model))
    for row3 in TABLE3:
        if row3.dataset == dataset_name(dataset) and row3.policy is None:
            originals.append((row3.params, 100.0 - row3.accuracy, row3.model))
    return sorted(originals), sorted(shared)


def _setting(result: Result) -> str:
    """A point's name on its architecture's curve: ``original``, ``shared`` or the sharing options."""
    if not result.config.share:
        return "original"
    return result.label.removeprefix(paper_model_name(result.config.arch) + " Share").strip(" ()") or "shared"


def plot_figure5(results: Sequence[Result], path: str | os.PathLike[str]) -> Path:
    """Draw :func:`figure5` into ``path``, atomically."""
    return _save_png(figure5(results), path)


def figure5(results: Sequence[Result]) -> Any:
    """Top-1 error against millions of parameters, one panel per dataset.

    Each architecture is one curve over its settings (original, shared, and any other sharing options),
    ordered by parameters, labelled ``<model> (measured)``; hollow markers on dashed lines are the paper's
    figures, labelled ``ResNet (paper)`` and ``ShaResNet (paper)``.
    """
    datasets = sorted({r.config.dataset for r in results})
    fig = new_figure((6 * len(datasets), 4.5))
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        archs = sorted({r.config.arch for r in results if r.config.dataset == dataset})
        for i, arch in enumerate(archs):
            points = sorted(
                (r.params / 1e6, r.top1.mean, r.top1.std, _setting(r))
                for r in results
                if r.config.dataset == dataset and r.config.arch == arch
            )
            x, y, err, labels = zip(*points)
            ax.errorbar(
                x, y, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=f"{paper_model_name(arch)} (measured)"
            )
            for xi, yi, label in zip(x, y, labels):
                ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        paper_originals, paper_shared = _paper_points(dataset)
        for paper_points, colour, name in (
            (paper_originals, _ORIGINAL_COLOUR, "ResNet"),
            (paper_shared, _SHARED_COLOUR, "ShaResNet"),
        ):
            if paper_points:
                x, y, _ = zip(*paper_points)
                ax.plot(x, y, "o--", color=colour, markerfacecolor="none", alpha=0.6, label=f"{name} (paper)")
        ax.set_title(dataset_name(dataset))
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Figure 5: top-1 error against model size")
    fig.tight_layout()
    return fig


def _curve(result: Result, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per epoch: mean, min and max of ``key`` over the result's seeds (epochs all of them reached)."""
    per_run = [{int(m["epoch"]): float(m[key]) for m in r.metrics if m.get(key) is not None} for r in result.runs]
    epochs = sorted(set.intersection(*(set(c) for c in per_run)))
    values = [[c[e] for c in per_run] for e in epochs]
    return epochs, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_figure4(table2: Sequence[Table2Entry], path: str | os.PathLike[str]) -> Path:
    """Draw :func:`figure4` into ``path``, atomically."""
    return _save_png(figure4(table2), path)


def figure4(table2: Sequence[Table2Entry]) -> Any:
    """For each original/shared pair: training loss (left) and held-out accuracy (right) per epoch, the mean over
    seeds (a band from min to max with several), labelled ``<result label> (n=<seeds>)``.

    The held-out set is the test set, or for runs with a held-out split (``--val-split``) that split: the panel's
    title says which.
    """
    rows = len(table2)
    fig = new_figure((11, 3.6 * rows))  # first: without matplotlib, MissingExtraError
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(rows, 2, squeeze=False)
    for (ax_loss, ax_acc), entry in zip(axes, table2):
        title = f"{paper_model_name(entry.original.config.arch)}, {dataset_name(entry.original.config.dataset)}"
        split = any(r.val_split for result in (entry.original, entry.shared) for r in result.runs)
        held_out = "validation" if split else "test"
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
        ax_acc.set(title=f"{title}: {held_out} accuracy", xlabel="epoch", ylabel="top-1 accuracy (%)")
        for ax in (ax_loss, ax_acc):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Figure 4: training loss and held-out accuracy, original against shared")
    fig.tight_layout()
    return fig
