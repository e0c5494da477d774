"""Compressing a trained model in the recipes: a warm start from the trained original, distillation from it, the
epoch-0 line, the fine-tuning schedule, and the resume and bad-input guarantees around them. Tiny networks on
generated data, CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from test_train_cifar import _learnable, argv, train
from test_train_imagenet import ROOT, kill_on_line, make_image_folder, recipe_argv, run_script

import share_transform
from share_transform.files import read_info
from share_transform.train import build_optimizer, run_recipe
from share_transform.train.data import write_cifar
from share_transform.train.distill import Distillation, file_sha256, kd_loss, weights_sha256
from share_transform.train.loop import train_step
from share_transform.train.metrics import EPOCH0_KEYS, curves_figure
from share_transform.train.optim import WarmupCosine, build_scheduler
from share_transform.train.report import load_run, write_report

CIFAR = ROOT / "recipes" / "train_cifar.py"
IMAGENET = ROOT / "recipes" / "train_imagenet.py"
TEACHER_FLAGS = "--arch wrn_16_1 --no-share --epochs 2 --batch-size 32 --lr 0.4 --preprocess meanstd --no-hflip"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar-distill")
    rng = np.random.default_rng(1)
    write_cifar(root, "cifar10", _learnable(rng, 64, 10), _learnable(rng, 32, 10))
    return root


@pytest.fixture(scope="module")
def teacher(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory: WRN-16-1, unshared, trained 2 epochs (the trained original of the tests below)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(data, out, TEACHER_FLAGS)
    return out


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def without_speed(output: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "images_per_s"} for m in metrics(output)]


def run_cifar_inprocess(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    import test_train_cifar

    capsys.readouterr()
    recipe = test_train_cifar.train_cifar
    rc = run_recipe(recipe.main, recipe.get_args_parser().parse_args(args))
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the loss


def test_kd_loss_equals_a_hand_computation_on_fixed_logits() -> None:
    student = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]]
    teacher = [[2.0, 0.5, 1.0], [0.0, 1.0, 3.0]]
    targets, t, alpha = [1, 2], 2.0, 0.7

    def softmax(row: list[float], temp: float) -> list[float]:
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for s_row, t_row, y in zip(student, teacher, targets):
        p_t, p_s = softmax(t_row, t), softmax(s_row, t)
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        ce += -math.log(softmax(s_row, 1.0)[y])
    expected = alpha * t * t * kl / 2 + (1 - alpha) * ce / 2

    got = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), temperature=t, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # alpha 0 is plain cross-entropy; a student equal to its teacher adds no KD term.
    only_ce = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), temperature=t, alpha=0.0)
    assert only_ce.item() == pytest.approx(ce / 2, rel=1e-6)
    same = kd_loss(torch.tensor(teacher), torch.tensor(teacher), torch.tensor(targets), temperature=t, alpha=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_the_teacher_gets_no_gradient_keeps_its_state_and_is_in_no_optimizer_group() -> None:
    torch.manual_seed(0)
    teacher = share_transform.build_model("wrn_10_1", num_classes=10)
    student = share_transform.build_model("wrn_10_1", num_classes=10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill = Distillation(teacher, temperature=4.0, alpha=0.9)
    optimizer = build_optimizer(student, lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        train_step(student, x, y, optimizer, amp=False, distill=distill)
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # Eval mode: the BatchNorm statistics did not move either; every tensor is as it was.
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is not None for p in student.parameters())
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in student.parameters()} and not optimised & {id(p) for p in teacher.parameters()}


# ------------------------------------------------------------------------------------------------ the schedule


def test_warmup_cosine_by_hand_and_through_the_scheduler() -> None:
    f = WarmupCosine(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0, abs=1e-12)
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    scheduler = build_scheduler(optimizer, schedule="finetune", total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == [0.1, 0.2, 0.2] and lrs[-1] == pytest.approx(0.2 * f(9))
    # The state a checkpoint keeps restores the lambda's own numbers (weights_only-safe: plain ints).
    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [{"total_steps": 10, "warmup_steps": 2}]


def test_finetune_preset_defaults_and_the_other_schedules_flags() -> None:
    import test_train_cifar

    from share_transform.train import ConfigError, resolve_args

    parser = test_train_cifar.train_cifar.get_args_parser()
    step = resolve_args(parser.parse_args([]), recipe="cifar")
    assert (step.epochs, step.lr, step.lr_milestones, step.lr_gamma, step.warmup_epochs) == (
        200,
        0.1,
        [60, 120, 160],
        0.2,
        None,
    )
    fine = resolve_args(parser.parse_args(["--schedule", "finetune"]), recipe="cifar")
    # A tenth of the lr (Caffe's fine-tuning example), 2/9 of the epochs (its 100k of 450k iterations), 1 warm-up.
    assert (fine.epochs, fine.lr, fine.lr_milestones, fine.lr_gamma, fine.warmup_epochs) == (44, 0.01, [], None, 1.0)
    with pytest.raises(ConfigError, match="^--lr-milestones belongs to --schedule step$"):
        resolve_args(parser.parse_args(["--schedule", "finetune", "--lr-milestones", "3"]), recipe="cifar")
    with pytest.raises(ConfigError, match="^--warmup-epochs belongs to --schedule finetune$"):
        resolve_args(parser.parse_args(["--warmup-epochs", "2"]), recipe="cifar")


# ------------------------------------------------------------------------------------------ a distillation run


DISTILL = "--arch wrn_16_1 --policy imagenet --distill --schedule finetune --epochs 2 --batch-size 32"


def test_distillation_run_records_its_teacher_and_keeps_it_out_of_the_checkpoints(data, teacher, tmp_path):
    out = tmp_path / "run"
    train(data, out, f"{DISTILL} --preprocess meanstd --no-hflip --from-checkpoint {teacher}")

    run = json.loads((out / "run.json").read_text())
    teacher_file = teacher / "checkpoint-best.safetensors"
    assert run["teacher"]["source"] == "checkpoint" and run["teacher"]["file"] == str(teacher_file)
    assert run["teacher"]["file_sha256"] == file_sha256(teacher_file)
    original = share_transform.build_model("wrn_16_1", num_classes=10)
    share_transform.load_checkpoint(original, teacher_file)
    assert run["teacher"]["weights_sha256"] == weights_sha256(original)
    assert (run["warm_start"], run["distill"], run["schedule"]) == (
        "mean",
        {"temperature": 4.0, "alpha": 0.9},
        "finetune",
    )

    # Policy imagenet on WRN-16-1 (2 blocks a stage): each stage's two second 3x3s share one weight.
    student = share_transform.load(out / "checkpoint-last.safetensors")
    unique = share_transform.count_parameters(student)
    assert (run["params_unshared"], run["unique_params"]) == (share_transform.count_parameters(original), unique)
    # state.pt: the optimizer's momentum holds one buffer per unique student parameter, and nothing else is a tensor.
    state = torch.load(out / "checkpoint-last.state.pt", weights_only=True)
    tensors = [t for s in state["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert sum(t.numel() for t in tensors) == unique
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(list(student.parameters()))
    # The weights file stores the student alone: its parameters (each shared weight once) and BatchNorm buffers.
    buffers = sum(b.numel() for b in student.buffers())
    assert read_info(out / "checkpoint-last.safetensors").stored_numel == unique + buffers
    assert read_info(out / "checkpoint-best.safetensors").stored_numel == unique + buffers

    # The epoch-0 line comes first: the warm start and the trained original before the first step.
    lines = metrics(out)
    assert [m["epoch"] for m in lines] == [0, 1, 2]
    assert set(lines[0]) == set(EPOCH0_KEYS) and lines[0]["unique_params"] == unique
    # The teacher's figure at epoch 0 is the teacher run's own last test error: the same weights on the same set.
    teacher_lines = metrics(teacher)
    best = min(teacher_lines, key=lambda m: (m["val_top1_err"], m["epoch"]))
    assert lines[0]["teacher_val_top1_err"] == best["val_top1_err"]
    assert lines[0]["teacher_val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    # The report reads it: the run is complete after 2 trained epochs and is its own configuration.
    loaded = load_run(out)
    assert loaded.complete and loaded.final["epoch"] == 2 and loaded.start["epoch"] == 0
    assert loaded.method == "mean warm start, KD"
    report = write_report([out, teacher], tmp_path / "report")
    assert {r.label for r in report.results} == {"WRN-16-1", "WRN-16-1 Share [mean warm start, KD]"}


def test_an_exact_warm_start_starts_where_its_original_is_and_the_curves_draw_the_teacher(data, teacher, tmp_path):
    # Soft sharing with as many templates as members (2 a group, policy swrn on WRN-16-1): the svd warm start
    # computes what the original did, so epoch 0 measures the same figures for both.
    out = tmp_path / "run"
    flags = (
        "--arch wrn_16_1 --policy swrn --templates 2 --val-split 0 --cutout 0 --pad reflect --classifier-init "
        f"uniform --preprocess meanstd --no-hflip --from-checkpoint {teacher} --epochs 1 --batch-size 32"
    )
    train(data, out, flags)
    zero = metrics(out)[0]
    run = json.loads((out / "run.json").read_text())
    assert run["warm_start"] == "svd" and run["distill"] is None  # a warm start fine-tuned without KD
    assert zero["val_top1_err"] == zero["teacher_val_top1_err"]
    assert zero["val_loss"] == pytest.approx(zero["teacher_val_loss"], rel=1e-4)
    fig = curves_figure(metrics(out), title="t")
    errors = fig.axes[1]
    flat = [line for line in errors.lines if line.get_label().startswith("trained original")]
    assert len(flat) == 1 and set(flat[0].get_ydata()) == {zero["teacher_val_top1_err"]}
    top1 = next(line for line in errors.lines if line.get_label() == "test top-1")
    assert list(top1.get_xdata()) == [0, 1]  # the warm start's point at epoch 0, then the trained epoch


def test_a_killed_distillation_run_resumes_bit_identical(data, teacher, tmp_path):
    flags = f"{DISTILL} --preprocess meanstd --from-checkpoint {teacher} --recalibrate-bn 1 --deterministic --seed 3"
    train(data, tmp_path / "straight", flags)
    out = tmp_path / "killed"
    rc, output = kill_on_line(CIFAR, argv(data, out, flags), r"^epoch 2/2 \[.*\] 1/2 ")
    assert rc == -signal.SIGKILL, output
    assert "recalibrated the BatchNorm statistics on 1 training batches" in output
    assert [m["epoch"] for m in metrics(out)] == [0, 1]
    train(data, out, flags + " --resume")
    assert without_speed(out) == without_speed(tmp_path / "straight")
    for tag in ("last", "best"):
        got = load_file(out / f"checkpoint-{tag}.safetensors")
        want = load_file(tmp_path / "straight" / f"checkpoint-{tag}.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), tag


def test_resume_refuses_another_teacher_and_other_epochs_under_finetune(data, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    one = f"{DISTILL.replace('--epochs 2', '--epochs 1')} --preprocess meanstd"
    train(data, out, f"{one} --from-checkpoint {teacher}")
    rc, err = run_cifar_inprocess(argv(data, out, f"{one} --from-checkpoint {teacher} --resume"), capsys)
    assert rc == 0, err  # the same teacher and epochs: accepted (nothing left to train)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # Another trained original of the same network: one weight nudged.
    state = share_transform.checkpoints.read_checkpoint(teacher / "checkpoint-best.safetensors")
    state["fc.weight"] = state["fc.weight"] + 0.01
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(other))
    nudged = share_transform.build_model("wrn_16_1", num_classes=10)
    share_transform.load_checkpoint(nudged, other)
    was = json.loads((out / "run.json").read_text())["teacher"]["weights_sha256"][:12]
    rc, err = run_cifar_inprocess(argv(data, out, f"{one} --from-checkpoint {other} --resume"), capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"error: --resume: {out} was trained from checkpoint {teacher / 'checkpoint-best.safetensors'} (weights "
        f"sha256 {was}), this command gives checkpoint {other} (weights sha256 {weights_sha256(nudged)[:12]}); "
    ), err
    rc, err = run_cifar_inprocess(
        argv(data, out, f"{DISTILL} --preprocess meanstd --from-checkpoint {teacher} --resume"), capsys
    )
    assert rc == 2 and err.count("\n") == 1, err
    assert "was trained with --epochs 1 under --schedule finetune, this command gives --epochs 2" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(data, teacher, tmp_path, capsys):
    other_arch = tmp_path / "wrn10"
    train(data, other_arch, TEACHER_FLAGS.replace("wrn_16_1", "wrn_10_1").replace("--epochs 2", "--epochs 1"))
    pth = tmp_path / "resnet.pth"
    torch.save(share_transform.build_model("wrn_10_1", num_classes=10).state_dict(), pth)
    cases = {
        "--distill --arch wrn_16_1": "error: --distill needs a trained original to learn from: give "
        "--from-checkpoint FILE|RUN or --pretrained",
        f"--arch wrn_16_1 --from-checkpoint {other_arch}": f"error: --from-checkpoint "
        f"{other_arch / 'checkpoint-best.safetensors'} holds a wrn_10_1 (its build record), but this run trains "
        "--arch wrn_16_1; give --arch wrn_10_1 or a checkpoint of wrn_16_1",
        f"--arch wrn_16_1 --from-checkpoint {pth}": f"error: --from-checkpoint {pth} does not fit wrn_16_1: 36 "
        "missing key(s): ",
        "--arch wrn_16_1 --init mean": "error: --init mean is a warm start from trained weights: give "
        "--from-checkpoint FILE|RUN or --pretrained (or --init fan_in to train from scratch)",
        f"--arch wrn_16_1 --from-checkpoint {teacher} --init fan_in": "error: the trained original would go unused",
        f"--arch wrn_16_1 --from-checkpoint {teacher} --templates 2 --init mean": "error: --init mean makes one "
        "hard-shared weight; with --templates use --init svd",
        f"--arch wrn_16_1 --kd-alpha 0.5 --from-checkpoint {teacher}": "error: --kd-alpha sets the distillation "
        "loss; it needs --distill",
        f"--arch wrn_16_1 --from-checkpoint {teacher} --distill --kd-alpha 1.5": "error: --kd-alpha must be at least "
        "0 and at most 1, got 1.5",
        "--arch wrn_16_1 --allocate weights --budget 0.8": "error: --allocate weights chooses the runs from trained "
        "weights",
        f"--arch wrn_16_1 --from-checkpoint {tmp_path / 'nothing'}": f"error: --from-checkpoint "
        f"{tmp_path / 'nothing'} does not exist",
    }
    for flags, expected in cases.items():
        out = tmp_path / "out"
        rc, err = run_cifar_inprocess(
            argv(data, out, f"{flags} --epochs 1 --batch-size 32 --preprocess meanstd"), capsys
        )
        assert rc == 2 and err.count("\n") == 1 and err.startswith(expected), (flags, err)
        assert not out.exists(), flags


def test_distill_without_a_teacher_in_a_real_process(data, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(CIFAR), *argv(data, tmp_path / "o", "--distill --epochs 1")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr == (
        "error: --distill needs a trained original to learn from: give --from-checkpoint FILE|RUN or --pretrained\n"
    )


# ------------------------------------------------------------------------------------- timm's pretrained path

TINY = {"channels": [8, 16, 32, 64], "layers": [2, 2, 2, 2]}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny-imagenet-distill"), train_per_class=16, val_per_class=8)


def test_pretrained_offline_through_timms_overlay_file(images, tmp_path, capsys):
    """``--pretrained --pretrained-path FILE``: timm's own pretrained loader reads FILE (``pretrained_cfg_overlay=
    dict(file=FILE)``), no hub; the teacher holds exactly FILE's weights, and the pil loader, bf16 autocast and
    channels_last all run with distillation."""
    torch.manual_seed(5)
    source = timm.create_model("resnet18", num_classes=2, **TINY)
    weights = tmp_path / "resnet18-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    out = tmp_path / "run"
    argv_ = recipe_argv(images, out, "--model-kwargs", json.dumps(TINY), "--epochs", "1", "--pretrained",
                        "--pretrained-path", str(weights), "--distill", "--loader", "pil", "--amp",
                        "--channels-last", "--schedule", "finetune", "--scope", "block")  # fmt: skip
    proc = run_script(argv_)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["teacher"] == {
        "source": "pretrained",
        "arch": "resnet18",
        "tag": None,
        "hub": None,
        "file": str(weights),
        "file_sha256": file_sha256(weights),
        "weights_sha256": weights_sha256(source),
    }
    assert [m["epoch"] for m in metrics(out)] == [0, 1] and "teacher_val_top1_err" in metrics(out)[0]
    assert f"trained original: timm's pretrained resnet18, read from {weights}" in proc.stdout

    # Without the file, timm's hub weights for resnet18 predict 1000 classes: refused before any download.
    import test_train_imagenet

    recipe = test_train_imagenet.load_recipe()
    capsys.readouterr()
    bad = recipe_argv(images, tmp_path / "hub", "--model-kwargs", json.dumps(TINY), "--pretrained", "--distill")
    assert run_recipe(recipe.main, recipe.get_args_parser().parse_args(bad)) == 2
    assert capsys.readouterr().err == (
        "error: --pretrained: timm's resnet18.a1_in1k predicts 1000 classes and the data have 2; a trained original "
        "must predict the run's classes (train it on these data first, then give --from-checkpoint RUN)\n"
    )
    assert not (tmp_path / "hub").exists()


# ------------------------------------------------------------------------------------------------ torchrun

LAUNCHER = textwrap.dedent(
    """
    import importlib.util, os, sys
    import torch

    spec = importlib.util.spec_from_file_location("train_imagenet", sys.argv[1])
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    model = recipe.main(recipe.get_args_parser().parse_args(sys.argv[3:]))
    torch.save(model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
    """
)


def test_two_ranks_distil_from_their_own_teacher_and_agree(images, tmp_path):
    import argparse

    torch.manual_seed(6)
    # The teacher as timm's train.py saves it: model_best.pth.tar, its arguments an argparse.Namespace.
    teacher = tmp_path / "model_best.pth.tar"
    state = timm.create_model("resnet18", num_classes=2, **TINY).state_dict()
    torch.save(
        {"epoch": 3, "arch": "resnet18", "state_dict": state, "args": argparse.Namespace(model="resnet18")}, teacher
    )
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "run"
    flags = recipe_argv(images, out, "--model-kwargs", json.dumps(TINY), "--from-checkpoint", str(teacher),
                        "--distill", "--recalibrate-bn", "1")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
           str(IMAGENET), str(tmp_path), *flags]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 0 (before the first step)") == 1
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = share_transform.load(out / "checkpoint-last.safetensors")
    assert all(torch.equal(t, rank0[k]) for k, t in saved.state_dict().items())
    assert [m["epoch"] for m in metrics(out)] == [0, 1, 2]


# ---------------------------------------------------------------------------------------- the experiment script


def load_experiment(monkeypatch: pytest.MonkeyPatch):
    """recipes/compress_experiment.py as its script imports it: beside its siblings, by name."""
    import importlib.util

    import test_train_cifar

    monkeypatch.setitem(sys.modules, "train_cifar", test_train_cifar.train_cifar)
    for name in ("digits_experiment", "compress_experiment"):  # the second imports the first by name
        spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
    return module


def test_compress_experiment_runs_each_setting_reports_every_epoch_and_continues(tmp_path, monkeypatch, capsys):
    import test_train_cifar

    from share_transform.train import resolve_args

    experiment = load_experiment(monkeypatch)
    trained = []

    def fake_train(args):
        """Checks the flags as the recipe resolves them, then writes the run directory it would: an epoch-0 line and
        one per epoch, the accuracy a made-up function of the setting and the seed."""
        args = resolve_args(test_train_cifar.train_cifar.resolve_protocol(args), recipe="cifar")
        name = args.output.name
        trained.append(name)
        key = "t" if name == "teacher" else name.split("-")[1]
        start = {"t": 10.0, "a": 40.0, "b": 50.0, "c": 60.0, "d": 10.0, "e": 10.0}[key]
        lines = [{"epoch": 0, "val_top1_err": 100.0 - start}] if args.evaluate_first else []
        lines += [{"epoch": e, "val_top1_err": 100.0 - start - 10 * e - args.seed} for e in range(1, args.epochs + 1)]
        info = {"arch": args.arch, "dataset": "digits", "share": args.share, "epochs": args.epochs,
                "unique_params": 1000 if key == "t" else int(1000 * args.budget) - ord(key),
                "args": {"init": args.init, "distill": args.distill, "templates": args.templates,
                         "allocate": args.allocate, "from_checkpoint": str(args.from_checkpoint)}}  # fmt: skip
        args.output.mkdir(parents=True)
        (args.output / "run.json").write_text(json.dumps(info))
        (args.output / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))

    monkeypatch.setattr(experiment.digits_experiment.train_cifar, "main", fake_train)  # it trains the runs
    docs = tmp_path / "docs"
    argv = ["--out", str(tmp_path / "out"), "--seeds", "0", "1", "--epochs", "2", "--teacher-epochs", "3",
            "--budgets", "0.75", "0.3", "--docs", str(docs)]  # fmt: skip
    experiment.main(experiment.get_args_parser().parse_args(argv))
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("run ")]
    assert progress[0] == "run 1 of 21: wrn_28_1 teacher; ETA for all runs after the first run"
    assert progress[1] == "run 2 of 21: budget 0.75, a (hard mean + KD), seed 0; ETA for all runs " + progress[1][-7:]
    assert all(line.startswith(f"run {k} of 21: ") and line.endswith(" min") for k, line in enumerate(progress[1:], 2))
    keys = "abcde"
    assert trained == ["teacher"] + [f"b{b}-{k}-seed{s}" for b in ("0.75", "0.3") for s in (0, 1) for k in keys]
    runs = tmp_path / "out" / "runs"
    recorded = {k: json.loads((runs / f"b0.3-{k}-seed0" / "run.json").read_text())["args"] for k in keys}
    teacher_file = str(runs / "teacher" / "checkpoint-last.safetensors")
    assert [recorded[k]["init"] for k in keys] == ["mean", "svd", "mean", "fan_in", "fan_in"]
    assert [recorded[k]["distill"] for k in keys] == [True, True, True, False, True]
    assert [recorded[k]["from_checkpoint"] for k in keys] == [teacher_file] * 3 + ["None", teacher_file]
    assert recorded["c"]["allocate"] == "weights" and recorded["a"]["allocate"] is None
    # Two templates fit 0.75 of WRN-28-1 (policy imagenet, scope all); at 0.3 only one does.
    assert json.loads((runs / "b0.75-b-seed0" / "run.json").read_text())["args"]["templates"] == 2
    assert recorded["b"]["templates"] == 1

    report = (docs / "compress.md").read_text().splitlines()
    rows = [line for line in report if line.startswith("| 0.")]
    # Setting a at 0.75: accuracy 40 before the first step for both seeds, then 50 + seed and 60 + seed (seeds 0, 1):
    # means 50.5 and 60.5; final errors 40 and 39.
    assert rows[0] == (
        "| 0.75 | a: hard mean + KD | 653 (0.653) | 40.00 ± 0.00 | 50.50 ± 0.71 | 60.50 ± 0.71 | 40.00 / 39.00 | "
        "39.50 ± 0.71 |"
    )
    assert len(rows) == 10 and rows[3].startswith("| 0.75 | d: scratch | 650 (0.650) | 10.00 ± 0.00 | 20.50 ± 0.71 |")
    assert "* budget 0.3: c (allocate weights + KD), 19.50% against the teacher's 60.00%" in report
    assert (docs / "error_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second call trains nothing: every run is finished.
    experiment.main(experiment.get_args_parser().parse_args(argv))
    assert len(trained) == 21 and "trained 0 runs" in capsys.readouterr().out


def test_compress_experiment_help_states_each_default_once(monkeypatch):
    import re

    module = load_experiment(monkeypatch)
    text = " ".join(module.get_args_parser().format_help().split()).split("options:", 1)[1]
    shown = {o.split()[0]: o for o in re.split(r" (?=--?\w[\w-]* )", text)}
    for flag, default in (("--epochs", "4"), ("--teacher-epochs", "15"), ("--budgets", "[0.75, 0.5, 0.3]"),
                          ("--seeds", "[0, 1, 2]"), ("--templates", "2"), ("--device", "cpu")):  # fmt: skip
        assert shown[flag].endswith(f"(default: {default})") and shown[flag].count("default") == 1, shown[flag]
