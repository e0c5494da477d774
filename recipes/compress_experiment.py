"""Compressing a trained network on a CPU: warm starts and distillation against training from scratch, on digits.

The digits of ``digits_experiment.py`` (scikit-learn's 1,797 8x8 images upsampled to 32x32 RGB, CIFAR-10 format,
1,347 train / 450 test), trained with ``train_cifar.py``:

1. the **teacher**: WRN-28-1 (369,498 parameters, mostly 3x3 convs, so deep budgets are reachable), unshared,
   trained with the WRN step schedule scaled to ``--teacher-epochs`` (its final weights, ``checkpoint-last``, are
   the trained original: the test set chooses nothing);
2. at each ``--budgets`` fraction of its parameters, policy ``imagenet`` with ``--scope all`` (every stride-1 3x3
   of a stage may share: the one setting of WRN-28-1 that reaches 0.3; the plan takes the least sharing within
   the budget), five settings, each trained for ``--epochs`` with the same short schedule (``--schedule
   finetune``: lr / 10, one epoch of warm-up, then a cosine to 0) and evaluated before the first step (epoch 0)
   and after every epoch:

   * ``a``: hard sharing, ``--init mean``, with KD (knowledge distillation from the teacher);
   * ``b``: soft sharing, ``--init svd`` with 2 templates per group (1 where 2 do not fit the budget), with KD;
   * ``c``: hard sharing with ``--allocate weights`` (the runs whose trained weights lose least), ``--init mean``,
     with KD;
   * ``d``: the same shared network as ``a`` from scratch (He init), without KD;
   * ``e``: the same from scratch, with KD.

Every student setting runs once per ``--seeds`` value (the data order and augmentation; the init too for ``d``
and ``e``); the teacher once. It prints "run k of N" with an ETA for the whole command, then writes the report
(``OUT/report``: ``compress.md``, a table per budget of each setting's accuracy at every epoch, and
``error_vs_params.png``, final error against unique parameters with the teacher's point), copied to ``--docs``
when given. Re-running continues: finished runs are kept, interrupted ones resumed.

    python recipes/compress_experiment.py --out runs/compress --docs docs/compress
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple

import digits_experiment  # the sibling recipe: the digits as CIFAR files, the scaled-down WRN schedule, the runs

from share_transform.figure import new_figure
from share_transform.fs import atomic_write
from share_transform.train import run_recipe
from share_transform.train.args import HelpFormatter
from share_transform.train.report import load_run
from share_transform.train.report.runs import Run

#: (key, label) of each student setting, in the order they are trained and tabulated.
SETTINGS: tuple[tuple[str, str], ...] = (
    ("a", "hard mean + KD"),
    ("b", "soft svd + KD"),
    ("c", "allocate weights + KD"),
    ("d", "scratch"),
    ("e", "scratch + KD"),
)
REPORT_FILE = "compress.md"
FIGURE_FILE = "error_vs_params.png"
#: How the students share: the policy and scope that reach every budget on WRN-28-1.
SHARING = ("--policy", "imagenet", "--scope", "all")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Warm starts and distillation against training from scratch, on scikit-learn's digits, on a CPU.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/compress"), help="data, runs and report go here")
    parser.add_argument("--arch", default="wrn_28_1", help="the teacher, and the network every student shares")
    parser.add_argument("--teacher-epochs", type=int, default=15, help="the teacher's epochs (WRN step schedule)")
    parser.add_argument("--epochs", type=int, default=4, help="every student's epochs (--schedule finetune)")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.3], help="fractions of the teacher's parameters"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run of each student per seed")
    parser.add_argument("--templates", type=int, default=2, help="soft sharing's templates per group, where they fit")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=0.1, help="the teacher's, per 128 images; students take a tenth")
    parser.add_argument("--docs", type=Path, default=None, help="also copy the report and its figure here")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    return parser


def soft_templates(args: argparse.Namespace, budget: float) -> int:
    """``--templates`` where that bank per group fits ``budget`` under :data:`SHARING`, else 1."""
    import share_transform
    from share_transform.errors import ShareOptionError

    model = share_transform.build_model(args.arch, num_classes=10)
    try:
        share_transform.plan(model, SHARING[1], scope=SHARING[3], budget=budget, templates=args.templates)
    except ShareOptionError:
        return 1
    return args.templates


def jobs(args: argparse.Namespace, data: Path, runs: Path) -> list[digits_experiment.Job]:
    """The teacher's run, then each budget's settings for each seed."""
    common = (*digits_experiment.experiment_argv(args, data), "--arch", args.arch)
    out = [
        digits_experiment.Job(
            runs / "teacher",
            f"{args.arch} teacher",
            (
                *common,
                "--no-share",
                "--epochs",
                str(args.teacher_epochs),
                "--lr",
                str(args.lr),
                "--lr-milestones",
                *map(str, digits_experiment.milestones(args.teacher_epochs)),
                "--seed",
                "0",
            ),
            args.teacher_epochs,
        )  # fmt: skip
    ]
    # Its final weights: the test set chooses nothing.
    original = ("--from-checkpoint", str(runs / "teacher" / "checkpoint-last.safetensors"))
    for budget in args.budgets:
        k = soft_templates(args, budget)
        flags = {
            "a": (*original, "--init", "mean", "--distill"),
            "b": (*original, "--templates", str(k), "--init", "svd", "--distill"),
            "c": (*original, "--init", "mean", "--allocate", "weights", "--distill"),
            "d": ("--evaluate-first",),
            "e": (*original, "--init", "fan_in", "--distill"),
        }
        for seed in args.seeds:
            for key, label in SETTINGS:
                out.append(
                    digits_experiment.Job(
                        runs / f"b{budget:g}-{key}-seed{seed}",
                        f"budget {budget:g}, {key} ({label}), seed {seed}",
                        (
                            *common,
                            *SHARING,
                            "--budget",
                            str(budget),
                            *flags[key],
                            "--schedule",
                            "finetune",
                            "--epochs",
                            str(args.epochs),
                            "--seed",
                            str(seed),
                        ),  # fmt: skip
                        args.epochs,
                    )
                )
    return out


def main(args: argparse.Namespace) -> None:
    data = args.out / "data"
    digits_experiment.digits_as_cifar(data)
    runs = args.out / "runs"
    digits_experiment.train_jobs(jobs(args, data, runs))
    report = write_report(args, runs)
    print(report)
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        for name in (REPORT_FILE, FIGURE_FILE):
            shutil.copyfile(args.out / "report" / name, args.docs / name)
    print(f"report: {args.out / 'report'}")


# ------------------------------------------------------------------------------------------------ the report


class Setting(NamedTuple):
    """One setting at one budget: its runs over seeds."""

    budget: float
    key: str
    label: str
    runs: tuple[Run, ...]

    @property
    def params(self) -> int:
        return self.runs[0].unique_params

    def accuracy(self, epoch: int) -> list[float]:
        """Each run's held-out top-1 accuracy (%) at ``epoch`` (0: before the first step)."""
        return [100.0 - m["val_top1_err"] for r in self.runs for m in r.metrics if m["epoch"] == epoch]

    def final_error(self) -> list[float]:
        return [float(r.final_test()) for r in self.runs]


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def collect(args: argparse.Namespace, runs: Path) -> tuple[Run, list[Setting]]:
    teacher = load_run(runs / "teacher")
    settings = []
    for budget in args.budgets:
        for key, label in SETTINGS:
            found = [runs / f"b{budget:g}-{key}-seed{seed}" for seed in args.seeds]
            done = tuple(load_run(p) for p in found if digits_experiment.finished(p, args.epochs))
            if done:
                settings.append(Setting(budget, key, label, done))
    return teacher, settings


def markdown(args: argparse.Namespace, teacher: Run, settings: list[Setting]) -> str:
    teacher_err = float(teacher.final_test())
    defaults = get_args_parser().parse_args([])
    reduced = [f for f in ("teacher_epochs", "epochs", "budgets", "seeds") if getattr(args, f) != getattr(defaults, f)]
    lines = [
        "# Compressing a trained WRN on digits: warm starts and distillation against training from scratch",
        "",
        *(
            [
                f"**A reduced run** (its {', '.join('--' + f.replace('_', '-') for f in reduced)} differ from the "
                "experiment's defaults): it shows that the command works, and its figures are no evidence.",
                "",
            ]
            if reduced
            else []
        ),
        f"Generated by `python recipes/compress_experiment.py` (`--teacher-epochs {args.teacher_epochs} --epochs "
        f"{args.epochs} --budgets {' '.join(f'{b:g}' for b in args.budgets)} --seeds "
        f"{' '.join(map(str, args.seeds))}`). Teacher: {args.arch}, {teacher.unique_params:,} parameters, "
        f"{_epochs(args.teacher_epochs)}, final test top-1 error {teacher_err:.2f}% (accuracy "
        f"{100 - teacher_err:.2f}%). Students: policy imagenet, scope all, the least sharing within each budget; "
        f"{_epochs(args.epochs)} of `--schedule finetune`. Accuracy is top-1 on the 450 test digits (one image is "
        "0.22 points), mean ± std over seeds; epoch 0 is before the first step.",
        "",
        "| budget | setting | unique parameters | "
        + " | ".join(f"epoch {e}" for e in range(args.epochs + 1))
        + " | final error % (per seed) | final error % |",
        "|---|---|--:|" + "--:|" * (args.epochs + 1) + "---|--:|",
    ]
    for s in settings:
        per_epoch = " | ".join(_mean_std(s.accuracy(e)) for e in range(args.epochs + 1))
        seeds = " / ".join(f"{v:.2f}" for v in s.final_error())
        lines.append(
            f"| {s.budget:g} | {s.key}: {s.label} | {s.params:,} ({s.params / teacher.unique_params:.3f}) | "
            f"{per_epoch} | {seeds} | {_mean_std(s.final_error())} |"
        )
    lines += ["", "Per budget, the lowest mean final error:", ""]
    for budget in args.budgets:
        at = [s for s in settings if s.budget == budget]
        if at:
            best = min(at, key=lambda s: statistics.fmean(s.final_error()))
            lines.append(
                f"* budget {budget:g}: {best.key} ({best.label}), {statistics.fmean(best.final_error()):.2f}% "
                f"against the teacher's {teacher_err:.2f}%"
            )
    lines += ["", f"![final error against unique parameters]({FIGURE_FILE})", ""]
    return "\n".join(lines)


def figure(teacher: Run, settings: list[Setting]) -> Any:
    """Final test error against unique parameters: one line per setting over the budgets, the teacher a star."""
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
    for i, (key, label) in enumerate(SETTINGS):
        points = sorted(
            (s.params / 1e3, statistics.fmean(s.final_error()), statistics.pstdev(s.final_error()))
            for s in settings
            if s.key == key
        )
        if points:
            x, y, err = zip(*points)
            ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=f"{key}: {label}")
    ax.plot(
        [teacher.unique_params / 1e3], [float(teacher.final_test())], marker="*", markersize=14, color="black",
        linestyle="none", label="teacher (unshared)",
    )  # fmt: skip
    ax.set(
        xlabel="unique parameters (thousands)", ylabel="test top-1 error (%)", title="Compressing WRN-28-1 on digits"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_report(args: argparse.Namespace, runs: Path) -> str:
    teacher, settings = collect(args, runs)
    text = markdown(args, teacher, settings)
    folder = args.out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / REPORT_FILE, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    fig = figure(teacher, settings)
    atomic_write(folder / FIGURE_FILE, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return text


if __name__ == "__main__":
    sys.exit(run_recipe(main, get_args_parser().parse_args()))
