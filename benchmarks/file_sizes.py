"""How much smaller is a ShaResNet file? Bytes on disk, unshared against shared, for the paper's networks.

For each model (random init, float32): the unshared network written by ``safetensors.torch.save_model``
against the file ``sharetx convert --model NAME`` writes (``build_model``, ``apply``, ``save``: each shared
weight once, plus the header recording the build, the plan and the aliases). ``--onnx`` adds ResNet-50 in
ONNX, unshared and shared, both written by ``export_onnx`` (which checks each against onnxruntime). Files go
to a temporary directory and are removed. docs/file-format.md shows this script's table.

    python benchmarks/file_sizes.py [--onnx]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import safetensors.torch
import timm
import torch

import share_transform as st

#: (label, model name, policy, build keywords): Table 1's networks, as ``sharetx table`` builds them.
MODELS = [
    ("ResNet-34", "resnet34", "imagenet", {}),
    ("ResNet-50", "resnet50", "imagenet", {}),
    ("ResNet-101", "resnet101", "imagenet", {}),
    ("ResNet-152", "resnet152", "imagenet", {}),
    ("pre-act ResNet-164 (10 classes)", "preact_resnet164", "cifar", {"num_classes": 10}),
    ("WRN-40-4 (10 classes)", "wrn_40_4", "cifar", {"num_classes": 10}),
    ("WRN-28-10 (100 classes)", "wrn_28_10", "cifar", {"num_classes": 100}),
]


def sizes(name: str, policy: str, kwargs: dict[str, int], tmp: Path) -> tuple[int, int, int]:
    """(unique parameters, unshared file bytes, ShaResNet file bytes) of ``name``."""
    model = st.build_model(name, **kwargs)
    unshared = tmp / f"{name}.safetensors"
    safetensors.torch.save_model(model, str(unshared))
    st.apply(model, policy)
    shared = st.save(model, tmp / f"{name}-share.safetensors")
    result = st.count_parameters(model), unshared.stat().st_size, shared.stat().st_size
    unshared.unlink()
    shared.unlink()
    return result


def onnx_sizes(tmp: Path) -> tuple[int, int]:
    """(unshared, shared) ONNX bytes of ResNet-50."""
    model = st.build_model("resnet50")
    unshared = st.export_onnx(model, tmp / "resnet50.onnx").file_bytes
    shared = st.export_onnx(st.apply(model), tmp / "resnet50-share.onnx").file_bytes
    return unshared, shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", action="store_true", help="also export ResNet-50 to ONNX (the [onnx] extra)")
    args = parser.parse_args()
    print(
        f"share_transform {st.__version__}, torch {torch.__version__}, timm {timm.__version__}, "
        f"safetensors {safetensors.__version__}, {platform.machine()}"
    )
    print("| model | policy | unique params | unshared file | ShaResNet file | ratio |")
    print("|---|---|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as d:
        for label, name, policy, kwargs in MODELS:
            params, unshared, shared = sizes(name, policy, kwargs, Path(d))
            print(f"| {label} | {policy} | {params:,} | {unshared:,} | {shared:,} | {shared / unshared:.3f} |")
        if args.onnx:
            unshared, shared = onnx_sizes(Path(d))
            print(f"\nONNX ResNet-50: {unshared:,} bytes unshared, {shared:,} shared ({shared / unshared:.3f})")


if __name__ == "__main__":
    main()
