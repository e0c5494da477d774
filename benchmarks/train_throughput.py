"""Training throughput of a ShaResNet against its original: images/s of the recipe's training step.

Variants (``--variants``): ``original``, ``shared`` (hard sharing, the paper's), ``softK`` (soft sharing
with K templates per stage: each member's weight is recomputed from the bank on every forward), ``block`` (hard
sharing at scope "block": every conv and linear layer of the residual branches, weight and bias),
``blocksoftK`` (scope "block", K templates per group) and ``distill`` (the shared model's step with knowledge
distillation: the unshared original, as the teacher, runs a forward pass under ``no_grad`` on the same batch, and
the loss is ``kd_loss``); ``distill`` is also reported as a ratio to the plain ``shared`` step (expected about
1.3x: the teacher's forward is about a third of a step's work).

The step is the one ``recipes/train_imagenet.py`` runs (``share_transform.train.loop.train_step``): the
device-side uint8 -> float normalisation, forward and cross-entropy under bf16 autocast (GPU), backward,
SGD Nesterov with weight decay on the de-duplicated parameters. Data are synthetic and already on the
device, so the figure is the model's speed, not the input pipeline's.

All variants are timed in one process, alternating repeat by repeat so that drifts in clock or load hit
each; each figure is the median over repeats of ``steps`` steps, with the min-max beside it, and the step
time ratio to the original (median over repeats of the per-repeat ratios). Target for soft sharing on CPU:
<= 1.05x the original step; at scope "block", hard <= 1.02x and soft (2 templates) <= 1.10x. On GPU: bf16,
channels_last, with and without ``torch.compile``. Target on one H100 (resnet50, batch 256, 224x224, bf16,
channels_last): >= 3,000 img/s and shared/original >= 0.98.

    python benchmarks/train_throughput.py                       # GPU if present, else CPU
    python benchmarks/train_throughput.py --device cpu --batch-size 16 --img-size 128
    python benchmarks/train_throughput.py --device cuda --compile both --json out.json
    python benchmarks/train_throughput.py --device cpu --threads 1 --variants original shared soft2 soft4
    python benchmarks/train_throughput.py --device cpu --threads 1 --arch convnext_tiny \
        --variants original block blocksoft2
    python benchmarks/train_throughput.py --device cpu --threads 1 --variants shared distill
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import share_transform
from share_transform.tie import alias_groups, keep_ties
from share_transform.train import Normalize, build_optimizer, init_weights, setup_runtime, train_step
from share_transform.train.data.imagenet import MEAN, STD
from share_transform.train.distill import Distillation


@dataclass(frozen=True)
class Result:
    compiled: bool
    model: str  # "original", "shared", "softK", "block", "blocksoftK" or "distill"
    params: int
    images_per_s: list[float]  # one per repeat

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s)


def get_args_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on cuda, 16 on cpu")
    p.add_argument("--img-size", type=int, default=None, help="default 224 on cuda, 128 on cpu")
    p.add_argument("--steps", type=int, default=None, help="steps per repeat (default 50 on cuda, 3 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20 on cuda, 2 on cpu)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 (default: on cuda)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on cuda")
    p.add_argument("--compile", choices=("off", "on", "both"), default=None, help="default: both on cuda, off on cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["original", "shared"],
        help="original, shared (hard), softK (K templates per stage), block (hard, scope block), blocksoftK "
        "(scope block, K templates per group) and distill (shared, with the original as teacher), timed alternately",
    )
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    gpu = args.device == "cuda"
    defaults = {
        "batch_size": 256 if gpu else 16,
        "img_size": 224 if gpu else 128,
        "steps": 50 if gpu else 3,
        "warmup": 20 if gpu else 2,
        "amp": gpu,
        "channels_last": gpu,
        "compile": "both" if gpu else "off",
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def build_variants(arch: str, variants: list[str]) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """The original and its shared variants, from the same fb.resnet.torch initialisation: ``(model, teacher)``,
    the teacher (a copy of the unshared original) for ``distill`` only."""
    torch.manual_seed(0)
    original = init_weights(share_transform.build_model(arch), "fan_out")
    models: dict[str, tuple[nn.Module, nn.Module | None]] = {}
    for name in variants:
        if name == "original":
            models[name] = (original, None)
        elif name == "shared":
            models[name] = (share_transform.apply(copy.deepcopy(original)), None)
        elif name == "distill":
            models[name] = (share_transform.apply(copy.deepcopy(original), init="mean"), copy.deepcopy(original))
        elif name.startswith("soft") and name[4:].isdigit():
            models[name] = (share_transform.apply(copy.deepcopy(original), templates=int(name[4:])), None)
        elif name == "block":
            models[name] = (share_transform.apply(copy.deepcopy(original), scope="block"), None)
        elif name.startswith("blocksoft") and name[9:].isdigit():
            models[name] = (
                share_transform.apply(copy.deepcopy(original), scope="block", templates=int(name[9:])),
                None,
            )
        else:
            raise SystemExit(
                f"error: unknown variant {name!r}; use original, shared, softK (e.g. soft2), block, blocksoftK or "
                "distill"
            )
    return models


def time_steps(step, n: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def benchmark(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device)
    setup_runtime(deterministic=False)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, generator=g)
    images = images.to(device)
    targets = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    normalize = Normalize(MEAN, STD, channels_last=args.channels_last)
    results = []
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        steps = {}
        for label, (model, teacher) in build_variants(args.arch, args.variants).items():
            ties = alias_groups(model)
            model.to(device)
            if args.channels_last:
                model.to(memory_format=torch.channels_last)
            keep_ties(model, ties, f"moving {label} to {device}")
            model.train()
            optimizer = build_optimizer(model, lr=0.1)
            run = torch.compile(model) if compiled else model
            distill = None
            if teacher is not None:  # as fit does: on the device, eval mode, no gradients, compiled with the model
                teacher.to(device)
                if args.channels_last:
                    teacher.to(memory_format=torch.channels_last)
                distill = Distillation(torch.compile(teacher) if compiled else teacher, temperature=4.0, alpha=0.9)

            def step(run=run, optimizer=optimizer, distill=distill) -> None:
                train_step(run, normalize(images), targets, optimizer, amp=args.amp, distill=distill)

            time_steps(step, args.warmup, device)  # includes compilation and cuDNN autotuning
            steps[label] = (step, share_transform.count_parameters(model), [])
        for _ in range(args.repeats):
            for step, _, rates in steps.values():
                rates.append(args.batch_size * args.steps / time_steps(step, args.steps, device))
        results += [Result(compiled, label, params, rates) for label, (_, params, rates) in steps.items()]
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def describe(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"
    )


def main(args: argparse.Namespace) -> list[Result]:
    args = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{args.arch} training step on {describe(args.device)}: batch {args.batch_size}, "
        f"{args.img_size}x{args.img_size}, {'bf16' if args.amp else 'fp32'}"
        f"{', channels_last' if args.channels_last else ''}; median of {args.repeats} x {args.steps} steps"
    )
    results = benchmark(args)
    print(f"{'compile':8s} {'model':11s} {'params':>12s} {'img/s':>9s} {'min-max':>17s}")
    for r in results:
        spread = f"{min(r.images_per_s):.1f}-{max(r.images_per_s):.1f}"
        print(f"{'on' if r.compiled else 'off':8s} {r.model:11s} {r.params:12,d} {r.median:9.1f} {spread:>17s}")
    for compiled in sorted({r.compiled for r in results}):
        by = {r.model: r for r in results if r.compiled == compiled}
        if "distill" in by and "shared" in by:
            ratios = [s / d for s, d in zip(by["shared"].images_per_s, by["distill"].images_per_s)]
            print(
                f"distill/shared step time (compile {'on' if compiled else 'off'}): "
                f"{statistics.median(ratios):.3f} (min-max {min(ratios):.3f}-{max(ratios):.3f})"
            )
        if "original" not in by:
            continue
        base = by["original"].images_per_s
        for name, r in by.items():
            if name == "original":
                continue
            # Per repeat, the two were timed back to back: their ratio cancels the load of that moment.
            ratios = [b / v for b, v in zip(base, r.images_per_s)]
            print(
                f"{name}/original step time (compile {'on' if compiled else 'off'}): "
                f"{statistics.median(ratios):.3f} (min-max {min(ratios):.3f}-{max(ratios):.3f}); "
                f"img/s ratio {r.median / by['original'].median:.3f}"
            )
    if args.json:
        record = {"args": vars(args), "device": describe(args.device), "results": [asdict(r) for r in results]}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
