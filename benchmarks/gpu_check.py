"""One command for a machine with a GPU: check and time what a CPU-only machine cannot.

    python benchmarks/gpu_check.py [--steps 30] [--recipe-steps 300] [--skip-compile]

Checks (each PASS or FAIL; the exit status is 1 when any fails):

* ties on CUDA: a shared ResNet-50 moved to the GPU (and to channels_last) keeps one tensor per shared weight;
* AMP bf16: a training step of the shared model under bf16 autocast gives a finite loss, and each shared
  weight's gradient is one tensor for all its blocks;
* ``torch.compile`` of the shared model in training: steps run, ties survive, and the compiled output
  matches eager within bf16 tolerance;
* NCCL DDP on every GPU present: one step of a shared model; every rank ends with the same weights.

Measures (one table, with the card's name):

* ResNet-50 training images/s, original against shared, bf16 + channels_last, compile off and on,
  synthetic data (the variants alternate, each timed over ``--steps`` steps after warm-up);
* the input pipelines on all cores: ``torch`` (DataLoader with one worker per core) and ``dali`` (GPU JPEG
  decoding, ``mixed``) over 500x375 JPEGs (``benchmarks/data_throughput.py``'s);
* a ``--recipe-steps`` training run of ResNet-50 on those JPEGs with each loader: images/s and the fraction
  of the wall time the GPU was busy (CUDA events around each step's work).

Without a CUDA device it prints one line and exits with status 2. Budget: under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import share_transform as st
from share_transform.tie import alias_groups, keep_ties
from share_transform.train import DistInfo, make_loader, set_epoch, train_step
from share_transform.train.data.imagenet import MEAN, PCA_EIGVAL, PCA_EIGVEC, STD, imagenet_datasets
from share_transform.train.loop import ColourAugment, Normalize
from share_transform.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import make_jpeg_folder  # noqa: E402

BATCH = 256
IMG = 224


def shared_resnet50(share: bool = True, num_classes: int = 1000) -> nn.Module:
    model = st.build_model("resnet50", num_classes=num_classes)
    return st.apply(model) if share else model


# -- checks ---------------------------------------------------------------------------------------------------------


def check_ties_on_cuda(device: torch.device) -> str:
    model = shared_resnet50()
    ties = alias_groups(model)
    assert ties, "the shared model has no shared weights"
    model.to(device)
    keep_ties(model, ties, "moving to CUDA")
    model.to(memory_format=torch.channels_last)
    keep_ties(model, ties, "channels_last")
    assert all(p.is_cuda for p in model.parameters())
    return f"{len(ties)} shared weights kept on {device}"


def check_amp_bf16(device: torch.device) -> str:
    model = shared_resnet50().to(device).to(memory_format=torch.channels_last)
    ties = alias_groups(model)
    optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(32, 3, IMG, IMG, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (32,), device=device)
    loss, _ = train_step(model, x, y, optimizer, amp=True)
    assert torch.isfinite(loss), f"loss {loss.item()}"
    assert alias_groups(model) == ties, "the step untied the shared weights"
    return f"loss {loss.item():.3f}"


def check_compile(device: torch.device) -> str:
    torch.manual_seed(0)
    model = shared_resnet50().to(device).to(memory_format=torch.channels_last)
    ties = alias_groups(model)
    compiled = torch.compile(model)
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(32, 3, IMG, IMG, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (32,), device=device)
    for _ in range(3):
        loss, _ = train_step(compiled, x, y, optimizer, amp=True)
    assert torch.isfinite(loss), f"loss {loss.item()}"
    assert alias_groups(model) == ties, "training the compiled model untied the shared weights"
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager, fast = model(x).float(), compiled(x).float()
    err = (eager - fast).abs().max().item() / max(eager.abs().max().item(), 1e-6)
    assert err < 0.05, f"compiled output differs from eager by {err:.3g} (relative)"
    return f"3 steps, loss {loss.item():.3f}, eval max rel. diff {err:.1e}"


def _ddp_worker(rank: int, world: int, port: int, results: Any) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl", rank=rank, world_size=world)
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.manual_seed(0)
        model = st.apply(st.build_model("resnet18", num_classes=10)).to(device)
        ties = alias_groups(model)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
        keep_ties(model, ties, "DistributedDataParallel")
        optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
        torch.manual_seed(rank)  # different data per rank
        x, y = torch.randn(8, 3, 64, 64, device=device), torch.randint(0, 10, (8,), device=device)
        train_step(ddp, x, y, optimizer, amp=True)
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        same = all(torch.equal(gathered[0], g) for g in gathered)
        results.put((rank, same and alias_groups(model) == ties, ""))
        dist.destroy_process_group()
    except Exception:
        results.put((rank, False, traceback.format_exc().strip().splitlines()[-1]))


def check_ddp(device: torch.device) -> str:
    world = torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    bad = [(r, msg) for r, ok, msg in outcome if not ok]
    assert not bad, f"ranks {bad}"
    return f"NCCL, {world} GPU(s): one step, identical weights and ties on every rank"


# -- measures -------------------------------------------------------------------------------------------------------


def train_speed(device: torch.device, steps: int, compile_too: bool) -> list[tuple[str, float]]:
    """ResNet-50 training images/s, original and shared, bf16 + channels_last, compile off (and on)."""
    x = torch.randn(BATCH, 3, IMG, IMG, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (BATCH,), device=device)
    variants: dict[str, Callable[[], None]] = {}
    for share in (False, True):
        for comp in (False, True) if compile_too else (False,):
            model = shared_resnet50(share).to(device).to(memory_format=torch.channels_last)
            run_model = torch.compile(model) if comp else model
            optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)

            def step(m: nn.Module = run_model, o: torch.optim.Optimizer = optimizer) -> None:
                train_step(m, x, y, o, amp=True)

            for _ in range(5):  # warm-up: cuDNN autotuning, compilation
                step()
            variants[f"ResNet-50 {'shared' if share else 'original'}, bf16+CL, compile {'on' if comp else 'off'}"] = (
                step
            )
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):  # rounds, alternating the variants
        for name, step in variants.items():
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
            rates[name].append(steps * BATCH / (time.perf_counter() - start))
    return [(f"{name} (img/s)", statistics.median(r)) for name, r in rates.items()]


def loaders(root: Path, device: torch.device, loader: str, batch: int) -> tuple[Iterable[Any], Callable[..., Any]]:
    """The training loader and device preprocess of ``loader`` over the JPEG folder, on all cores."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    train, _ = imagenet_datasets(root, IMG)
    cores = os.cpu_count() or 1
    if loader == "dali":
        from share_transform.train.data.dali import DaliLoader

        data: Any = DaliLoader(train, batch_size=batch, train=True, seed=0, dist_info=info, threads=cores)  # type: ignore[arg-type]
    else:
        data = make_loader(train, batch_size=batch, train=True, seed=0, dist_info=info, workers=cores)
    augment = ColourAugment(Normalize(MEAN, STD, scale=1.0, channels_last=True), eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC)
    return data, augment


def pipeline_speed(root: Path, device: torch.device, loader: str, batches: int) -> float:
    """Images/s of the loader alone (host work and the copy to the device), all cores."""
    data, augment = loaders(root, device, loader, BATCH)
    n, start = 0, 0.0
    for epoch in range(10**6):
        set_epoch(data, epoch)  # type: ignore[arg-type]
        for i, (images, draws, _) in enumerate(data):
            if n == 0 and i == 0:
                torch.cuda.synchronize(device)
                start = time.perf_counter()  # after the first batch: worker and pipeline start-up
            augment(images.to(device, non_blocking=True), draws.to(device, non_blocking=True))
            n += 1
            if n > batches:
                torch.cuda.synchronize(device)
                return batches * BATCH / (time.perf_counter() - start)
    raise AssertionError("unreachable")


def recipe_run(root: Path, device: torch.device, loader: str, steps: int) -> tuple[float, float]:
    """``steps`` training steps of a shared ResNet-50 fed by ``loader``: (images/s, GPU-busy fraction)."""
    data, augment = loaders(root, device, loader, BATCH)
    model = shared_resnet50(num_classes=2).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    done, start = 0, 0.0
    for epoch in range(10**6):
        set_epoch(data, epoch)  # type: ignore[arg-type]
        for images, draws, targets in data:
            if done == 10:  # warm-up steps done
                torch.cuda.synchronize(device)
                start = time.perf_counter()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            x = augment(images.to(device, non_blocking=True), draws.to(device, non_blocking=True))
            train_step(model, x, targets.to(device, non_blocking=True), optimizer, amp=True)
            end.record()
            if done >= 10:
                events.append((begin, end))
            done += 1
            if done >= steps + 10:
                torch.cuda.synchronize(device)
                wall = time.perf_counter() - start
                busy = sum(b.elapsed_time(e) for b, e in events) / 1000
                return steps * BATCH / wall, min(busy / wall, 1.0)
    raise AssertionError("unreachable")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant and round")
    parser.add_argument("--recipe-steps", type=int, default=300, help="steps of each loader's training run")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs in the generated folder")
    parser.add_argument("--skip-compile", action="store_true", help="leave torch.compile out (saves minutes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device: run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    rows: list[tuple[str, str, str]] = []
    failed = False

    def check(name: str, fn: Callable[[torch.device], str]) -> None:
        nonlocal failed
        try:
            rows.append((name, "PASS", fn(device)))
        except Exception as e:
            failed = True
            rows.append(
                (name, "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            )

    check("ties on CUDA (+ channels_last)", check_ties_on_cuda)
    check("AMP bf16 training step", check_amp_bf16)
    if not args.skip_compile:
        check("torch.compile, shared model, training", check_compile)
    check("NCCL DDP", check_ddp)

    def measure(name: str, fn: Callable[[], Any]) -> None:
        nonlocal failed
        try:
            result = fn()
            for label, value in result if isinstance(result, list) else [(name, result)]:
                rows.append((label, "", value if isinstance(value, str) else f"{value:,.0f}"))
        except Exception as e:
            failed = True
            rows.append(
                (name, "FAIL", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            )

    measure("training speed", lambda: train_speed(device, args.steps, not args.skip_compile))
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(Path(tmp), args.images // 2)
        for loader in ("torch", "dali"):
            measure(
                f"{loader} loader, {os.cpu_count()} cores (img/s)",
                lambda lo=loader: pipeline_speed(root, device, lo, 40),
            )
        for loader in ("torch", "dali"):

            def run(lo: str = loader) -> list[tuple[str, str]]:
                rate, busy = recipe_run(root, device, lo, args.recipe_steps)
                return [
                    (f"{args.recipe_steps}-step run, {lo} loader", f"{rate:,.0f} img/s, GPU busy {100 * busy:.0f}%")
                ]

            measure(f"{loader} recipe run", run)

    name = torch.cuda.get_device_name(device)
    print(
        f"gpu_check on {name} ({torch.cuda.device_count()} GPU(s), {os.cpu_count()} CPU cores), "
        f"torch {torch.__version__}"
    )
    width = max(len(r[0]) for r in rows)
    for label, status, detail in rows:
        print(f"  {label:{width}s}  {status:4s}  {detail}")
    print(f"  {'total time':{width}s}        {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
