"""Train a ResNet or its ShaResNet from scratch on ImageNet with the paper's protocol (fb.resnet.torch).

ShaResNet (Boulch, arXiv 1702.08782) shares one spatial conv weight per stage; the paper trains both
networks with fb.resnet.torch: 90 epochs, global batch 256, SGD Nesterov lr 0.1 (x0.1 at epochs 30 and
60), momentum 0.9, weight decay 1e-4, He fan_out init, random-resized crop + colour jitter + PCA
lighting + flip, single-crop evaluation at 224 after resizing to 256.

    python recipes/train_imagenet.py --data /data/imagenet --arch resnet50 --share --output runs/r50-share
    torchrun --nproc_per_node=8 recipes/train_imagenet.py --data /data/imagenet --arch resnet50 --share
    python recipes/train_imagenet.py --data /data/imagenet --loader dali   # GPU JPEG decoding (extra [dali])

Input pipelines (``--loader``): ``torch`` (default) decodes with torchvision.io and crops on the host,
jitters colours, lights and normalises on the device; ``pil`` is the all-host PIL reference; ``dali``
decodes on the GPU with NVIDIA DALI. All three follow the same protocol and the same (seed, epoch) order.

Outputs in --output: run.json, metrics.jsonl, curves.png, checkpoint-{last,best}.{safetensors,state.pt}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader, Dataset

from share_transform.train import (
    DataError,
    DistInfo,
    Normalize,
    SyntheticDataset,
    TrainConfig,
    add_training_args,
    build_recipe_model,
    check_output,
    curves_title,
    fit,
    init_distributed,
    is_shared,
    locked_output,
    make_loader,
    per_rank_batch,
    print0,
    resolve_args,
    run_info,
    run_recipe,
    seed_all,
    setup_runtime,
    world_from_env,
)
from share_transform.train.args import HelpFormatter
from share_transform.train.data.dali import DaliLoader, require_dali
from share_transform.train.data.imagenet import MEAN, PCA_EIGVAL, PCA_EIGVEC, STD, imagenet_datasets
from share_transform.train.data.sampling import SYNTHETIC_TRAIN_BATCHES, SYNTHETIC_VAL_BATCHES
from share_transform.train.distill import Distillation, load_original, summary
from share_transform.train.loop import ColourAugment, Preprocess

SYNTHETIC_CLASSES = 1000
#: The ``--loader`` choices (:mod:`share_transform.train.data.imagenet`, :mod:`share_transform.train.data.dali`).
LOADERS = ("torch", "pil", "dali")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Train a ShaResNet (or, with --no-share, the original ResNet) on ImageNet as in the paper.",
    )
    g = parser.add_argument_group("data")
    g.add_argument("--data", type=Path, help="ImageFolder root holding train/CLASS/* and val/CLASS/*")
    g.add_argument(
        "--img-size", type=int, default=224, help="training crop (default 224); val resizes to img_size*256/224"
    )
    g.add_argument("--ten-crop", action="store_true", help="evaluate on ten crops instead of the centre one")
    g.add_argument(
        "--loader",
        default="torch",
        choices=LOADERS,
        help="input pipeline: torch (decode_jpeg, colour augmentation on the device; default), pil (the "
        "reference, all on the host with PIL), dali (NVIDIA DALI, GPU JPEG decoding; extra [dali])",
    )
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
        model_kwargs_example='{"layers": [2, 2, 2, 2]}',  # a reduced ResNet-50, for smoke tests
    )


def load_data(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """``(train_set, val_set, num_classes)``: the ImageFolder splits, or random images with --synthetic."""
    if args.synthetic:
        train = SyntheticDataset(SYNTHETIC_TRAIN_BATCHES * args.batch_size, args.img_size, SYNTHETIC_CLASSES, args.seed)
        val = SyntheticDataset(SYNTHETIC_VAL_BATCHES * args.batch_size, args.img_size, SYNTHETIC_CLASSES, args.seed + 1)
        return train, val, SYNTHETIC_CLASSES
    if args.data is None:
        raise DataError("--data DIR is required (an ImageFolder root with train/ and val/), or pass --synthetic")
    if args.loader == "dali":
        require_dali()
    train, val = imagenet_datasets(
        args.data, args.img_size, ten_crop=args.ten_crop, loader="pil" if args.loader == "pil" else "torch"
    )
    if len(train) < args.batch_size:
        raise DataError(f"{args.data}/train holds {len(train)} images, fewer than one --batch-size {args.batch_size}")
    return train, val, len(train.classes)


def make_loaders(
    args: argparse.Namespace, dataset: Dataset, train: bool, dist_info: DistInfo
) -> DataLoader | DaliLoader:
    """The loader of one split: DALI's with ``--loader dali`` (on files), else torch's DataLoader."""
    batch = per_rank_batch(args.batch_size, dist_info.world_size)
    if args.loader == "dali" and not args.synthetic:
        return DaliLoader(
            dataset,  # type: ignore[arg-type]  # imagenet_datasets' TrainImages or EvalImages
            batch_size=batch,
            train=train,
            seed=args.seed,
            dist_info=dist_info,
            threads=args.workers,
        )
    return make_loader(
        dataset, batch_size=batch, train=train, seed=args.seed, dist_info=dist_info, workers=args.workers
    )


def main(args: argparse.Namespace) -> nn.Module:
    """Train as ``args`` say; returns the trained model (unwrapped, on the training device)."""
    args = resolve_args(args, recipe="imagenet")
    batch_per_rank = per_rank_batch(args.batch_size, world_from_env()[1])
    check_output(args.output, resume=args.resume, args=args)
    setup_runtime(deterministic=args.deterministic)
    seed_all(args.seed)

    # Whatever can fail on bad input (data, arch, policy) fails here, on each rank, before the rendezvous.
    train_set, val_set, num_classes = load_data(args)
    original = load_original(args, num_classes)  # --pretrained / --from-checkpoint: the trained original, or None
    model, params_unshared, unique_params = build_recipe_model(
        args, num_classes, original=original.model if original else None
    )
    distill = Distillation(original.model, args.kd_temperature, args.kd_alpha) if args.distill and original else None
    shared = args.share and is_shared(model)

    dist_info = init_distributed(args.device)
    print0(
        f"{args.arch} ({'shared, policy ' + args.policy if shared else 'original'}): "
        f"{params_unshared:,} -> {unique_params:,} parameters; {len(train_set):,} train / {len(val_set):,} val "
        f"images, {num_classes} classes; world size {dist_info.world_size}, {batch_per_rank} per rank"
    )
    if original is not None:
        print0(summary(args, original))

    train_loader, val_loader = (
        make_loaders(args, ds, train, dist_info) for ds, train in ((train_set, True), (val_set, False))
    )
    normalize = Normalize(MEAN, STD, channels_last=args.channels_last)
    train_preprocess: Preprocess = normalize
    if args.loader != "pil" and not args.synthetic:
        # The torch and dali loaders leave colour jitter and lighting to the device.
        float_normalize = Normalize(MEAN, STD, scale=1.0, channels_last=args.channels_last)
        train_preprocess = ColourAugment(float_normalize, eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC)
    config = TrainConfig.from_args(args)
    info = run_info(
        args,
        recipe="imagenet",
        dataset="synthetic" if args.synthetic else "imagenet",
        config=config,
        params_unshared=params_unshared,
        unique_params=unique_params,
        shared=shared,
        original=original,
    )
    with locked_output(args.output, resume=args.resume, dist_info=dist_info, args=args):
        fit(
            model,
            train_loader,
            val_loader,
            config=config,
            dist_info=dist_info,
            output=args.output,
            resume=args.resume,
            run_info=info,
            train_preprocess=train_preprocess,
            eval_preprocess=normalize,
            title=curves_title(info),
            input_size=(3, args.img_size, args.img_size),  # the checkpoints say what the model trained at
            distill=distill,
            original=original.model if original else None,
        )
    return model


if __name__ == "__main__":
    sys.exit(run_recipe(main, get_args_parser().parse_args()))
