"""Statistics and pairing: runs of one configuration over seeds become a result; results pair into Tables 2 and 3."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...paper import TABLE1, TABLE2, TABLE3, Table2Row, Table3Row
from ..errors import ReportError
from ..metrics import dataset_name
from .runs import Run

__all__ = [
    "EQUAL_SIZE_TOLERANCE",
    "Config",
    "Result",
    "Stat",
    "Table2Entry",
    "Table3Entry",
    "dataset_name",
    "group_results",
    "paper_model_name",
    "table2",
    "table3",
]

#: Table 3 pairs a shared net with an unshared one whose parameter count is within this fraction of its own
#: (the paper's pairs differ by at most 3.1%: 0.93 M against 0.96 M).
EQUAL_SIZE_TOLERANCE = 0.10


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
    sharing: str = ""  # the sharing options in words; "" for the paper's
    method: str = ""  # how the runs started and learned (warm start, KD); "" from scratch without KD


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
        return Stat(tuple(float(v) for v in self._final("val_top1_err")))

    @property
    def top5(self) -> Stat | None:
        values = self._final("val_top5_err")
        return Stat(tuple(float(v) for v in values)) if None not in values else None

    def _final(self, key: str) -> list[Any]:
        """Every run's final test figure ``key`` (``val_top1_err`` style; None where a run lacks it)."""
        values = []
        for r in self.runs:
            if r.final is None:
                raise ReportError(f"{r.path}: the run has no finished epoch to report")
            values.append(r.final_test(key.removeprefix("val_")))
        return values

    @property
    def best_chosen_on(self) -> str:
        """What chose the runs' ``checkpoint-best`` (their final errors are reported either way)."""
        return "; ".join(sorted({r.best_chosen_on for r in self.runs}))

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def label(self) -> str:
        label = paper_model_name(self.config.arch) + (" Share" if self.config.share else "")
        if self.config.policy not in (None, "imagenet", "cifar"):
            label += f" ({self.config.policy}" + (f", {self.config.sharing})" if self.config.sharing else ")")
        elif self.config.sharing:
            label += f" ({self.config.sharing})"
        if self.config.method:
            label += f" [{self.config.method}]"
        return label

    def to_json(self) -> dict[str, Any]:
        top5 = self.top5
        return {
            "dataset": self.config.dataset,
            "arch": self.config.arch,
            "epochs": self.config.epochs,
            "share": self.config.share,
            "policy": self.config.policy,
            "sharing": self.config.sharing,
            "method": self.config.method,
            "params": self.params,
            "top1_err": self.top1.to_json(),
            "top5_err": top5.to_json() if top5 else None,
            "seeds": self.seeds,
            "runs": [str(r.path) for r in self.runs],
            "best_chosen_on": self.best_chosen_on,
        }


def group_results(runs: Sequence[Run]) -> list[Result]:
    """Results of the finished runs (all planned epochs done), one per configuration (sharing options included)."""
    groups: dict[Config, list[Run]] = defaultdict(list)
    for r in runs:
        if r.complete:
            groups[Config(r.dataset, r.arch, r.epochs, r.share, r.policy, r.sharing, r.method)].append(r)
    return [Result(c, sorted(rs, key=lambda r: (r.seed is None, r.seed or 0))) for c, rs in sorted(groups.items())]


def paper_model_name(arch: str) -> str:
    """The paper's name for an architecture: ``wrn_28_10`` -> WRN-28-10, ``preact_resnet164`` -> ResNet-164."""
    arch = arch.split(":")[-1]
    if m := re.fullmatch(r"wrn_(\d+)_(\d+)", arch):
        return f"WRN-{m[1]}-{m[2]}"
    if m := re.fullmatch(r"(?:preact_)?resnet(\d+)", arch):
        return f"ResNet-{m[1]}"
    return arch


def _paper_table2_row(dataset: str, arch: str) -> Table2Row | None:
    arch = arch.split(":")[-1]
    for row1 in TABLE1:
        if row1.arch == arch and row1.dataset == dataset_name(dataset):
            return next((r for r in TABLE2 if (r.dataset, r.model) == (row1.dataset, row1.model)), None)
    return None


def _paper_table3_row(dataset: str, arch: str, shared: bool) -> Table3Row | None:
    arch = arch.split(":")[-1]
    return next(
        (
            r
            for r in TABLE3
            if r.arch == arch and r.dataset == dataset_name(dataset) and (r.policy is not None) == shared
        ),
        None,
    )


@dataclass
class Table2Entry:
    """One architecture trained both ways (paper Table 2), with the paper's figures where it has them."""

    original: Result
    shared: Result
    paper: Table2Row | None

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
    paper_shared: Table3Row | None
    paper_baseline: Table3Row | None

    @property
    def size_ratio(self) -> float:
        return self.baseline.params / self.shared.params

    def to_json(self) -> dict[str, Any]:
        def paper_json(r: Table3Row | None) -> dict[str, Any] | None:
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
