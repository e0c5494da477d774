"""How much memory does a shared model hold? Bytes of distinct storages, unshared against hard and soft sharing.

For each model (random init, float32, real tensors: the meta device has no storage to measure): the bytes of
the distinct storages behind its parameters and buffers (``untyped_storage()``, each once), beside what its
unique parameters and buffers count (numel x element size), and what ``torch.save(model.state_dict())``
writes. A model that holds more than it counts keeps memory it does not use. docs/api.md (Soft sharing)
shows this script's table.

    python benchmarks/soft_memory.py [--templates 2]
"""

from __future__ import annotations

import argparse
import io
import platform

import timm
import torch
from torch import nn

import share_transform as st

#: (label, timm name, policy, build keywords).
MODELS = [
    ("ResNet-50", "resnet50", "imagenet", {}),
    ("WRN-28-10 (10 classes)", "wrn_28_10", "swrn", {"num_classes": 10}),
]


def held(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def counted(model: nn.Module) -> int:
    """Unique parameters and buffers, times their element size."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def written(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templates", type=int, default=2, help="templates of the soft variant [default: 2]")
    args = parser.parse_args()
    print(f"{platform.machine()}, torch {torch.__version__}, timm {timm.__version__}; MB = 10^6 bytes")
    print(f"{'model':<24} {'variant':<16} {'held MB':>9} {'counted MB':>11} {'state_dict file MB':>19}")
    for label, name, policy, kwargs in MODELS:
        variants = [("unshared", None), ("hard", policy if policy != "swrn" else "cifar"), ("soft", policy)]
        for variant, use in variants:
            torch.manual_seed(0)
            model = timm.create_model(name, **kwargs)
            if variant == "hard":
                st.apply(model, use, scope="all" if policy == "swrn" else None)
            elif variant == "soft":
                st.apply(model, use, templates=args.templates)
                variant = f"soft, k={args.templates}"
            mb = [held(model) / 1e6, counted(model) / 1e6, written(model) / 1e6]
            print(f"{label:<24} {variant:<16} {mb[0]:>9.1f} {mb[1]:>11.1f} {mb[2]:>19.1f}")


if __name__ == "__main__":
    main()
