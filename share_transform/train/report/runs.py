"""Reading runs: ``run.json`` and ``metrics.jsonl`` of each run directory, and nothing else."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import FileFormatError
from ...policies import SharingOptions
from ..errors import ReportError
from ..metrics import METRICS_FILE, RUN_FILE, read_metrics

__all__ = ["Run", "find_runs", "load_run"]


@dataclass(frozen=True)
class Run:
    """One training run as recorded in its directory."""

    path: Path
    recipe: str
    arch: str
    dataset: str
    share: bool
    policy: str | None
    sharing: str  # the sharing options in words ("group size 2, 2 templates"); "" for the paper's or unshared
    seed: int | None
    epochs: int  # planned
    unique_params: int
    params_unshared: int | None
    metrics: tuple[dict[str, Any], ...]  # one per finished epoch, in epoch order (after an epoch-0 line, if any)
    val_split: int = 0  # training images held out to choose checkpoint-best on; 0: the test set chose it
    method: str = ""  # how the run started and learned, in words ("mean warm start, KD"); "" from scratch, no KD

    @property
    def trained(self) -> tuple[dict[str, Any], ...]:
        """The finished epochs' metrics, without the epoch-0 line (measured before the first step)."""
        return tuple(m for m in self.metrics if m.get("epoch") != 0)

    @property
    def start(self) -> dict[str, Any] | None:
        """The epoch-0 line (the model, and its trained original, before the first step), or None."""
        return next((m for m in self.metrics if m.get("epoch") == 0), None)

    @property
    def final(self) -> dict[str, Any] | None:
        """The last finished epoch's metrics, or None before the first epoch ends."""
        trained = self.trained
        return trained[-1] if trained else None

    @property
    def complete(self) -> bool:
        """Every planned epoch done, and, with a held-out split, the test set evaluated on the final model."""
        if len(self.trained) < self.epochs:
            return False
        return not self.val_split or (self.final or {}).get("test_top1_err") is not None

    @property
    def best_chosen_on(self) -> str:
        """What chose ``checkpoint-best``: ``"a held-out split of N training images"`` or ``"the test set"``."""
        return f"a held-out split of {self.val_split:,} training images" if self.val_split else "the test set"

    def final_test(self, key: str = "top1_err") -> Any:
        """The final model's test figure ``key`` (``top1_err``, ``top5_err``, ``loss``), None where missing.

        A run with a held-out split evaluated the test set once, at the end (``test_*``); any other run evaluated
        it after every epoch (``val_*``, its held-out set being the test set).
        """
        final = self.final or {}
        return final.get(f"test_{key}" if self.val_split else f"val_{key}")


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
        sharing=SharingOptions.from_dict(info.get("sharing")).describe() if info["share"] else "",
        seed=info.get("seed"),
        epochs=int(info["epochs"]),
        unique_params=int(info["unique_params"]),
        params_unshared=info.get("params_unshared"),
        metrics=tuple(metrics),
        val_split=int(info.get("val_split") or 0),  # runs written before the split existed held none out
        method=describe_method(info),
    )


def describe_method(info: dict[str, Any]) -> str:
    """How a run started and learned, from its ``run.json``: ``"mean warm start, KD"``, ``"KD"`` (from scratch),
    ``"svd warm start"``; ``""`` for a run from scratch without distillation (every run older than these keys)."""
    parts = []
    if info.get("warm_start"):
        parts.append(f"{info['warm_start']} warm start")
    if info.get("distill"):
        parts.append("KD")
    return ", ".join(parts)


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
