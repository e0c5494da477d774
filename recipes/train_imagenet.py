"""Train a ResNet or its ShaResNet from scratch on ImageNet with the paper's protocol (fb.resnet.torch).

ShaResNet (Boulch, arXiv 1702.08782) shares one spatial conv weight per stage; the paper trains both
networks with fb.resnet.torch: 90 epochs, global batch 256, SGD Nesterov lr 0.1 (x0.1 at epochs 30 and
60), momentum 0.9, weight decay 1e-4, He fan_out init, random-resized crop + colour jitter + PCA
lighting + flip, single-crop evaluation at 224 after resizing to 256.

    python recipes/train_imagenet.py --data /data/imagenet --arch resnet50 --share --output runs/r50-share
    torchrun --nproc_per_node=8 recipes/train_imagenet.py --data /data/imagenet --arch resnet50 --share

Outputs in --output: run.json, metrics.jsonl, curves.png, checkpoint-{last,best}.{safetensors,state.pt}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

import share_transform
from share_transform.engine import (
    DataError,
    Normalize,
    SyntheticDataset,
    TrainConfig,
    add_training_args,
    check_output,
    fit,
    init_distributed,
    init_weights,
    make_loader,
    per_rank_batch,
    print0,
    resolve_args,
    run_recipe,
    scaled_lr,
    seed_all,
    setup_runtime,
    world_from_env,
)
from share_transform.engine.imagenet import MEAN, STD, imagenet_datasets

SYNTHETIC_CLASSES = 1000
SYNTHETIC_TRAIN_BATCHES = 20
SYNTHETIC_VAL_BATCHES = 5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a ShaResNet (or, with --no-share, the original ResNet) on ImageNet as in the paper.",
    )
    g = parser.add_argument_group("data")
    g.add_argument("--data", type=Path, help="ImageFolder root holding train/CLASS/* and val/CLASS/*")
    g.add_argument(
        "--img-size", type=int, default=224, help="training crop (default 224); val resizes to img_size*256/224"
    )
    g.add_argument("--ten-crop", action="store_true", help="evaluate on ten crops instead of the centre one")
    return add_training_args(
        parser,
        arch="resnet50",
        epochs=90,
        batch_size=256,
        lr=0.1,
        lr_reference_batch=256,
        weight_decay=1e-4,
        milestones=(30, 60),
        gamma=0.1,
        policy="imagenet",
        init="fan_out",
    )


def load_data(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """``(train_set, val_set, num_classes)``: the ImageFolder splits, or random images with --synthetic."""
    if args.synthetic:
        train = SyntheticDataset(SYNTHETIC_TRAIN_BATCHES * args.batch_size, args.img_size, SYNTHETIC_CLASSES, args.seed)
        val = SyntheticDataset(SYNTHETIC_VAL_BATCHES * args.batch_size, args.img_size, SYNTHETIC_CLASSES, args.seed + 1)
        return train, val, SYNTHETIC_CLASSES
    if args.data is None:
        raise DataError("--data DIR is required (an ImageFolder root with train/ and val/), or pass --synthetic")
    train, val = imagenet_datasets(args.data, args.img_size, ten_crop=args.ten_crop)
    if len(train) < args.batch_size:
        raise DataError(f"{args.data}/train holds {len(train)} images, fewer than one --batch-size {args.batch_size}")
    return train, val, len(train.classes)


def main(args: argparse.Namespace) -> nn.Module:
    """Train as ``args`` say; returns the trained model (unwrapped, on the training device)."""
    args = resolve_args(args, recipe="imagenet")
    batch_per_rank = per_rank_batch(args.batch_size, world_from_env()[1])
    check_output(args.output, resume=args.resume, args=args)
    setup_runtime(deterministic=args.deterministic)
    seed_all(args.seed)

    # Whatever can fail on bad input (data, arch, policy) fails here, on each rank, before the rendezvous.
    train_set, val_set, num_classes = load_data(args)
    model = share_transform.build_model(args.arch, num_classes=num_classes, **args.model_kwargs)
    init_weights(model, args.init)
    params_unshared = share_transform.count_parameters(model)
    if args.share:
        share_transform.apply(model, args.policy)
    unique_params = share_transform.count_parameters(model)

    dist_info = init_distributed(args.device)
    print0(
        f"{args.arch} ({'shared, policy ' + args.policy if args.share else 'original'}): "
        f"{params_unshared:,} -> {unique_params:,} parameters; {len(train_set):,} train / {len(val_set):,} val "
        f"images, {num_classes} classes; world size {dist_info.world_size}, {batch_per_rank} per rank"
    )

    train_loader, val_loader = (
        make_loader(
            ds,
            batch_size=batch_per_rank,
            train=train,
            seed=args.seed,
            dist_info=dist_info,
            workers=args.workers,
        )
        for ds, train in ((train_set, True), (val_set, False))
    )
    normalize = Normalize(MEAN, STD, channels_last=args.channels_last)
    lr = scaled_lr(args.lr, args.batch_size, args.lr_reference_batch)
    config = TrainConfig(
        epochs=args.epochs,
        lr=lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        milestones=args.lr_milestones,
        gamma=args.lr_gamma,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        seed=args.seed,
        log_every=args.print_freq,
    )
    run_info = {
        "recipe": "imagenet",
        "arch": args.arch,
        "dataset": "synthetic" if args.synthetic else "imagenet",
        "share": args.share,
        "policy": args.policy if args.share else None,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": lr,
        "params_unshared": params_unshared,
        "unique_params": unique_params,
        "args": vars(args),
    }
    fit(
        model,
        train_loader,
        val_loader,
        config=config,
        dist_info=dist_info,
        output=args.output,
        resume=args.resume,
        run_info=run_info,
        train_preprocess=normalize,
        eval_preprocess=normalize,
        title=f"{args.arch} on ImageNet, {'ShaResNet' if args.share else 'original'}",
    )
    return model


if __name__ == "__main__":
    sys.exit(run_recipe(main, get_args_parser().parse_args()))
