"""Sweep share_transform.plan over the residual CNN families of timm and torchvision, at every scope.

Models are built on the meta device (no memory, no init time), so every family, the 900 M-parameter models
included, plans in a few minutes on a laptop CPU. Each model is traced once and planned at scopes "last",
"all" and "block" (policy imagenet, the whole stage, hard sharing). The summary gives, per family, the
models, how many plan, and the decrease of unique parameters at "last" and at "block"; a model that gets
nothing is listed with the reason.

    python benchmarks/sweep.py                       # markdown summary on stdout
    python benchmarks/sweep.py --json out.json       # and every row as JSON
    python benchmarks/sweep.py --family ConvNeXt     # one family (repeatable)
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import share_transform as st
from share_transform.build import list_model_names

SCOPES = ("last", "all", "block")

#: family -> (source, name patterns); a model belongs to the first family whose patterns match it.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ResNet-D": ("timm", ("resnet[0-9]*d",)),
    "ResNet": ("timm", ("resnet[0-9]*",)),
    "ResNet v2 (pre-act, BiT)": ("timm", ("resnetv2*",)),
    "ResNet-RS, blur, AA": ("timm", ("resnetrs*", "resnetblur*", "resnetaa*")),
    "Wide ResNet": ("timm", ("wide_resnet*",)),
    "ResNeXt": ("timm", ("resnext*",)),
    "SE-ResNet, SE-ResNeXt": ("timm", ("seresnet*", "seresnext*")),
    "ECA, SK, GC ResNet": ("timm", ("ecaresnet*", "skresnet*", "gcresnet*")),
    "Res2Net": ("timm", ("res2net*", "res2next*")),
    "RegNetX": ("timm", ("regnetx*",)),
    "RegNetY": ("timm", ("regnety*",)),
    "ConvNeXt": ("timm", ("convnext_*",)),
    "ConvNeXt V2": ("timm", ("convnextv2*",)),
    "EfficientNet B0-B3": ("timm", ("efficientnet_b[0-3]*", "tf_efficientnet_b[0-3]*")),
    "EfficientNetV2": ("timm", ("efficientnetv2*", "tf_efficientnetv2*")),
    "MobileNetV2": ("timm", ("mobilenetv2*",)),
    "MobileNetV3": ("timm", ("mobilenetv3*", "tf_mobilenetv3*")),
    "torchvision ResNet, ResNeXt, Wide": ("torchvision", ("resnet*", "resnext*", "wide_resnet*")),
    "torchvision MobileNetV2/V3": ("torchvision", ("mobilenet_v2", "mobilenet_v3*")),
    "torchvision EfficientNet (B0-B7, V2)": ("torchvision", ("efficientnet_*",)),
    "torchvision RegNet": ("torchvision", ("regnet_*",)),
}


def family_models(families: list[str] | None = None) -> list[tuple[str, str, str]]:
    """``(family, source, name)`` of every model the sweep covers, each in its first matching family."""
    names = {source: list_model_names(source) for source in ("timm", "torchvision")}
    taken: set[tuple[str, str]] = set()
    rows = []
    for family, (source, patterns) in FAMILIES.items():
        for name in names[source]:
            if (source, name) in taken or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            taken.add((source, name))
            if families is None or family in families:
                rows.append((family, source, name))
    return rows


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter and buffer a constructor registers goes to the meta device as it is registered.

    For constructors that compute with tensors (torchvision's RegNet derives its widths with ``torch.pow``),
    which ``with torch.device("meta")`` turns into meta tensors that have no values to read.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(self, name, tensor.to("meta") if tensor is not None else None, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


def build_on_meta(source: str, name: str) -> nn.Module:
    """``name`` with every tensor on the meta device: no memory, no init."""
    try:
        with torch.device("meta"):
            return st.build_model(name, source=source)
    except NotImplementedError:  # "Cannot copy out of meta tensor": the constructor reads a tensor's value
        with _parameters_on_meta():
            return st.build_model(name, source=source)


def sweep_one(family: str, source: str, name: str) -> dict[str, Any]:
    """One model planned at every scope (whole stage, hard sharing): its counts or why it gets nothing."""
    start = time.perf_counter()
    row: dict[str, Any] = {"model": f"{source}:{name}", "family": family, "plans": False, "reason": ""}
    model = build_on_meta(source, name)
    try:
        plans = st.sweep(model, scopes=SCOPES, templates=(None,))
    except st.ShareError as exc:
        row["reason"] = f"{type(exc).__name__}: {exc}"
        return row
    whole = {p.scope: p for p in plans if p.group_size is None}
    row["plans"] = True
    row["params_before"] = plans[0].params_before
    row["scopes"] = {
        scope: {
            "params_after": p.params_after,
            "saved": p.params_before - p.params_after,
            "decrease": round(100 * p.decrease, 1),
            "groups": len(p.groups),
            "stages": len(p.stages),
        }
        for scope, p in whole.items()
    }
    for scope in SCOPES:
        if scope not in whole:
            row["scopes"][scope] = {"params_after": row["params_before"], "saved": 0, "decrease": 0.0, "groups": 0}
    if not whole.get("block") or not whole["block"].groups:
        row["reason"] = "no stage has two stride-1 layers of one signature on residual branches"
    elif not whole.get("last") or not whole["last"].groups:
        row["reason"] = "at last: " + (
            "no stage has two stride-1 spatial convs of one signature"
            if whole.get("last")
            else "no residual block has a spatial conv"
        )
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f}% ({min(values):.1f}-{max(values):.1f})"


def summary(rows: list[dict[str, Any]]) -> str:
    """The per-family markdown table and the list of models that get nothing."""
    lines = [
        "| family | models | plan | shared at last | decrease at last, median (min-max) "
        "| shared at block | decrease at block, median (min-max) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        planned = [r for r in mine if r["plans"]]
        last = [r["scopes"]["last"]["decrease"] for r in planned if r["scopes"]["last"]["groups"]]
        block = [r["scopes"]["block"]["decrease"] for r in planned if r["scopes"]["block"]["groups"]]
        lines.append(
            f"| {family} | {len(mine)} | {len(planned)} | {len(last)} | {_span(last)} | {len(block)} | {_span(block)} |"
        )
    nothing = [r for r in rows if not r["plans"] or not r["scopes"]["block"]["groups"]]
    only_block = [
        r for r in rows if r["plans"] and r["scopes"]["block"]["groups"] and not r["scopes"]["last"]["groups"]
    ]
    lines.append("")
    lines.append(f"{len(rows) - len(nothing)} of {len(rows)} models share at scope block. Nothing at any scope:")
    lines += [f"- {r['model']}: {r['reason']}" for r in nothing] or ["- none"]
    lines.append(f"Nothing at scope last, something at block: {len(only_block)}")
    lines += [f"- {r['model']}: {r['reason']}" for r in only_block]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write every row to this file")
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="only this family (repeatable)")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    for family, source, name in family_models(args.family):
        row = sweep_one(family, source, name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{len(rows)} models in {time.perf_counter() - start:.0f} s\n")
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
