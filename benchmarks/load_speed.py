"""How fast is ``share_transform.load``? The meta-device path against the old build + random init + copy.

Both variants read the same ResNet-152 ShaResNet file and return an equal, tied model; they alternate in
one process so that the machine's drift hits both alike:

* ``old``: ``build_model`` (random init of every weight), ``apply`` the recorded plan, copy the file in;
* ``meta``: ``share_transform.load`` (build on the meta device, check against the header, ``to_empty`` +
  ``retie``, copy the file in).

    python benchmarks/load_speed.py --threads 1 [--repeats 7] [--model resnet152]

Prints medians with min-max, and the ratio meta / old.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

import share_transform as st
from share_transform.checkpoints import load_checkpoint
from share_transform.files import read_info


def load_old(path: Path) -> nn.Module:
    """``load`` as it was: a full build with random init, tied, then every tensor copied over the init."""
    info = read_info(path)
    assert info.build is not None and info.plan is not None
    model = st.build_model(info.build["name"], source=info.build["source"], **info.build["kwargs"])
    st.apply(model, plan=info.plan)
    return load_checkpoint(model, path)


def timed(fn: Callable[[Path], nn.Module], path: Path) -> tuple[float, nn.Module]:
    start = time.perf_counter()
    model = fn(path)
    return time.perf_counter() - start, model


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):6.2f} s (min {min(times):.2f}, max {max(times):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet152")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.model}, {args.repeats} repeats"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = st.save(st.apply(st.build_model(args.model)), Path(tmp) / "model.safetensors")
        print(f"file {path.stat().st_size / 1e6:.0f} MB")
        times: dict[str, list[float]] = {"old": [], "meta": []}
        variants = {"old": load_old, "meta": st.load}
        for _ in range(args.repeats):
            models = {}
            for name, fn in variants.items():
                seconds, models[name] = timed(fn, path)
                times[name].append(seconds)
            # Same result: every tensor equal, ties kept.
            a, b = models["old"].state_dict(), models["meta"].state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert st.is_tied(models["meta"])
    for name in variants:
        print(f"{name:5s} {summary(times[name])}")
    print(f"ratio meta/old {statistics.median(times['meta']) / statistics.median(times['old']):.3f}")


if __name__ == "__main__":
    main()
