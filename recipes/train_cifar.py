"""Train a Wide ResNet or pre-act ResNet, or its ShaResNet, on CIFAR-10/100 with the paper's protocol.

ShaResNet (Boulch, arXiv 1702.08782) shares one spatial conv weight per stage; for CIFAR the paper trained
with the wide-residual-networks code: 200 epochs, batch 128, SGD Nesterov lr 0.1 (x0.2 after epochs 60, 120
and 160), momentum 0.9, weight decay 5e-4, He fan_in init, dropout 0.3 in WRN blocks on CIFAR-100 only, and
the first block of every stage keeps its own conv (policy "cifar"). Inputs: ZCA-whitened with flips (the
paper's, ``--preprocess zca``) or per-channel mean/std with pad-crop-flip (the WRN default, ``meanstd``).

    python recipes/train_cifar.py --dataset cifar10 --data ~/data --arch wrn_40_4 --share --output runs/w40
    python recipes/train_cifar.py --dataset cifar100 --data ~/data --arch wrn_28_10 --no-share
    torchrun --nproc_per_node=2 recipes/train_cifar.py --data ~/data --arch preact_resnet164

``--policy swrn`` (soft sharing, Savarese & Maire) trains with the soft-sharing reference's protocol
(lolemacs/soft-sharing): mean/std inputs, a random crop from a pad of black pixels, Cutout 16, no dropout, a
He-normal classifier, fp32, and the best checkpoint chosen on 5,000 training images held out (``--val-split``),
the test set evaluated once at the end; each flag still overrides (:data:`SWRN_PROTOCOL`).

Reduced sizes for quick runs: any ``wrn_<depth>_<k>`` (depth 6n+4) or ``preact_resnet<depth>`` (9n+2).
Outputs in --output: run.json, metrics.jsonl, curves.png, checkpoint-{last,best}.{safetensors,state.pt} and
preprocess.safetensors (the transform fitted on the training set; --resume reuses it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
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
from share_transform.train.data import CifarData, load_cifar, load_preprocessing, save_preprocessing, synthetic_cifar
from share_transform.train.data.cifar import PADS
from share_transform.train.data.sampling import SYNTHETIC_TRAIN_BATCHES, SYNTHETIC_VAL_BATCHES
from share_transform.train.distill import Distillation, load_original, summary

PREPROCESS_FILE = "preprocess.safetensors"
WRN_CIFAR100_DROPOUT = 0.3

#: The defaults of ``--policy swrn``: the soft-sharing reference's protocol (lolemacs/soft-sharing, ``main.py``,
#: ``utils.py``, ``models/swrn.py``). Its data: flip, ``RandomCrop(32, padding=4)`` (a pad of black pixels),
#: mean/std, ``Cutout(n_holes=1, length=16)`` on both CIFAR-10 and CIFAR-100 (its headline runs pass
#: ``--cutout``); a 90/10 split of the training set chooses ``model_best`` and the test set is evaluated once
#: (``--evaluate``); no dropout; ``kaiming_normal_`` on every conv and on the classifier; fp32 (no autocast).
SWRN_PROTOCOL = {
    "preprocess": "meanstd",
    "pad": "zero",
    "cutout": 16,
    "dropout": 0.0,
    "classifier_init": "he",
    "amp": False,
    "val_split": 5000,
}
#: The defaults of the other policies: the WRN protocol the ShaResNet paper trained with (its inputs ZCA-whitened;
#: dropout 0.3 on CIFAR-100, decided by :func:`main`; bf16 autocast on CUDA, decided by ``resolve_args``).
WRN_PROTOCOL = {
    "preprocess": "zca",
    "pad": "reflect",
    "cutout": 0,
    "dropout": None,
    "classifier_init": "uniform",
    "amp": None,
    "val_split": 0,
}


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
        default=None,
        choices=("zca", "meanstd"),
        help="zca: GCN + ZCA whitening and flips (the paper); meanstd: mean/std, pad-crop, flips (WRN); "
        "default zca, meanstd under --policy swrn",
    )
    g.add_argument(
        "--pad",
        default=None,
        choices=PADS,
        help="meanstd's random crop pads by reflection (WRN) or with black pixels (zero: torchvision's "
        "RandomCrop(32, padding=4)); default reflect, zero under --policy swrn",
    )
    g.add_argument(
        "--cutout",
        type=int,
        default=None,
        metavar="SIZE",
        help="Cutout: blank one SIZE x SIZE square per training image (meanstd only; 0 = none); default 0, "
        "16 under --policy swrn",
    )
    g.add_argument(
        "--val-split",
        type=int,
        default=None,
        metavar="N",
        help="hold N training images out, chosen from --seed, to choose checkpoint-best on; the test set is "
        "then evaluated once, on the final and best checkpoints (0 = none: best chosen on the test set); "
        "default 0, 5000 under --policy swrn",
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
        help=f"WRN dropout between the block's convs (default {WRN_CIFAR100_DROPOUT} on cifar100, else 0; "
        "0 under --policy swrn)",
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


def resolve_protocol(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the protocol flags left unset: :data:`SWRN_PROTOCOL` under ``--policy swrn``, else :data:`WRN_PROTOCOL`.

    ZCA inputs are not cropped, so they take no ``--pad`` and no Cutout (an explicit one is refused).

    Raises:
        ConfigError: ``--pad`` or ``--cutout`` given with ``--preprocess zca``; ``--dropout`` for a network that
            is not a Wide ResNet.
    """
    protocol = SWRN_PROTOCOL if args.policy == "swrn" else WRN_PROTOCOL
    is_wrn = args.arch.startswith("wrn_")
    if args.dropout is None:
        args.dropout = protocol["dropout"]
    if args.dropout is None:  # the paper's: in WRN blocks, on CIFAR-100 only
        args.dropout = WRN_CIFAR100_DROPOUT if is_wrn and args.dataset == "cifar100" else 0.0
    if args.dropout and not is_wrn:
        raise ConfigError(f"--dropout applies to Wide ResNets (wrn_*), not {args.arch}")
    if args.preprocess is None:
        args.preprocess = protocol["preprocess"]
    if args.preprocess == "zca":
        given = [f"--{k}" for k in ("pad", "cutout") if getattr(args, k) not in (None, 0)]
        if given:
            raise ConfigError(
                f"{' and '.join(given)} apply to --preprocess meanstd: ZCA inputs train with flips only (the paper's)"
            )
        args.cutout = 0
    for name, value in protocol.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.preprocess == "zca":
        args.pad = None  # no crop, no pad: recorded as such
    return args


def load_data(args: argparse.Namespace) -> CifarData:
    """The splits, preprocessed with the training set's statistics: fitted now, or the run's saved ones.

    With ``--synthetic``, random images of the dataset's shape and classes instead of ``--data`` (the held-out
    split comes on top of the synthetic epoch's images).

    Raises:
        ConfigError: a ``--val-split`` that leaves fewer training images than one batch; ``--resume`` with
            another ``--preprocess`` than the run's saved transform.
    """
    saved = args.output / PREPROCESS_FILE
    preprocess = args.preprocess
    if args.resume and saved.exists():
        preprocess = load_preprocessing(saved)
        if preprocess.kind != args.preprocess:
            raise ConfigError(
                f"--resume: {args.output} was trained with --preprocess {preprocess.kind}, "
                f"this command gives {args.preprocess}"
            )
    augmentation = {"hflip": args.hflip, "pad": args.pad or "reflect", "cutout": args.cutout}
    if args.synthetic:
        train_size = SYNTHETIC_TRAIN_BATCHES * args.batch_size + args.val_split
        return synthetic_cifar(
            args.dataset,
            preprocess,
            train_size=train_size,
            test_size=SYNTHETIC_VAL_BATCHES * args.batch_size,
            seed=args.seed,
            val_split=args.val_split,
            **augmentation,
        )
    data = load_cifar(
        args.data,
        args.dataset,
        preprocess,
        download=args.download,
        val_split=args.val_split,
        seed=args.seed,
        **augmentation,
    )
    if len(data.train) < args.batch_size:
        held = f" ({args.val_split:,} more held out by --val-split)" if args.val_split else ""
        raise ConfigError(
            f"{args.data}: {len(data.train):,} training images{held}, fewer than one --batch-size {args.batch_size}"
        )
    return data


def main(args: argparse.Namespace) -> nn.Module:
    """Train as ``args`` say; returns the trained model (unwrapped, on the training device)."""
    args = resolve_args(resolve_protocol(args), recipe="cifar")
    batch_per_rank = per_rank_batch(args.batch_size, world_from_env()[1])
    if args.arch.startswith("wrn_"):  # before check_output: --resume compares the full constructor arguments
        args.model_kwargs.setdefault("dropout", args.dropout)
    check_output(args.output, resume=args.resume, args=args)
    setup_runtime(deterministic=args.deterministic)
    seed_all(args.seed)

    # Whatever can fail on bad input (data, arch, policy) fails here, on each rank, before the rendezvous.
    data = load_data(args)
    original = load_original(args, data.num_classes)  # --pretrained / --from-checkpoint: the trained original, or None
    model, params_unshared, unique_params = build_recipe_model(
        args, data.num_classes, input_size=(3, 32, 32), original=original.model if original else None
    )
    distill = Distillation(original.model, args.kd_temperature, args.kd_alpha) if args.distill and original else None
    shared = args.share and is_shared(model)

    dist_info = init_distributed(args.device)
    # Nothing is written into --output before its lock is held (a run refused by the lock writes nothing).
    with locked_output(args.output, resume=args.resume, dist_info=dist_info, args=args):
        if dist_info.is_main and (not args.resume or not (args.output / PREPROCESS_FILE).exists()):
            save_preprocessing(data.preprocessing, args.output / PREPROCESS_FILE)
        dataset = "synthetic" if args.synthetic else args.dataset_name or args.dataset
        held_out = f"{len(data.holdout):,} val (held out of the training set) / " if data.holdout is not None else ""
        print0(
            f"{args.arch} ({'shared, policy ' + args.policy if shared else 'original'}): "
            f"{params_unshared:,} -> {unique_params:,} parameters; {dataset}: {len(data.train):,} train / "
            f"{held_out}{len(data.val):,} test images, {data.num_classes} classes, {data.preprocessing.kind}; "
            f"world size {dist_info.world_size}, {batch_per_rank} per rank"
        )
        if original is not None:
            print0(summary(args, original))

        def loader(split: torch.utils.data.Dataset, train: bool) -> torch.utils.data.DataLoader:
            return make_loader(
                split,
                batch_size=batch_per_rank,
                train=train,
                seed=args.seed,
                dist_info=dist_info,
                workers=args.workers,
            )

        train_loader = loader(data.train, True)
        # The held-out split chooses checkpoint-best; without one, the test set does (and no test loader).
        val_loader = loader(data.holdout if data.holdout is not None else data.val, False)
        test_loader = loader(data.val, False) if data.holdout is not None else None
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
            shared=shared,
            original=original,
            preprocess=data.preprocessing.kind,
            val_split=args.val_split,
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
            test_loader=test_loader,
            input_size=(3, 32, 32),
            distill=distill,
            original=original.model if original else None,
        )
    return model


if __name__ == "__main__":
    sys.exit(run_recipe(main, get_args_parser().parse_args()))
