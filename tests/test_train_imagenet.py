"""End-to-end tests of recipes/train_imagenet.py on a tiny generated ImageFolder, on CPU.

The task is trivially learnable (bright against dark images), the model a narrow resnet18 at 32x32, so a
run takes seconds. Runs that must be separate processes (a real SIGKILL, exact resume, the CLI's exit
status) are subprocesses; the bad-input cases call the recipe's ``main`` in-process through the same
``run_recipe`` wrapper the script uses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import share_transform
from share_transform.train import METRIC_KEYS, resolve_args, run_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_imagenet.py"
TINY_MODEL = json.dumps({"channels": [16, 32, 64, 128], "layers": [2, 2, 2, 2]})
RUN_KEYS = {
    "recipe",
    "arch",
    "dataset",
    "share",
    "policy",
    "seed",
    "epochs",
    "batch_size",
    "lr",
    "params_unshared",
    "unique_params",
    "args",
}
STEPS_PER_EPOCH = 4  # 64 training images, global batch 16


def make_image_folder(root: Path, *, train_per_class: int = 32, val_per_class: int = 16) -> Path:
    """``root/{train,val}/{bright,dark}/*.jpg``: noisy 40x48 images, bright (170-255) or dark (0-85)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for cls, (lo, hi) in (("bright", (170, 256)), ("dark", (0, 86))):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(lo, hi, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=95)
    return root


def load_recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_imagenet", RECIPE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_argv(data: Path, output: Path, *extra: str) -> list[str]:
    """A 2-epoch run of the tiny model; ``extra`` flags override (argparse keeps the last value)."""
    return [
        "--data", str(data), "--output", str(output), "--arch", "resnet18", "--model-kwargs", TINY_MODEL,
        "--img-size", "32", "--epochs", "2", "--batch-size", "16", "--lr", "0.8", "--workers", "0",
        "--device", "cpu", "--print-freq", "2", *extra,
    ]  # fmt: skip


def run_script(argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # One thread: the same kernels in every run (exact comparisons), and no oversubscribed CI cores.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(RECIPE), *argv], capture_output=True, text=True, env=full_env, timeout=300, cwd=ROOT
    )


def kill_on_line(script: Path, argv: list[str], pattern: str, *, timeout: float = 300) -> tuple[int, str]:
    """Run ``script``; SIGKILL it from outside as soon as it prints a line matching ``pattern``.

    Returns ``(returncode, output up to that line)``; the test fails if the line never comes (the run ends or
    ``timeout`` seconds pass first). The recipe flushes every progress line, so the kill lands within
    moments of the step the line reports.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                proc.kill()
                break
        else:
            pytest.fail(f"{script.name} never printed a line matching {pattern!r}:\n{''.join(lines)}")
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return proc.returncode, "".join(lines)


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def kill_a_loader_worker(script: Path, args: list[str], pattern: str) -> tuple[int, str]:
    """Run ``script``; when it prints a line matching ``pattern``, SIGKILL one of its DataLoader workers (as the
    kernel's OOM killer would); return ``(returncode, stdout and stderr)``, the worker's pid written ``PID``."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    lines, killed = [], None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if killed is None and re.search(pattern, line):
                killed = _children(proc.pid)[0]
                os.kill(killed, signal.SIGKILL)
        rc = proc.wait(timeout=300)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert killed is not None, "".join(lines)
    return rc, "".join(lines).replace(str(killed), "PID")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def state_epoch(output: Path) -> int:
    return torch.load(output / "checkpoint-last.state.pt", weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny-imagenet"))


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """An uninterrupted deterministic 2-epoch shared run."""
    output = tmp_path_factory.mktemp("reference") / "run"
    proc = run_script(recipe_argv(data, output, "--share", "--deterministic"))
    return output, proc


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    return load_recipe()


def run_inprocess(recipe: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses: small kernels lose more than they gain from threads
    try:
        rc = run_recipe(recipe.main, recipe.get_args_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.exists() else {}


def test_protocol_defaults_are_design_section_3(recipe: ModuleType) -> None:
    args = resolve_args(recipe.get_args_parser().parse_args([]), recipe="imagenet")
    assert (args.epochs, args.batch_size, args.lr, args.lr_reference_batch) == (90, 256, 0.1, 256)
    assert (args.momentum, args.weight_decay, args.lr_milestones, args.lr_gamma) == (0.9, 1e-4, [30, 60], 0.1)
    assert (args.img_size, args.policy, args.init, args.share, args.ten_crop) == (
        224,
        "imagenet",
        "fan_out",
        True,
        False,
    )


def test_two_epochs_end_to_end(reference: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    output, proc = reference
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "epoch 2/2" in proc.stdout and "img/s" in proc.stdout  # the progress bar

    run = json.loads((output / "run.json").read_text())
    assert RUN_KEYS <= set(run)
    assert (run["recipe"], run["arch"], run["dataset"], run["share"], run["policy"]) == (
        "imagenet", "resnet18", "imagenet", True, "imagenet"
    )  # fmt: skip
    assert (run["epochs"], run["batch_size"], run["seed"]) == (2, 16, 0)
    assert run["lr"] == pytest.approx(0.8 * 16 / 256)  # --lr is per 256 images
    assert run["unique_params"] < run["params_unshared"]
    assert run["args"]["img_size"] == 32 and run["args"]["deterministic"] is True

    metrics = read_metrics(output)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(list(m) == list(METRIC_KEYS) for m in metrics)
    assert all(m["shared"] is True and m["unique_params"] == run["unique_params"] for m in metrics)
    # It learns: fewer training mistakes, and few in epoch 2. (The mean train loss of 4 steps is too noisy under
    # colour jitter to compare; held-out errors are not asserted: after 8 steps BatchNorm's running statistics,
    # which evaluation uses, are still near their initial values, and a run predicts one class or the other
    # depending on the seed, under every loader.)
    assert metrics[1]["train_top1_err"] < metrics[0]["train_top1_err"]
    assert metrics[1]["train_top1_err"] < 25
    assert all(0 <= m[k] <= 100 for m in metrics for k in METRIC_KEYS if k.endswith("_err"))
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for tag in ("last", "best"):
        assert (output / f"checkpoint-{tag}.safetensors").is_file()
        assert (output / f"checkpoint-{tag}.state.pt").is_file()
    assert state_epoch(output) == 2
    model = share_transform.load(output / "checkpoint-last.safetensors")
    assert share_transform.is_tied(model)
    assert share_transform.count_parameters(model) == run["unique_params"]
    groups = share_transform.get_plan(model).groups
    assert groups and all(len(g.members) >= 2 for g in groups)
    # Trained at --img-size 32: both checkpoints say so (sharetx inspect shows it, export uses it), not the plan's 224.
    assert share_transform.get_plan(model).input_size == (3, 224, 224)
    for tag in ("last", "best"):
        assert share_transform.read_info(output / f"checkpoint-{tag}.safetensors").input_size == (3, 32, 32)


def test_sigkill_then_resume_equals_uninterrupted_run(
    reference: tuple[Path, subprocess.CompletedProcess[str]], data: Path, tmp_path: Path
) -> None:
    ref_output, ref_proc = reference
    assert ref_proc.returncode == 0, ref_proc.stderr
    output = tmp_path / "run"
    # More loader processes than the reference's none: the data stream must not depend on them. The torch loader
    # (the default) ships each sample's colour draws; the device applies them, so resume replays them exactly.
    argv = recipe_argv(data, output, "--share", "--deterministic", "--workers", "2", "--loader", "torch")
    # Killed in the middle of epoch 2, after two of its updates (the progress line of step 2/4).
    rc, out = kill_on_line(RECIPE, argv, rf"^epoch 2/2 \[.*\] 2/{STEPS_PER_EPOCH} ")
    assert rc == -signal.SIGKILL, out
    assert state_epoch(output) == 1 and len(read_metrics(output)) == 1

    resumed = run_script([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "after epoch 1" in resumed.stdout

    got, want = tensors(output / "checkpoint-last.safetensors"), tensors(ref_output / "checkpoint-last.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    ours, theirs = read_metrics(output), read_metrics(ref_output)
    assert [m["train_loss"] for m in ours] == [m["train_loss"] for m in theirs]
    assert [m["val_top1_err"] for m in ours] == [m["val_top1_err"] for m in theirs]


def test_cli_error_is_one_line_and_exit_2(data: Path, tmp_path: Path) -> None:
    proc = run_script(recipe_argv(data, tmp_path / "run", "--arch", "resnet_nonexistent"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "resnet_nonexistent" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _bad_layouts(tmp: Path, data: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "empty").mkdir()
    (tmp / "flat" / "images").mkdir(parents=True)
    (tmp / "flat" / "images" / "a.png").write_bytes((data / "val" / "dark" / "0.jpg").read_bytes())
    (tmp / "noimages" / "train" / "cat").mkdir(parents=True)
    (tmp / "noimages" / "val" / "cat").mkdir(parents=True)
    return {
        "missing": (tmp / "does-not-exist", "does not exist"),
        "empty": (tmp / "empty", "is empty"),
        "no train/ or val/": (tmp / "flat", "has no train/ or val/ (found images/)"),
        "class folders without images": (tmp / "noimages", "cat"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "no train/ or val/", "class folders without images"])
def test_bad_data_dir(case: str, recipe: ModuleType, data: Path, tmp_path: Path, capsys) -> None:
    bad, expected = _bad_layouts(tmp_path, data)[case]
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    rc, _, err = run_inprocess(recipe, recipe_argv(bad, output), capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert snapshot(output) == {"notes.txt": b"mine"}


BAD_FLAGS = {
    "unknown policy": (["--policy", "resnet"], "unknown policy 'resnet'"),
    "constructor argument outside the allow-list": (
        ["--model-kwargs", '{"bogus": 1}'],
        "error: --model-kwargs: constructor argument 'bogus' is not accepted",
    ),
    # build_model's own ModelArgumentError, once: the recipe does not wrap it again.
    "constructor argument the model does not take": (
        ["--model-kwargs", '{"widen_factor": 2}'],
        "error: timm model 'resnet18' rejected its arguments {'widen_factor': 2, 'num_classes': 2}: "
        "ResNet.__init__() got an unexpected keyword argument 'widen_factor'",
    ),
    "resume without a run": (["--resume"], "holds no checkpoint-last to continue from"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags(case: str, recipe: ModuleType, data: Path, tmp_path: Path, capsys) -> None:
    flags, expected = BAD_FLAGS[case]
    rc, _, err = run_inprocess(recipe, recipe_argv(data, tmp_path / "run", *flags), capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_world_size(
    recipe: ModuleType, data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What torchrun sets for the first of two ranks; the check must fail before any rendezvous.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc, _, err = run_inprocess(recipe, recipe_argv(data, tmp_path / "run", "--batch-size", "15"), capsys)
    assert rc == 2
    assert err == "error: (rank 0) --batch-size 15 is not divisible by the world size 2; use a multiple of 2\n"
    assert not (tmp_path / "run").exists()


def test_fresh_run_never_overwrites_a_run(
    reference: tuple[Path, subprocess.CompletedProcess[str]], recipe: ModuleType, data: Path, capsys
) -> None:
    output, _ = reference
    before = snapshot(output)
    rc, _, err = run_inprocess(recipe, recipe_argv(data, output), capsys)
    assert rc == 2 and err.count("\n") == 1 and "--resume" in err
    assert snapshot(output) == before


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--lr", "1.6"], "was trained with --lr 0.8, this command gives --lr 1.6;"),
        (["--momentum", "0.8"], "was trained with --momentum 0.9, this command gives --momentum 0.8;"),
        (["--weight-decay", "0"], "was trained with --weight-decay 0.0001, this command gives --weight-decay 0.0;"),
        (["--lr-milestones", "1"], "was trained with --lr-milestones 30 60, this command gives --lr-milestones 1;"),
        (["--lr-gamma", "0.5"], "was trained with --lr-gamma 0.1, this command gives --lr-gamma 0.5;"),
    ],
    ids=["lr", "momentum", "weight-decay", "lr-milestones", "lr-gamma"],
)
def test_resume_refuses_other_optimisation_flags(
    flags: list[str],
    expected: str,
    reference: tuple[Path, subprocess.CompletedProcess[str]],
    recipe: ModuleType,
    data: Path,
    capsys,
) -> None:
    output, _ = reference
    before = snapshot(output)
    rc, _, err = run_inprocess(recipe, recipe_argv(data, output, "--resume", "--epochs", "3", *flags), capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --resume: {output} {expected}"), err
    assert snapshot(output) == before


def test_resume_may_add_epochs(
    reference: tuple[Path, subprocess.CompletedProcess[str]], recipe: ModuleType, data: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "run"
    shutil.copytree(reference[0], output)
    rc, out, err = run_inprocess(recipe, recipe_argv(data, output, "--share", "--resume", "--epochs", "3"), capsys)
    assert rc == 0, err
    assert "after epoch 2" in out and [m["epoch"] for m in read_metrics(output)] == [1, 2, 3]
    assert json.loads((output / "run.json").read_text())["epochs"] == 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    recipe: ModuleType, data: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "run"
    # A real divergence: from epoch 2 the lr is 0.05 * 1e20, and weight decay blows the weights up.
    argv = recipe_argv(data, output, "--lr-milestones", "1", "--lr-gamma", "1e20")
    rc, out, err = run_inprocess(recipe, argv, capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("error: the training loss became NaN or infinite at epoch 2, step ")
    assert f"the last good checkpoint is {output / 'checkpoint-last.safetensors'} (epoch 1)" in err
    assert "epoch 1:" in out
    assert state_epoch(output) == 1 and [m["epoch"] for m in read_metrics(output)] == [1]
    model = share_transform.load(output / "checkpoint-last.safetensors")
    assert share_transform.is_tied(model)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_original_model_with_ten_crop_evaluation(recipe: ModuleType, data: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "run"
    rc, _, err = run_inprocess(recipe, recipe_argv(data, output, "--no-share", "--ten-crop", "--epochs", "1"), capsys)
    assert rc == 0, err
    run = json.loads((output / "run.json").read_text())
    assert (run["share"], run["policy"], run["args"]["ten_crop"]) == (False, None, True)
    assert run["unique_params"] == run["params_unshared"]
    (metrics,) = read_metrics(output)
    assert metrics["shared"] is False and metrics["unique_params"] == run["unique_params"]
    assert share_transform.get_plan(share_transform.load(output / "checkpoint-last.safetensors")) is None


@pytest.mark.parametrize(
    ("script", "took_effect"),
    [
        ("train_imagenet.py", lambda model: [len(model.layer1), len(model.layer4)] == [2, 2]),  # resnet50: 3, 3
        ("train_cifar.py", lambda model: model.drop_rate == 0.2),
    ],
)
def test_model_kwargs_example_builds_the_default_arch(script: str, took_effect) -> None:
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "recipes" / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.get_args_parser()
    (action,) = [a for a in parser._actions if "--model-kwargs" in a.option_strings]
    example = re.search(r"e\.g\. '(\{.*\})' for (\S+)", action.help)
    assert example is not None and example[2] == parser.get_default("arch")
    with torch.device("meta"):  # nothing allocated
        model = share_transform.build_model(example[2], **json.loads(example[1]))
    assert took_effect(model)


def test_synthetic_data(recipe: ModuleType, tmp_path: Path, capsys) -> None:
    output = tmp_path / "run"
    argv = recipe_argv(tmp_path / "unused", output, "--synthetic", "--epochs", "1", "--batch-size", "2")
    rc, out, err = run_inprocess(recipe, argv, capsys)
    assert rc == 0, err
    assert "40 train / 10 val images, 1000 classes" in out
    assert json.loads((output / "run.json").read_text())["dataset"] == "synthetic"
    assert len(read_metrics(output)) == 1
