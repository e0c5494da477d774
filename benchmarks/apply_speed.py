"""How fast is the pass, and does sharing slow training? Medians of repeats, side by side in one process.

1. plan+apply time against ``timm.create_model`` time, for resnet50 and resnet152
   (target: plan+apply below 0.5x of create_model).
2. training-step time (forward, backward, SGD step) of the shared against the original resnet50 at
   batch 16, 128x128, on this machine's CPU (target: ratio <= 1.00 within noise: same FLOPs, fewer
   parameters to update). The two models alternate step by step so drifts in machine load hit both.

    python benchmarks/apply_speed.py [--repeats 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
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


def train_step_speed(steps: int, batch: int, size: int) -> None:
    torch.manual_seed(0)
    original = timm.create_model("resnet50")
    shared = st.apply(copy.deepcopy(original))
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    runs = {}
    for label, model in (("original", original), ("shared", shared)):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        runs[label] = (model, opt, [])

    def step(model, opt) -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for model, opt, _ in runs.values():  # warm-up
        step(model, opt)
    for _ in range(steps):
        for model, opt, times in runs.values():
            times.append(timed(step, model, opt)[0])
    o = statistics.median(runs["original"][2])
    s = statistics.median(runs["shared"][2])
    print(
        f"resnet50 train step b{batch} {size}x{size}: original {o * 1000:.0f} ms   shared {s * 1000:.0f} ms   "
        f"ratio shared/original {s / o:.3f}   (median of {steps})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in ("resnet50", "resnet152"):
        pass_speed(name, args.repeats)
    train_step_speed(args.steps, args.batch, args.size)


if __name__ == "__main__":
    main()
