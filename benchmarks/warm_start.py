"""Which warm start loses least? Train a small ResNet on scikit-learn's digits, then share it every way.

A trained-like model is needed (freshly initialised kernels share nothing): the script trains a reduced-width
timm ResNet (bottleneck ``resnet50`` layout, or basic-block ``resnet34`` with ``--arch resnet34``) on the 1,797
digits (8x8, upsampled to 64x64, 25% held out), then shares copies of it and reports, for each setting and
before any fine-tuning:

* the relative reconstruction error ``||W - W_shared|| / ||W||`` that ``apply`` records, over the shared
  layers (``recon err``) and over every layer that could share (``over all``: what ``allocate="weights"``
  minimises, comparable between allocations);
* the relative output error ``||logits_shared - logits|| / ||logits||`` on the held-out digits (eval mode);
* the held-out accuracy, as shared and after ``recalibrate_bn`` on the training digits (``--recalibrate`` batches).

Settings: hard sharing with ``init="mean"`` and ``"mean-scaled"`` (the whole stage, as the paper), soft sharing
with ``init="svd"``, and ``allocate="uniform"`` against ``"weights"`` at ``--budget``.

    python benchmarks/warm_start.py [--epochs 12] [--arch resnet50] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import share_transform as st

SIZE = 64


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.from_numpy(data.images).float()[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(data.target).long()
    train, test = train_test_split(range(len(y)), test_size=0.25, stratify=data.target, random_state=0)
    return x[train], y[train], x[test], y[test]


def batches(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), size):
        yield x[order[i : i + size]], y[order[i : i + size]]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(y) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        start, total = time.perf_counter(), 0.0
        for xb, yb in batches(x, y, 64, gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(yb)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(y):.4f} ({time.perf_counter() - start:.1f} s)")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    model.eval()
    logits = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    return logits, float((logits.argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", choices=("resnet50", "resnet34"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--budget", type=float, default=0.85)
    parser.add_argument("--recalibrate", type=int, default=10, help="batches of 64 training digits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="of the model's init and the training order")
    parser.add_argument("--cache", type=Path, default=None, help="keep the trained weights here and reuse them")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(args.seed)
    model = timm.create_model(args.arch, layers=[3, 4, 6, 3], channels=(16, 32, 64, 128), num_classes=10)
    if args.cache is not None and args.cache.exists():
        model.load_state_dict(load_file(args.cache))
        print(f"trained weights from {args.cache}")
    else:
        print(f"training {args.arch} (layers 3-4-6-3, channels 16-128) on digits {SIZE}x{SIZE}, {args.epochs} epochs")
        train(model, xtr, ytr, args.epochs, args.seed)
        if args.cache is not None:
            save_file(model.state_dict(), args.cache)
    ref, acc = evaluate(model, xte, yte)
    print(f"trained: held-out accuracy {100 * acc:.2f}%, {st.count_parameters(model):,} parameters\n")

    size = (3, SIZE, SIZE)
    settings = [
        ("whole stage, mean", {"init": "mean"}),
        ("whole stage, mean-scaled", {"init": "mean-scaled"}),
        ("whole stage, svd 1 template", {"init": "svd", "templates": 1}),
        ("whole stage, svd 2 templates", {"init": "svd", "templates": 2}),
        (f"budget {args.budget:g} uniform, mean", {"init": "mean", "budget": args.budget}),
        (f"budget {args.budget:g} uniform, mean-scaled", {"init": "mean-scaled", "budget": args.budget}),
        (f"budget {args.budget:g} weights, mean", {"init": "mean", "budget": args.budget, "allocate": "weights"}),
        (
            f"budget {args.budget:g} weights, mean-scaled",
            {"init": "mean-scaled", "budget": args.budget, "allocate": "weights"},
        ),
    ]
    modules = dict(model.named_modules())
    sharable = [m for g in st.plan(model, input_size=size).groups for m in g.members]
    energy = sum(float(modules[m].weight.detach().double().square().sum()) for m in sharable)
    head = (
        f"{'setting':40s} {'params':>9s} {'recon err':>9s} {'over all':>8s} {'output err':>10s} {'acc':>7s} "
        f"{'acc+BN':>7s}"
    )
    print(head)
    for label, options in settings:
        shared = copy.deepcopy(model)
        st.apply(shared, input_size=size, **options)
        recon = st.get_reconstruction(shared)
        assert recon is not None
        logits, shared_acc = evaluate(shared, xte, yte)
        out_err = float((logits - ref).norm() / ref.norm())
        gen = torch.Generator().manual_seed(1)
        st.recalibrate_bn(shared, batches(xtr, ytr, 64, gen), args.recalibrate)
        _, bn_acc = evaluate(shared, xte, yte)
        over_all = (sum(g.squared_error for g in recon.groups) / energy) ** 0.5
        print(
            f"{label:40s} {st.count_parameters(shared):9,d} {recon.total:9.4f} {over_all:8.4f} "
            f"{out_err:10.4f} {100 * shared_acc:6.2f}% {100 * bn_acc:6.2f}%"
        )


if __name__ == "__main__":
    main()
