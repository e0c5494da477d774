"""Has the pass or ``load`` slowed down against another revision? Both revisions in one process, alternated.

The other revision's package is copied into a temporary directory under the name ``share_transform_base``
(every ``share_transform`` in its sources renamed), so that both import side by side, and each round times, in
an order reversed every other round:

* ``apply``: ``timm.create_model(--model)``, then ``apply`` of each revision on its own fresh model;
* ``load``: each revision's ``load`` of the file its own ``save`` wrote (the same model, shared by default).

Each variant is called ``--inner`` times a round and the least time counts: on a shared machine the noise only
ever adds time, and the per-round medians of single calls swung by +-5% between runs of 41 rounds.

Every timed call starts after ``gc.collect()`` (as timeit's do), in process CPU time, with the machine's drift
hitting both revisions alike. Both packages register the same timm model names: timm's warnings about
overwriting them are silenced.

    git worktree add /tmp/base dcb9bf7
    python benchmarks/against_revision.py --base /tmp/base [--model resnet152] [--rounds 15] [--inner 3] [--threads 1]

Prints each variant's median (min-max) and, per round, head/base as median (min-max): 1.05 means the head is
5% slower.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

import share_transform as head


def import_as_base(checkout: Path, tmp: Path) -> Any:
    """The package of ``checkout``, imported as ``share_transform_base`` from a renamed copy under ``tmp``."""
    target = tmp / "share_transform_base"
    shutil.copytree(checkout / "share_transform", target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(re.sub(r"\bshare_transform\b", "share_transform_base", text), encoding="utf-8")
    sys.path.insert(0, str(tmp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm: "Overwriting sharesnet50 in registry ..."
        return importlib.import_module("share_transform_base")


def timed(fn: Callable[..., Any], *args: Any) -> float:
    gc.collect()
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


def summary(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the revision to compare against")
    parser.add_argument("--model", default="resnet152")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=3, help="calls per variant and round; the least counts")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = import_as_base(args.base.resolve(), Path(tmp))
        packages = {"base": base, "head": head}
        print(
            f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} thread(s), {args.model}, {args.rounds} rounds; base {args.base}"
        )
        files = {}
        for name, st in packages.items():
            files[name] = Path(tmp) / f"{name}.safetensors"
            st.save(st.apply(st.build_model(args.model)), files[name])
        times: dict[str, dict[str, list[float]]] = {"apply": {}, "load": {}}
        for r in range(args.rounds):
            order = list(packages) if r % 2 == 0 else list(reversed(list(packages)))
            for name in order:
                st = packages[name]
                # The least of --inner calls: what the code costs, with the least of the machine's noise on it.
                apply_s = min(timed(st.apply, timm.create_model(args.model)) for _ in range(args.inner))
                times["apply"].setdefault(name, []).append(apply_s)
                times["load"].setdefault(name, []).append(min(timed(st.load, files[name]) for _ in range(args.inner)))
        for key, by_name in times.items():
            per_round = [h / b for h, b in zip(by_name["head"], by_name["base"])]
            print(
                f"{key:5s} base {summary(by_name['base'], 1000, 1)} ms   head {summary(by_name['head'], 1000, 1)} ms"
                f"   head/base per round {summary(per_round)}"
            )


if __name__ == "__main__":
    main()
