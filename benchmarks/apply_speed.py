"""How fast is the pass? plan+apply against ``timm.create_model``, medians of repeats in one process.

Target: plan+apply below 0.5x of create_model for resnet50 and resnet152. The training-step comparison
(shared against original) is ``benchmarks/train_throughput.py``.

    python benchmarks/apply_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch

import share_transform as st


def timed(fn, *args):
    """(seconds, result) of ``fn(*args)``."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def pass_speed(name: str, repeats: int) -> None:
    create, share = [], []
    for _ in range(repeats):
        seconds, model = timed(timm.create_model, name)
        create.append(seconds)
        share.append(timed(st.apply, model)[0])
    c, s = statistics.median(create), statistics.median(share)
    print(f"{name:10s} create_model {c * 1000:8.1f} ms   plan+apply {s * 1000:7.1f} ms   ratio {s / c:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in ("resnet50", "resnet152"):
        pass_speed(name, args.repeats)


if __name__ == "__main__":
    main()
