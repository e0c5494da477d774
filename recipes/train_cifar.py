"""Train a Wide ResNet or pre-act ResNet, or its ShaResNet, on CIFAR-10/100 with the paper's protocol.

ShaResNet (Boulch, arXiv 1702.08782) shares one spatial conv weight per stage; for CIFAR the paper trained
with the wide-residual-networks code: 200 epochs, batch 128, SGD Nesterov lr 0.1 (x0.2 after epochs 60, 120
and 160), momentum 0.9, weight decay 5e-4, He fan_in init, dropout 0.3 in WRN blocks on CIFAR-100 only, and
the first block of every stage keeps its own conv (policy "cifar"). Inputs: ZCA-whitened with flips (the
paper's, ``--preprocess zca``) or per-channel mean/std with pad-crop-flip (the WRN default, ``meanstd``).

    python recipes/train_cifar.py --dataset cifar10 --data ~/data --arch wrn_40_4 --share --output runs/w40
    python recipes/train_cifar.py --dataset cifar100 --data ~/data --arch wrn_28_10 --no-share
    torchrun --nproc_per_node=2 recipes/train_cifar.py --data ~/data --arch preact_resnet164

Reduced sizes for quick runs: any ``wrn_<depth>_<k>`` (depth 6n+4) or ``preact_resnet<depth>`` (9n+2).
Outputs in --output: run.json, metrics.jsonl, curves.png, checkpoint-{last,best}.{safetensors,state.pt} and
preprocess.safetensors (the transform fitted on the training set; --resume reuses it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

from share_transform.train import (
    ConfigError,
    TrainConfig,
    add_training_args,
    build_recipe_model,
    check_output,
    curves_title,
    fit,
    init_distributed,
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
from share_transform.train.data import CifarData, load_cifar, load_preprocessing, save_preprocessing, synthetic_cifar
from share_transform.train.data.sampling import SYNTHETIC_TRAIN_BATCHES, SYNTHETIC_VAL_BATCHES

PREPROCESS_FILE = "preprocess.safetensors"
WRN_CIFAR100_DROPOUT = 0.3


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a ShaResNet (or, with --no-share, the original network) on CIFAR as in the paper.",
        formatter_class=HelpFormatter,
    )
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
    g.add_argument(
        "--data",
        type=Path,
        default=Path("data"),
        help="folder holding cifar-10-batches-py/ or cifar-100-python/ (the python version)",
    )
    g.add_argument("--download", action="store_true", help="fetch the set into --data if it is not there")
    g.add_argument(
        "--preprocess",
        default="zca",
        choices=("zca", "meanstd"),
        help="zca: GCN + ZCA whitening and flips (the paper); meanstd: mean/std, pad-crop, flips (WRN)",
    )
    g.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random horizontal flips in training (off for data where a mirror changes the class)",
    )
    g.add_argument(
        "--dataset-name",
        default=None,
        help="name recorded in run.json for the report (default --dataset); set it when the files "
        "hold another image set written in CIFAR format",
    )
    g.add_argument(
        "--dropout",
        type=float,
        default=None,
        help=f"WRN dropout between the block's convs (default {WRN_CIFAR100_DROPOUT} on cifar100, else 0)",
    )
    return add_training_args(
        parser,
        arch="wrn_40_4",
        epochs=200,
        batch_size=128,
        lr=0.1,
        lr_reference_batch=128,
        weight_decay=5e-4,
        milestones=(60, 120, 160),
        gamma=0.2,
        policy="cifar",
        init="fan_in",
        workers=4,
        model_kwargs_example='{"drop_rate": 0.2}',  # dropout before the classifier (sizes go by --arch name)
    )


def load_data(args: argparse.Namespace) -> CifarData:
    """Both splits, preprocessed with the training set's statistics: fitted now, or the run's saved ones.

    With ``--synthetic``, random images of the dataset's shape and classes instead of ``--data``.
    """
    if args.loader != "torch":
        raise ConfigError(
            f"--loader {args.loader} is for the ImageNet recipe: CIFAR is held in memory and augmented a batch "
            f"at a time by the torch loader"
        )
    saved = args.output / PREPROCESS_FILE
    preprocess = args.preprocess
    if args.resume and saved.exists():
        preprocess = load_preprocessing(saved)
        if preprocess.kind != args.preprocess:
            raise ConfigError(
                f"--resume: {args.output} was trained with --preprocess {preprocess.kind}, "
                f"this command gives {args.preprocess}"
            )
    if args.synthetic:
        train_size, test_size = SYNTHETIC_TRAIN_BATCHES * args.batch_size, SYNTHETIC_VAL_BATCHES * args.batch_size
        return synthetic_cifar(
            args.dataset, preprocess, train_size=train_size, test_size=test_size, seed=args.seed, hflip=args.hflip
        )
    data = load_cifar(args.data, args.dataset, preprocess, hflip=args.hflip, download=args.download)
    if len(data.train) < args.batch_size:
        raise ConfigError(
            f"{args.data}: {len(data.train)} training images, fewer than one --batch-size {args.batch_size}"
        )
    return data


def main(args: argparse.Namespace) -> nn.Module:
    """Train as ``args`` say; returns the trained model (unwrapped, on the training device)."""
    args = resolve_args(args, recipe="cifar")
    batch_per_rank = per_rank_batch(args.batch_size, world_from_env()[1])
    is_wrn = args.arch.startswith("wrn_")
    dropout = args.dropout
    if dropout is None:
        dropout = WRN_CIFAR100_DROPOUT if is_wrn and args.dataset == "cifar100" else 0.0
    if dropout and not is_wrn:
        raise ConfigError(f"--dropout applies to Wide ResNets (wrn_*), not {args.arch}")
    if is_wrn:  # before check_output: --resume compares the model's full constructor arguments with the run's
        args.model_kwargs.setdefault("dropout", dropout)
    check_output(args.output, resume=args.resume, args=args)
    setup_runtime(deterministic=args.deterministic)
    seed_all(args.seed)

    # Whatever can fail on bad input (data, arch, policy) fails here, on each rank, before the rendezvous.
    data = load_data(args)
    model, params_unshared, unique_params = build_recipe_model(args, data.num_classes, input_size=(3, 32, 32))

    dist_info = init_distributed(args.device)
    # check_output above made sure a fresh run does not overwrite a finished run's transform.
    if dist_info.is_main and (not args.resume or not (args.output / PREPROCESS_FILE).exists()):
        save_preprocessing(data.preprocessing, args.output / PREPROCESS_FILE)
    dataset = "synthetic" if args.synthetic else args.dataset_name or args.dataset
    print0(
        f"{args.arch} ({'shared, policy ' + args.policy if args.share else 'original'}): "
        f"{params_unshared:,} -> {unique_params:,} parameters; {dataset}: {len(data.train):,} train / "
        f"{len(data.val):,} test images, {data.num_classes} classes, {data.preprocessing.kind}; "
        f"world size {dist_info.world_size}, {batch_per_rank} per rank"
    )

    train_loader, val_loader = (
        make_loader(
            ds, batch_size=batch_per_rank, train=train, seed=args.seed, dist_info=dist_info, workers=args.workers
        )
        for ds, train in ((data.train, True), (data.val, False))
    )
    # ZCA whitening and its flips run on the device; mean/std inputs come preprocessed from the host.
    to_input = data.device_input(channels_last=args.channels_last)
    config = TrainConfig.from_args(args)
    info = run_info(
        args,
        recipe="cifar",
        dataset=dataset,
        config=config,
        params_unshared=params_unshared,
        unique_params=unique_params,
        preprocess=data.preprocessing.kind,
    )
    fit(
        model,
        train_loader,
        val_loader,
        config=config,
        dist_info=dist_info,
        output=args.output,
        resume=args.resume,
        run_info=info,
        train_preprocess=to_input,
        eval_preprocess=to_input,
        title=curves_title(info),
    )
    return model


if __name__ == "__main__":
    sys.exit(run_recipe(main, get_args_parser().parse_args()))
