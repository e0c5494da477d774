"""How fast is ``share_transform.load``? Its header schema against no schema, and the meta-device path against the old
build + random init + copy.

Every variant reads the same ResNet-152 ShaResNet file and returns an equal, tied model; they alternate in one
process so that the machine's drift hits them alike:

* ``meta``: ``share_transform.load`` as shipped (the safetensors library reads the header, the schema of
  ``share_transform.header`` checks it against the tensors, the model is built on the meta device, checked,
  ``to_empty`` + ``retie``, the file copied in);
* ``noschema``: the same ``load`` with the schema's checks replaced by bare parsing (``SharePlan.from_dict``, no
  type, range or tensor checks): what the schema costs;
* ``old``: ``build_model`` (random init of every weight), ``apply`` the recorded plan, copy the file in.

    python benchmarks/load_speed.py --threads 1 [--repeats 7] [--model resnet152] [--variants meta noschema old]

Prints each variant's median time with min-max, and per repeat the ratio of each variant to ``meta``, loaded back
to back, as median (min-max).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import share_transform as st
import share_transform.header as header
from share_transform.checkpoints import load_checkpoint
from share_transform.files import read_info
from share_transform.planning import SharePlan


def load_old(path: Path) -> nn.Module:
    """``load`` as it was: a full build with random init, tied, then every tensor copied over the init."""
    info = read_info(path)
    assert info.build is not None and info.plan is not None
    model = st.build_model(info.build["name"], source=info.build["source"], **info.build["kwargs"])
    st.apply(model, plan=info.plan)
    return load_checkpoint(model, path)


@contextlib.contextmanager
def no_schema() -> Iterator[None]:
    """The header parsed without the schema: the plan from ``from_dict`` alone, no checks against the tensors."""
    saved = header.check_plan, header.check_plan_tensors, header._tensor_shapes

    def plan_only(value: Any) -> SharePlan:
        return SharePlan.from_dict(value)

    header.check_plan = plan_only  # type: ignore[assignment]
    header.check_plan_tensors = lambda *args: None  # type: ignore[assignment]
    header._tensor_shapes = lambda *args: None  # type: ignore[assignment]
    try:
        yield
    finally:
        header.check_plan, header.check_plan_tensors, header._tensor_shapes = saved


def load_noschema(path: Path) -> nn.Module:
    with no_schema():
        return st.load(path)


def timed(fn: Callable[[Path], nn.Module], path: Path) -> tuple[float, nn.Module]:
    start = time.perf_counter()
    model = fn(path)
    return time.perf_counter() - start, model


def summary(values: list[float], unit: str = " s") -> str:
    return f"{statistics.median(values):6.3f}{unit} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet152")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    names = ["meta", "noschema", "old"]
    parser.add_argument("--variants", nargs="+", default=names, choices=names)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {args.model}, {args.repeats} repeats"
    )
    every = {"meta": st.load, "noschema": load_noschema, "old": load_old}
    variants = {name: every[name] for name in dict.fromkeys(["meta", *args.variants])}
    with tempfile.TemporaryDirectory() as tmp:
        path = st.save(st.apply(st.build_model(args.model)), Path(tmp) / "model.safetensors")
        print(f"file {path.stat().st_size / 1e6:.0f} MB")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            models = {}
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))  # neither always goes first
            for name in order:
                seconds, models[name] = timed(variants[name], path)
                times[name].append(seconds)
            # Same result: every tensor equal, ties kept.
            reference = models["meta"].state_dict()
            for model in models.values():
                state = model.state_dict()
                assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
            assert st.is_tied(models["meta"])
    for name in variants:
        print(f"{name:9s} {summary(times[name])}")
    for name in variants:
        if name != "meta":
            ratios = [m / o for m, o in zip(times["meta"], times[name])]
            print(f"ratio meta/{name} {summary(ratios, '')}")


if __name__ == "__main__":
    main()
