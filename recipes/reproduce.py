"""Reproduce the ShaResNet paper's experiments: the runs to train, and the tables and figures from them.

    # 1. the training commands of every run in the paper's Tables 2 and 3 (one line each, three seeds):
    python recipes/reproduce.py --commands --data ~/data --imagenet /data/imagenet --seeds 0 1 2
    # 2. after (some of) them ran: Tables 2 and 3 beside the paper's figures, Figures 4 and 5
    python recipes/reproduce.py runs/ --out report/

The report (``report.md``, ``report.json``, ``figure4_curves.png``, ``figure5_error_vs_params.png``) takes any
run directories of ``train_cifar.py`` and ``train_imagenet.py``; see :mod:`share_transform.train.report`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from share_transform import paper
from share_transform.train import run_recipe
from share_transform.train.args import HelpFormatter
from share_transform.train.report import write_report

_DATASETS = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "ImageNet": "imagenet"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tables 2-3 and Figures 4-5 of the ShaResNet paper from run directories, or the runs to train.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("runs", nargs="*", type=Path, help="run directories, or folders holding them")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where the report is written")
    g = parser.add_argument_group("--commands: print the paper's runs instead")
    g.add_argument("--commands", action="store_true", help="print one training command per run of the paper")
    g.add_argument("--data", default="data", help="CIFAR root for the printed commands")
    g.add_argument("--imagenet", default="/data/imagenet", help="ImageNet root for the printed commands")
    g.add_argument("--runs-dir", default="runs", help="parent of the printed commands' --output")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one command per run and seed")
    return parser


def paper_runs() -> list[tuple[str, str, bool]]:
    """``(dataset, arch, share)`` of every network the paper trained: Table 1's pairs and Table 3's baselines."""
    runs = [(_DATASETS[r.dataset], r.arch, share) for r in paper.TABLE1 for share in (False, True)]
    runs += [(_DATASETS[r.dataset], r.arch, False) for r in paper.TABLE3 if r.policy is None]
    return runs


def training_commands(args: argparse.Namespace) -> list[str]:
    lines = []
    for seed in args.seeds:
        for dataset, arch, share in paper_runs():
            kind = "shared" if share else "original"
            if dataset == "imagenet":
                head = f"python recipes/train_imagenet.py --data {args.imagenet}"
            else:
                head = f"python recipes/train_cifar.py --dataset {dataset} --data {args.data}"
            lines.append(
                f"{head} --arch {arch} {'--share' if share else '--no-share'} --seed {seed} "
                f"--output {args.runs_dir}/{dataset}/{arch}-{kind}-seed{seed}"
            )
    return lines


def main(args: argparse.Namespace) -> None:
    if args.commands:
        print("\n".join(training_commands(args)))
        return
    report = write_report(args.runs or [Path(args.runs_dir)], args.out)
    print(report.markdown())
    print(f"written to {args.out}/")


if __name__ == "__main__":
    sys.exit(run_recipe(main, get_args_parser().parse_args()))
