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

from .figures import FIGURE4_FILE, FIGURE5_FILE, plot_figure4, plot_figure5
from .render import REPORT_JSON, REPORT_MD, Report, build_report, write_report
from .results import (
    EQUAL_SIZE_TOLERANCE,
    Config,
    Result,
    Stat,
    Table2Entry,
    Table3Entry,
    dataset_name,
    group_results,
    paper_model_name,
    table2,
    table3,
)
from .runs import Run, find_runs, load_run

__all__ = [
    "Config",
    "EQUAL_SIZE_TOLERANCE",
    "FIGURE4_FILE",
    "FIGURE5_FILE",
    "REPORT_JSON",
    "REPORT_MD",
    "Report",
    "ReportError",
    "Result",
    "Run",
    "Stat",
    "Table2Entry",
    "Table3Entry",
    "build_report",
    "dataset_name",
    "find_runs",
    "group_results",
    "load_run",
    "paper_model_name",
    "plot_figure4",
    "plot_figure5",
    "table2",
    "table3",
    "write_report",
]
