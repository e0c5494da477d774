"""How fast is the pass? plan+apply against ``timm.create_model``, alternately in one process, in CPU time.

Each repeat builds the model, then shares it; the figures are medians (min-max) of process CPU time, which
a busy shared machine skews far less than wall time. Target: plan+apply at 0.15x of create_model or less for
ResNet-152. The training-step comparison (shared against original) is ``benchmarks/train_throughput.py``.

``--compress`` times the two passes that read the weights, on ResNet-152, each against a ``create_model`` of
its own in the same repeat (the variants alternate): the ``svd`` warm start (plan + apply with 2 templates,
``init="svd"``) and ``allocate="weights"`` (plan with a budget of 0.75 + apply with ``init="mean"``). Target:
both under 1x create_model. The weights are create_model's random init: the arithmetic does not depend on them.

    python benchmarks/apply_speed.py [--repeats 5] [--threads 1] [--compress]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import timm
import torch

import share_transform as st


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(CPU seconds, result) of ``fn(*args)``."""
    start = time.process_time()
    result = fn(*args)
    return time.process_time() - start, result


def pass_speed(name: str, repeats: int) -> float:
    """Print create_model and plan+apply CPU ms for ``name``; return the ratio of their medians."""
    create, share = [], []
    for _ in range(repeats):
        seconds, model = timed(timm.create_model, name)
        create.append(seconds)
        share.append(timed(st.apply, model)[0])
    c, s = statistics.median(create), statistics.median(share)
    print(
        f"{name:10s} create_model {c * 1000:7.1f} ms ({min(create) * 1000:.0f}-{max(create) * 1000:.0f})   "
        f"plan+apply {s * 1000:6.1f} ms ({min(share) * 1000:.0f}-{max(share) * 1000:.0f})   ratio {s / c:.3f}"
    )
    return s / c


def compress_speed(name: str, repeats: int) -> None:
    """Print each weight-reading pass's CPU ms and its ratio to create_model, the variants alternating."""
    variants: dict[str, Callable[[Any], Any]] = {
        "svd warm start (templates 2)": lambda m: st.apply(m, templates=2, init="svd"),
        "allocate weights (budget 0.75)": lambda m: st.apply(m, budget=0.75, allocate="weights", init="mean"),
    }
    create: dict[str, list[float]] = {k: [] for k in variants}
    run: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for label in order:
            seconds, model = timed(timm.create_model, name)
            create[label].append(seconds)
            run[label].append(timed(variants[label], model)[0])
            del model
    for label in variants:
        c, s = statistics.median(create[label]), statistics.median(run[label])
        print(
            f"{name} {label:31s} {s * 1000:7.1f} ms ({min(run[label]) * 1000:.0f}-{max(run[label]) * 1000:.0f})   "
            f"create_model {c * 1000:7.1f} ms ({min(create[label]) * 1000:.0f}-{max(create[label]) * 1000:.0f})"
            f"   ratio {s / c:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--compress", action="store_true", help="time the svd warm start and allocate='weights'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), CPU time"
    )
    st.apply(timm.create_model("resnet18"))  # first-call imports outside the timing
    if args.compress:
        st.apply(timm.create_model("resnet18"), templates=2, init="svd")
        compress_speed("resnet152", args.repeats)
        return
    for name in ("resnet50", "resnet152"):
        pass_speed(name, args.repeats)


if __name__ == "__main__":
    main()
