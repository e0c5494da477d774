"""The sharing dial on real data, on a CPU: two residual nets at their sharing settings on scikit-learn's digits.

The digits of ``digits_experiment.py`` (1,797 8x8 images upsampled to 32x32 RGB, CIFAR-10 format, 1,347 train /
450 test), trained with ``train_cifar.py`` (the WRN protocol, epochs scaled down), three seeds per setting.

A wide ResNet (basic blocks: two 3x3s a block), at five settings:

* ``original``: no sharing;
* ``paper``: ShaResNet, policy ``cifar`` (blocks 2..n of a stage share their last 3x3);
* ``group2``: the same convs, shared in runs of two (``--group-size 2``);
* ``all``: both 3x3s of blocks 2..n share one weight per stage (``--scope all``; ``--scope block`` is the same
  on basic blocks);
* ``soft2``: the soft-sharing WRN, those convs mixing a bank of two templates (``--policy swrn --templates 2``).

A bottleneck ResNet (pre-activation, 1x1-3x3-1x1: two thirds of a block are its 1x1s), at four settings:

* ``original``: no sharing;
* ``last``: ShaResNet, policy ``cifar`` (blocks 2..n of a stage share their 3x3);
* ``block``: every conv of blocks 2..n shares with its peers of the stage (``--scope block``);
* ``block-soft2``: those convs mixing one bank of two templates per group (``--scope block --templates 2``).

WRN-28-1 is the smallest WRN on which the five differ (4 blocks a stage; WRN-22 has 3, where group size 2 is
the paper's sharing). The bottleneck net is a pre-act ResNet-38 (4 blocks a stage, the fewest where two
templates save parameters over three members) at base width 8 (stage outputs 32/64/128), which costs about
one WRN-28-1 step. It trains for 20 epochs (``--bottleneck-epochs``): at 8 the deep, thin net is still at
40-50% error, far from where the settings could be told apart; at 20 the original reaches about 2%. The
command prints "run k of N" with an ETA for all runs, then writes the report (``OUT/report``: Tables 2-3,
Figure 5 with one curve per architecture over its settings) and ``OUT/report/sharing.md``, a table of
settings per architecture. Re-running continues: finished runs are kept, interrupted ones resumed.

    python recipes/sharing_experiment.py --out runs/sharing --figure docs/sharing/figure5_error_vs_params.png
    python recipes/sharing_experiment.py --out /tmp/smoke --epochs 1 --bottleneck-epochs 1 --seeds 0  # smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import digits_experiment  # the sibling recipe: the digits as CIFAR files, the scaled-down schedule, the runs

from share_transform.build import check_model_kwargs
from share_transform.fs import atomic_write
from share_transform.train import run_recipe
from share_transform.train.args import HelpFormatter
from share_transform.train.errors import ConfigError
from share_transform.train.report import write_report
from share_transform.train.report.figures import FIGURE5_FILE
from share_transform.train.report.render import Report
from share_transform.train.report.results import paper_model_name

#: (name, flags) of each setting of the wide ResNet, in the order they are trained and tabulated.
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
#: (name, flags) of each setting of the bottleneck ResNet.
BOTTLENECK_SETTINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("original", ("--no-share",)),
    ("last", ("--share", "--policy", "cifar")),
    ("block", ("--share", "--policy", "cifar", "--scope", "block")),
    ("block-soft2", ("--share", "--policy", "cifar", "--scope", "block", "--templates", "2")),
)
TABLE_FILE = "sharing.md"


def _listed(settings: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    """``original (--no-share), paper (--share --policy cifar), ...`` for ``--help``."""
    return ", ".join(f"{name} ({' '.join(flags)})" for name, flags in settings)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="A WRN at five sharing settings (original, paper, group2, all, soft2) and a bottleneck ResNet at "
        "four (original, last, block, block-soft2: --scope block with and without --templates 2) on "
        "scikit-learn's digits (32x32, CIFAR format), three seeds each, on a CPU.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/sharing"), help="data, runs and report go here")
    parser.add_argument(
        "--arch", default="wrn_28_1", help=f"the WRN, trained at {len(SETTINGS)} settings: {_listed(SETTINGS)}"
    )
    parser.add_argument(
        "--bottleneck",
        default="preact_resnet38",
        help=f"the bottleneck ResNet, trained at {len(BOTTLENECK_SETTINGS)} settings: "
        f"{_listed(BOTTLENECK_SETTINGS)}; '' leaves it out",
    )
    parser.add_argument(
        "--bottleneck-kwargs",
        default='{"base_width": 8}',
        help="its constructor arguments, JSON (base width 8: stage outputs 32/64/128)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run of each setting per seed")
    parser.add_argument("--epochs", type=int, default=8, help="the WRN's; the WRN schedule's drops scale to them")
    parser.add_argument("--bottleneck-epochs", type=int, default=20, help="the bottleneck net's, scaled the same way")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=0.1, help="per 128 images, as train_cifar.py")
    parser.add_argument("--figure", type=Path, default=None, help="also copy the error-vs-parameters plot here")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    return parser


def settings_table(report: Report, arch: str) -> str:
    """Markdown: each setting's unique parameters, decrease and top-1 error per seed, most parameters first."""
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


def heading(arch: str, args: argparse.Namespace) -> str:
    """The table heading of one architecture: its paper name, and the constructor arguments it was given."""
    name = paper_model_name(arch)
    if arch != args.bottleneck:
        return name
    kwargs = json.loads(args.bottleneck_kwargs)
    given = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in kwargs.items())
    return f"{name} (pre-act bottleneck{', ' + given if given else ''})"


def main(args: argparse.Namespace) -> None:
    if args.bottleneck:  # before any training: a typo here would otherwise stop the command after the WRN runs
        try:
            check_model_kwargs(json.loads(args.bottleneck_kwargs), where="--bottleneck-kwargs", error=ConfigError)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--bottleneck-kwargs is not JSON ({e}): {args.bottleneck_kwargs!r}") from None
    data_root = args.out / "data"
    digits_experiment.digits_as_cifar(data_root)
    archs = [(args.arch, SETTINGS, [], args.epochs)]
    if args.bottleneck:
        extra = ["--model-kwargs", args.bottleneck_kwargs]
        archs.append((args.bottleneck, BOTTLENECK_SETTINGS, extra, args.bottleneck_epochs))
    common = digits_experiment.experiment_argv(args, data_root)
    jobs = [
        digits_experiment.Job(
            args.out / "runs" / f"{arch}-{name}-seed{seed}",
            f"{arch} {name}, seed {seed}",
            (
                *common,
                "--arch",
                arch,
                *flags,
                *extra,
                "--epochs",
                str(epochs),
                "--lr",
                str(args.lr),
                "--lr-milestones",
                *map(str, digits_experiment.milestones(epochs)),
                "--seed",
                str(seed),
            ),  # fmt: skip
            epochs,
        )
        for arch, settings, extra, epochs in archs
        for seed in args.seeds
        for name, flags in settings
    ]
    digits_experiment.train_jobs(jobs)
    report = write_report([args.out / "runs"], args.out / "report")
    table = "\n".join(f"### {heading(arch, args)}\n\n{settings_table(report, arch)}" for arch, *_ in archs)
    atomic_write(args.out / "report" / TABLE_FILE, lambda tmp: Path(tmp).write_text(table, encoding="utf-8"))
    print(table)
    if args.figure is not None:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "report" / FIGURE5_FILE, args.figure)
    print(f"report: {args.out / 'report'}")


if __name__ == "__main__":
    sys.exit(run_recipe(main, get_args_parser().parse_args()))
