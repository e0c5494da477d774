"""Run outputs: ``metrics.jsonl`` (one JSON object per finished epoch), ``curves.png``, a progress bar.

The file names of a run directory (:data:`RUN_FILE`, :data:`METRICS_FILE`, :data:`CURVES_FILE`) are defined
here once, for the trainer that writes them and :mod:`share_transform.train.report` that reads them;
:func:`read_metrics` is the one reader of ``metrics.jsonl``.

``metrics.jsonl`` keys (errors in percent): ``epoch`` (1-based), ``lr``, ``train_loss``,
``train_top1_err``, ``train_top5_err``, ``val_loss``, ``val_top1_err``, ``val_top5_err`` (the held-out set
that chooses ``checkpoint-best``: a split of the training set, or the test set when the run holds none out),
``train_images``, ``val_images`` (images each pass saw, all ranks), ``images_per_s`` (training, all ranks),
``unique_params``, ``shared``; with a held-out split, the final and the best epochs' lines also carry
``test_loss``, ``test_top1_err``, ``test_top5_err`` (:data:`TEST_KEYS`), the test set's only evaluations.
Lines written before ``train_images``/``val_images`` existed lack them.

A run from a trained original (or with ``--evaluate-first``) starts with an **epoch-0** line, measured before the
first step (:data:`EPOCH0_KEYS`): ``epoch`` 0, the model's ``val_*`` (and, with a held-out split, ``test_*``),
``val_images``, ``unique_params``, ``shared``, and the trained original's ``teacher_val_*`` (``teacher_test_*``).
It has no ``train_*`` and no ``lr``; nothing chooses it as ``checkpoint-best``.

``curves.png`` redraws, after every epoch, the training loss and the held-out error per epoch, as the
paper's Figure 4 does for CIFAR. Drawing uses matplotlib's Agg canvas directly, so it needs no display
and leaves the global backend alone; without matplotlib (an optional extra) the curves are skipped. Only
rank 0 calls these.

Example:
    >>> append_metrics(out / "metrics.jsonl", record)
    >>> plot_curves(out / "curves.png", history, title="resnet50, shared")
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TextIO

from ..errors import FileFormatError
from ..figure import new_figure
from ..fs import atomic_write

RUN_FILE = "run.json"  # what was trained (written by the trainer, read by the report)
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet"}

METRIC_KEYS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1_err",
    "train_top5_err",
    "val_loss",
    "val_top1_err",
    "val_top5_err",
    "train_images",
    "val_images",
    "images_per_s",
    "unique_params",
    "shared",
)
#: The test set's figures, on the lines of the epochs it was evaluated at (runs with a held-out split).
TEST_KEYS = ("test_loss", "test_top1_err", "test_top5_err")
#: The epoch-0 line's keys (before the first step): the model's and the trained original's (``teacher_*``, when
#: the run has one); the ``test_*`` ones with a held-out split only.
EPOCH0_KEYS = (
    "epoch",
    "val_loss",
    "val_top1_err",
    "val_top5_err",
    "val_images",
    "unique_params",
    "shared",
    "teacher_val_loss",
    "teacher_val_top1_err",
    "teacher_val_top5_err",
)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one epoch's record as a JSON line, flushed to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_metrics(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` atomically from ``history`` (on resume: exactly the checkpointed epochs)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(path, write)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, one per epoch, in epoch order.

    An epoch logged twice (a line written after the last checkpoint, then again after ``--resume``) counts
    once: the later line wins.

    Raises:
        FileFormatError: a line is not a JSON object with an integer ``epoch``; the message names the line.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"{path}:{n} is not a metrics line ({e})") from e
        by_epoch[epoch] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def dataset_name(dataset: str) -> str:
    """How figures and reports write a ``run.json`` dataset: ``"cifar10"`` -> ``"CIFAR-10"``; others as recorded."""
    return _DATASET_NAMES.get(dataset, dataset)


def curves_title(info: dict[str, Any]) -> str:
    """The heading of ``curves.png``, from the run's ``run.json`` record, so it names the data the run trained on.

    >>> curves_title({"arch": "wrn_40_4", "dataset": "cifar10", "share": True})
    'wrn_40_4 on CIFAR-10, ShaResNet'

    ``share`` is whether the model is shared (``run.json``'s): a ``--share`` that shared nothing is titled
    ``original``.
    """
    return f"{info['arch']} on {dataset_name(info['dataset'])}, {'ShaResNet' if info['share'] else 'original'}"


def matplotlib_missing() -> bool:
    """True when matplotlib (the ``[train]`` extra), which draws ``curves.png``, cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def curves_figure(history: Sequence[dict[str, Any]], *, title: str = "", held_out: str = "test") -> Any:
    """The figure of :func:`plot_curves`: training loss (left); held-out and training top-1/top-5 error (right).

    Every series has markers, so a one-epoch run shows each as a point, and the epoch axes have integer ticks.
    ``held_out`` names what ``val_*`` holds: ``"test"``, or ``"val"`` (a split of the training set; the test
    figures of the epochs the test set was evaluated at are then drawn as single points). An epoch-0 line (before
    the first step) adds the held-out errors' point at 0, and its trained original's held-out top-1 error is drawn
    as a horizontal line.
    """
    fig = new_figure((10, 4), dpi=100, layout="constrained")  # first: without matplotlib, MissingExtraError
    from matplotlib.ticker import MaxNLocator

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        return [e for e, _ in points], [v for _, v in points]

    ax_loss, ax_err = fig.subplots(1, 2)
    # Training loss alone, as Figure 4: an early test loss of an untrained BatchNorm can be 1000x larger.
    ax_loss.plot(*series("train_loss"), marker=".", label="train")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_err.plot(*series("val_top1_err"), marker=".", label=f"{held_out} top-1")
    ax_err.plot(*series("val_top5_err"), marker=".", linestyle="--", label=f"{held_out} top-5")
    ax_err.plot(*series("train_top1_err"), marker=".", linestyle=":", label="train top-1")
    teacher = next((r["teacher_val_top1_err"] for r in history if r.get("teacher_val_top1_err") is not None), None)
    if teacher is not None:
        ax_err.axhline(teacher, color="black", linewidth=1, linestyle="-.", label=f"trained original, {held_out} top-1")
    tested = [r for r in history if r.get("test_top1_err") is not None and r["epoch"] > 0]
    if tested:
        ax_err.plot(
            [r["epoch"] for r in tested],
            [r["test_top1_err"] for r in tested],
            marker="*",
            markersize=10,
            linestyle="none",
            label="test top-1 (final, best)",
        )
    ax_err.set(xlabel="epoch", ylabel="error (%)", title=f"{'validation' if held_out == 'val' else 'test'} error")
    for ax in (ax_loss, ax_err):
        # min_n_ticks=1: with the default 2, a one-epoch axis falls back to fractional ticks.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def plot_curves(path: Path, history: Sequence[dict[str, Any]], *, title: str = "", held_out: str = "test") -> None:
    """Draw :func:`curves_figure` into ``path``, atomically."""
    fig = curves_figure(history, title=title, held_out=held_out)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


class ProgressBar:
    """A one-line progress bar: step, loss, images/s and ETA.

    On a terminal it redraws in place; otherwise (logs, CI) it prints a line at every tenth of the epoch.
    Each value keeps one precision (:data:`FORMATS`), so a loss reads 2.3026 then 0.1235, never 2.303 then 0.1235.
    """

    #: Format of each named value; others get 4 decimals.
    FORMATS: ClassVar[dict[str, str]] = {"loss": ".4f", "img_s": ".1f"}

    def __init__(self, total: int, desc: str, stream: TextIO | None = None) -> None:
        self.total, self.desc = total, desc
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.next_tenth = 1

    def update(self, done: int, **values: float) -> None:
        """Show ``done`` of ``total`` steps and the named values (e.g. ``loss=2.3, img_s=2900``)."""
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        width = 24
        filled = int(width * done / self.total) if self.total else width
        fields = "  ".join(f"{k.replace('_', '/')} {v:{self.FORMATS.get(k, '.4f')}}" for k, v in values.items())
        line = f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}  {fields}  eta {_clock(eta)}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        elif self.total and done * 10 >= self.next_tenth * self.total:
            self.next_tenth = done * 10 // self.total + 1
            print(line, file=self.stream, flush=True)

    def close(self, summary: str = "") -> None:
        """End the bar's line; print ``summary`` on its own line."""
        if self.tty:
            self.stream.write("\n")
        if summary:
            print(summary, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
