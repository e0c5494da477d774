"""The sharing dial on real data, on a CPU: one WRN trained at five sharing settings on scikit-learn's digits.

The digits of ``digits_experiment.py`` (1,797 8x8 images upsampled to 32x32 RGB, CIFAR-10 format, 1,347 train /
450 test), trained with ``train_cifar.py`` (the WRN protocol, epochs scaled down), three seeds per setting:

* ``original``: no sharing;
* ``paper``: ShaResNet, policy ``cifar`` (blocks 2..n of a stage share their last 3x3);
* ``group2``: the same convs, shared in runs of two (``--group-size 2``);
* ``all``: both 3x3s of blocks 2..n share one weight per stage (``--scope all``);
* ``soft2``: the soft-sharing WRN, those convs mixing a bank of two templates (``--policy swrn --templates 2``).

WRN-28-1 is the smallest WRN on which the five differ (4 blocks a stage; WRN-22 has 3, where group size 2 is
the paper's sharing). It prints "run k of N" with an ETA for the whole command, then writes the report
(``OUT/report``: Tables 2-3, Figure 5 with the architecture's curve over its settings) and ``OUT/report/
sharing.md``, the table of settings. Re-running continues: finished runs are kept, interrupted ones resumed.

    python recipes/sharing_experiment.py --out runs/sharing --figure docs/sharing/figure5_error_vs_params.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import digits_experiment  # the sibling recipe: the digits as CIFAR files, the scaled-down schedule
import train_cifar

from share_transform.fs import atomic_write
from share_transform.train import run_recipe
from share_transform.train.args import HelpFormatter
from share_transform.train.checkpoint import has_checkpoint
from share_transform.train.metrics import RUN_FILE
from share_transform.train.report import load_run, write_report
from share_transform.train.report.figures import FIGURE5_FILE
from share_transform.train.report.render import Report

#: (name, flags) of each setting, in the order they are trained and tabulated.
SETTINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("original", ("--no-share",)),
    ("paper", ("--share", "--policy", "cifar")),
    ("group2", ("--share", "--policy", "cifar", "--group-size", "2")),
    ("all", ("--share", "--policy", "cifar", "--scope", "all")),
    # The soft-sharing layout, trained with the same protocol as the other settings (not swrn's defaults: Cutout,
    # zero padding, a held-out split, He classifier), so that the sharing is the one thing that differs.
    (
        "soft2",
        ("--share", "--policy", "swrn", "--templates", "2", "--val-split", "0", "--cutout", "0", "--pad", "reflect")
        + ("--classifier-init", "uniform"),
    ),
)
TABLE_FILE = "sharing.md"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="One WRN at five sharing settings on scikit-learn's digits (32x32, CIFAR format), on a CPU.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/sharing"), help="data, runs and report go here")
    parser.add_argument("--arch", default="wrn_28_1", help="the WRN trained at every setting")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run of each setting per seed")
    parser.add_argument("--epochs", type=int, default=8, help="the WRN schedule's drops scale to them")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=0.1, help="per 128 images, as train_cifar.py")
    parser.add_argument("--figure", type=Path, default=None, help="also copy the error-vs-parameters plot here")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    return parser


def settings_table(report: Report, arch: str) -> str:
    """Markdown: each setting's unique parameters, decrease and top-1 error per seed, in :data:`SETTINGS` order."""
    results = {r.label: r for r in report.results if r.config.arch == arch}
    original = next((r for r in results.values() if not r.config.share), None)
    lines = [
        "| setting | unique parameters | decrease | top-1 error % (per seed) | mean ± std |",
        "|---|--:|--:|---|--:|",
    ]
    for r in sorted(results.values(), key=lambda r: -r.params):
        decrease = f"{100 * (1 - r.params / original.params):.1f}%" if original else "-"
        seeds = " / ".join(f"{v:.2f}" for v in r.top1.values)
        lines.append(f"| {r.label} | {r.params:,} | {decrease} | {seeds} | {r.top1} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    data_root = args.out / "data"
    digits_experiment.digits_as_cifar(data_root)
    plan = [(seed, name, flags) for seed in args.seeds for name, flags in SETTINGS]
    start, trained = time.monotonic(), 0
    for k, (seed, name, flags) in enumerate(plan, start=1):
        output = args.out / "runs" / f"{args.arch}-{name}-seed{seed}"
        if (output / RUN_FILE).exists():
            done = load_run(output)
            if done.complete and done.epochs == args.epochs:
                print(f"run {k} of {len(plan)}: {name}, seed {seed}: done before", flush=True)
                continue
        # The ETA assumes the runs still to go take as long as the ones this command trained so far.
        eta = (time.monotonic() - start) / trained * (len(plan) - k + 1) if trained else None
        print(
            f"run {k} of {len(plan)}: {args.arch} {name}, seed {seed}; ETA for all runs "
            + (f"{eta / 60:.1f} min" if eta is not None else "after the first run"),
            flush=True,
        )
        argv = [
            "--dataset", "cifar10", "--dataset-name", "digits", "--data", str(data_root),
            "--preprocess", "meanstd", "--no-hflip", "--arch", args.arch, *flags,
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--lr-milestones", *map(str, digits_experiment.milestones(args.epochs)), "--seed", str(seed),
            "--workers", str(args.workers), "--device", args.device, "--output", str(output),
            "--amp" if args.device == "cuda" else "--no-amp",  # one precision for every setting
        ]  # fmt: skip
        if has_checkpoint(output, "last"):
            argv.append("--resume")
        train_cifar.main(train_cifar.get_args_parser().parse_args(argv))
        trained += 1
    print(f"trained {trained} runs in {(time.monotonic() - start) / 60:.1f} min")
    report = write_report([args.out / "runs"], args.out / "report")
    table = settings_table(report, args.arch)
    atomic_write(args.out / "report" / TABLE_FILE, lambda tmp: Path(tmp).write_text(table, encoding="utf-8"))
    print(table)
    if args.figure is not None:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "report" / FIGURE5_FILE, args.figure)
    print(f"report: {args.out / 'report'}")


if __name__ == "__main__":
    sys.exit(run_recipe(main, get_args_parser().parse_args()))
