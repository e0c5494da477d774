"""A real ShaResNet experiment that runs on a CPU in minutes: scikit-learn's digits, WRN shared vs original.

The paper's CIFAR comparisons in small: scikit-learn's 1,797 handwritten digits (8x8, shipped inside the
package, no download), upsampled to 32x32 RGB and written in the CIFAR-10 python format, then trained with
``train_cifar.py`` (the paper's WRN protocol, epochs scaled down) for several seeds:

* WRN-28-1 original and WRN-28-1 shared (policy "cifar": blocks 2-4 of each stage share one 3x3 conv),
  the pair of Table 2;
* WRN-22-1 original, a shallower net with as many parameters as the shared WRN-28-1 (272,282 against
  272,730), the comparison of Table 3 (the paper's WRN-28-10 Share against WRN-22-10).

Then the report: Tables 2 and 3 (markdown and JSON) and Figures 4 and 5 in ``OUT/report``.

    python recipes/digits_experiment.py --out runs/digits

Digits are not mirror-symmetric, so training augments with pad-and-crop only (``meanstd``, no flips).
Re-running continues: finished runs are kept, interrupted ones resumed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import train_cifar  # the sibling recipe (this script's folder is on sys.path when run as a script)

try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError as e:  # one line and exit status 2, as every bad set-up of the recipes
    print(f"error: the digits come with scikit-learn ({e}): pip install 'share-transform[train]'", file=sys.stderr)
    raise SystemExit(2) from None

from share_transform.train import run_recipe
from share_transform.train.args import HelpFormatter
from share_transform.train.checkpoint import has_checkpoint
from share_transform.train.data import write_cifar
from share_transform.train.metrics import RUN_FILE
from share_transform.train.report import load_run, write_report

#: Fraction of the 1,797 digits held out for testing (450 images), stratified by class.
TEST_FRACTION = 0.25
SPLIT_SEED = 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="ShaResNet against ResNet on scikit-learn's digits (32x32, CIFAR format), on a CPU.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="data, runs and report go here")
    parser.add_argument("--arch", default="wrn_28_1", help="trained shared and original")
    parser.add_argument("--baseline", default="wrn_22_1", help="shallower original of about the shared size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run of each network per seed")
    parser.add_argument("--epochs", type=int, default=10, help="the WRN schedule's drops scale to them")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=0.1, help="per 128 images, as train_cifar.py")
    parser.add_argument("--preprocess", default="meanstd", choices=("meanstd", "zca"), help="as train_cifar.py")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    return parser


def digits_as_cifar(root: Path) -> Path:
    """Write the digits, 8x8 in [0, 16] upsampled to 32x32 RGB uint8, as CIFAR-10 files under ``root``."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float()[:, None] / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    rgb = (images * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    train_idx, test_idx = train_test_split(
        np.arange(len(rgb)), test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    return write_cifar(
        root,
        "cifar10",
        (rgb[train_idx], digits.target[train_idx]),
        (rgb[test_idx], digits.target[test_idx]),
        classes=[str(d) for d in range(10)],
    )


def milestones(epochs: int) -> list[int]:
    """The WRN schedule's drops (60, 120, 160 of 200 epochs) at the same fractions of ``epochs``."""
    return sorted({max(1, round(epochs * f)) for f in (0.3, 0.6, 0.8)})


def finished(output: Path, epochs: int) -> bool:
    """``output`` holds a complete run of ``epochs`` epochs."""
    if not (output / RUN_FILE).exists():
        return False
    done = load_run(output)
    return done.complete and done.epochs == epochs


def experiment_argv(args: argparse.Namespace, data: Path) -> list[str]:
    """The ``train_cifar.py`` flags every run of the sharing and compression experiments shares."""
    return [
        "--dataset", "cifar10", "--dataset-name", "digits", "--data", str(data), "--preprocess", "meanstd",
        "--no-hflip", "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
        "--amp" if args.device == "cuda" else "--no-amp",  # one precision for every run
    ]  # fmt: skip


class Job(NamedTuple):
    """One training run of an experiment."""

    output: Path  # its run directory
    what: str  # for the progress line
    argv: tuple[str, ...]  # the train_cifar.py flags, --output and --resume left out
    epochs: int  # for the ETA: the time of a run is about proportional to its epochs


def train_jobs(jobs: Sequence[Job]) -> None:
    """Train each job not finished before (resuming an interrupted one), printing "run k of N" and an ETA."""
    left = sum(job.epochs for job in jobs if not finished(job.output, job.epochs))
    start, trained_epochs, trained = time.monotonic(), 0, 0
    for k, job in enumerate(jobs, start=1):
        if finished(job.output, job.epochs):
            print(f"run {k} of {len(jobs)}: {job.what}: done before", flush=True)
            continue
        # The ETA assumes an epoch still to go takes as long as the epochs this command trained so far.
        eta = (time.monotonic() - start) / trained_epochs * left if trained_epochs else None
        print(
            f"run {k} of {len(jobs)}: {job.what}; ETA for all runs "
            + (f"{eta / 60:.1f} min" if eta is not None else "after the first run"),
            flush=True,
        )
        argv = [*job.argv, "--output", str(job.output)]
        if has_checkpoint(job.output, "last"):
            argv.append("--resume")
        train_cifar.main(train_cifar.get_args_parser().parse_args(argv))
        trained_epochs += job.epochs
        left -= job.epochs
        trained += 1
    print(f"trained {trained} runs in {(time.monotonic() - start) / 60:.1f} min")


def main(args: argparse.Namespace) -> None:
    data_root = args.out / "data"
    digits_as_cifar(data_root)
    configs = [(args.arch, True), (args.arch, False), (args.baseline, False)]
    for seed in args.seeds:
        for arch, share in configs:
            output = args.out / "runs" / f"{arch}-{'shared' if share else 'original'}-seed{seed}"
            if finished(output, args.epochs):
                continue
            argv = [
                "--dataset", "cifar10", "--dataset-name", "digits", "--data", str(data_root),
                "--preprocess", args.preprocess, "--no-hflip", "--arch", arch,
                "--share" if share else "--no-share", "--epochs", str(args.epochs),
                "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                "--lr-milestones", *map(str, milestones(args.epochs)), "--seed", str(seed),
                "--workers", str(args.workers), "--device", args.device, "--output", str(output)
            ]  # fmt: skip
            if has_checkpoint(output, "last"):
                argv.append("--resume")
            train_cifar.main(train_cifar.get_args_parser().parse_args(argv))
    report = write_report([args.out / "runs"], args.out / "report")
    print(report.markdown())
    print(f"report: {args.out / 'report'}")


if __name__ == "__main__":
    sys.exit(run_recipe(main, get_args_parser().parse_args()))
