"""recipes/train_cifar.py end to end on tiny generated CIFAR-format data, reduced-size networks, CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train_imagenet import RUN_KEYS, kill_a_loader_worker, kill_on_line

import share_transform
from share_transform.errors import ModelArgumentError, OutputExistsError
from share_transform.files import read_info
from share_transform.train import METRIC_KEYS, resolve_args
from share_transform.train.data import ZCA, load_preprocessing, read_cifar, write_cifar
from share_transform.train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_cifar.py"
FAST = ["--workers", "0", "--device", "cpu", "--print-freq", "1"]


def _load_recipe():
    spec = importlib.util.spec_from_file_location("train_cifar", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: timm's registry looks the recipe module up by name
    spec.loader.exec_module(module)
    return module


train_cifar = _load_recipe()


def argv(data: Path, output: Path, flags: str) -> list[str]:
    return ["--data", str(data), "--output", str(output), *flags.split(), *FAST]


def train(data: Path, output: Path, flags: str) -> None:
    """Run the recipe in this process (no interpreter start-up), on one thread as the subprocesses (same kernels,
    so exact comparisons hold), restoring the global determinism flag and thread count."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_cifar.main(train_cifar.get_args_parser().parse_args(argv(data, output, flags)))
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(RECIPE), *args], env=full_env, capture_output=True, text=True, timeout=300
    )


def _learnable(rng: np.random.Generator, n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose mean colour depends on the class, plus noise: a task the loss can fall on."""
    labels = rng.integers(0, classes, n)
    colour = rng.integers(0, 256, (classes, 3))[labels]
    images = rng.normal(colour[:, None, None, :], 25.0, (n, 32, 32, 3))
    return images.clip(0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    write_cifar(root, "cifar10", _learnable(rng, 64, 10), _learnable(rng, 32, 10))
    write_cifar(root, "cifar100", _learnable(rng, 64, 100), _learnable(rng, 32, 100))
    return root


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _without_speed(output: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "images_per_s"} for m in _metrics(output)]


def test_shared_wrn_with_zca_writes_the_run_and_evaluates_with_the_saved_transform(data_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, "--arch wrn_22_1 --share --epochs 2 --batch-size 32 --lr 0.4")

    run = json.loads((out / "run.json").read_text())
    assert RUN_KEYS <= set(run)
    what = (run["recipe"], run["arch"], run["dataset"], run["share"], run["policy"])
    assert what == ("cifar", "wrn_22_1", "cifar10", True, "cifar")
    # WRN-22-1 has 3 blocks per stage; policy "cifar" keeps block 1, so blocks 2-3 share one conv per stage.
    assert (run["params_unshared"], run["unique_params"]) == (272_282, 223_898)
    assert run["args"]["lr_milestones"] == [60, 120, 160] and run["args"]["lr_gamma"] == 0.2
    assert run["args"]["weight_decay"] == 5e-4 and run["args"]["init"] == "fan_in"
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2] and all(set(METRIC_KEYS) <= set(m) for m in metrics)
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    for name in ("curves.png", "checkpoint-last.safetensors", "checkpoint-best.safetensors", "preprocess.safetensors"):
        assert (out / name).stat().st_size > 0, name

    model = share_transform.load(out / "checkpoint-last.safetensors")
    assert share_transform.is_tied(model) and share_transform.count_parameters(model) == 223_898

    # Evaluation used the transform fitted on the *training* images and saved with the run: whitening the raw
    # test split with that file reproduces the logged test loss and error exactly.
    zca = load_preprocessing(out / "preprocess.safetensors")
    assert zca.kind == "zca"
    test = read_cifar(data_dir, "cifar10", train=False)
    raw = torch.from_numpy(test.images).permute(0, 3, 1, 2).float() / 255
    model.eval()
    with torch.no_grad():
        logits = model(zca(raw))
    labels = torch.from_numpy(test.labels)
    err = 100.0 * (logits.argmax(dim=1) != labels).float().mean().item()
    assert err == pytest.approx(metrics[-1]["val_top1_err"])
    assert F.cross_entropy(logits, labels).item() == pytest.approx(metrics[-1]["val_loss"], rel=1e-4)
    train_raw = torch.from_numpy(read_cifar(data_dir, "cifar10", train=True).images).permute(0, 3, 1, 2) / 255
    assert torch.allclose(zca.mean, ZCA.fit(train_raw).mean)


def test_preact_resnet_shared_with_meanstd(data_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, "--arch preact_resnet29 --preprocess meanstd --epochs 1 --batch-size 32")
    run = json.loads((out / "run.json").read_text())
    # Pre-act ResNet-29: 3 bottlenecks per stage, blocks 2-3 share their 3x3.
    assert (run["params_unshared"], run["unique_params"]) == (312_218, 263_834)
    assert run["preprocess"] == "meanstd"
    assert load_preprocessing(out / "preprocess.safetensors").kind == "meanstd"
    assert len(_metrics(out)) == 1 and (out / "curves.png").exists()


def test_synthetic_data_trains_and_a_share_that_shares_nothing_is_called_original(tmp_path, monkeypatch, capsys):
    import share_transform.train.trainer as trainer
    from share_transform.train.report import load_run

    titles: list[str] = []
    draw = trainer.plot_curves

    def recording_plot_curves(path: Path, history: list[dict], *, title: str, **kwargs) -> None:
        titles.append(title)
        draw(path, history, title=title, **kwargs)

    monkeypatch.setattr(trainer, "plot_curves", recording_plot_curves)
    out = tmp_path / "run"
    # No --data: random images of CIFAR-100's shape and classes, preprocessed as real ones would be. WRN-10-1 has
    # one block a stage, which policy cifar keeps: --share shares nothing, and the run must not say it does.
    flags = f"--output {out} --synthetic --dataset cifar100 --arch wrn_10_1 --share --preprocess meanstd --epochs 1"
    train_cifar.main(train_cifar.get_args_parser().parse_args([*flags.split(), "--batch-size", "2", *FAST]))
    stdout, stderr = capsys.readouterr()
    assert "wrn_10_1 (original): 83,700 -> 83,700 parameters; synthetic: 40 train / 10 test images, 100 classes" in (
        stdout
    )
    assert stderr == (
        "note: --share: policy cifar shares nothing in wrn_10_1 (every spatial conv keeps its own weight: first "
        "block of the stage (policy cifar)); training the original network, 83,700 parameters, recorded as unshared\n"
    )
    run = json.loads((out / "run.json").read_text())
    assert (run["dataset"], run["preprocess"]) == ("synthetic", "meanstd")
    assert (run["share"], run["policy"], run["sharing"], run["args"]["share"]) == (False, None, None, True)
    assert [m["shared"] for m in _metrics(out)] == [False] and (out / "curves.png").stat().st_size > 0
    assert titles == ["wrn_10_1 on synthetic, original"]
    assert share_transform.get_plan(share_transform.load(out / "checkpoint-last.safetensors")) is None
    assert load_run(out).share is False  # the report pairs it as an original


def test_wrn_on_cifar100_gets_dropout_and_the_original_trains_unshared(data_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, "--dataset cifar100 --arch wrn_10_1 --no-share --epochs 1 --batch-size 32")
    run = json.loads((out / "run.json").read_text())
    assert (run["dataset"], run["share"], run["policy"]) == ("cifar100", False, None)
    assert run["params_unshared"] == run["unique_params"]
    build = read_info(out / "checkpoint-last.safetensors").build
    assert build["kwargs"] == {"dropout": 0.3, "num_classes": 100}
    model = share_transform.load(out / "checkpoint-last.safetensors")
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules())


def test_resume_after_a_kill_continues_to_the_same_result(data_dir, tmp_path):
    flags = "--arch wrn_10_1 --epochs 2 --batch-size 32 --deterministic --seed 3"
    train(data_dir, tmp_path / "straight", flags)

    # Killed (SIGKILL) during epoch 2, in a real process, then resumed.
    out = tmp_path / "killed"
    # 2 steps an epoch: killed after the first step of epoch 2.
    rc, output = kill_on_line(RECIPE, argv(data_dir, out, flags), r"^epoch 2/2 \[.*\] 1/2 ")
    assert rc == -signal.SIGKILL, output
    assert [m["epoch"] for m in _metrics(out)] == [1]
    fitted = (out / "preprocess.safetensors").read_bytes()
    mtime = (out / "preprocess.safetensors").stat().st_mtime_ns

    train(data_dir, out, flags + " --resume")

    assert _without_speed(out) == _without_speed(tmp_path / "straight")
    resumed = load_file(out / "checkpoint-last.safetensors")
    straight = load_file(tmp_path / "straight" / "checkpoint-last.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)
    # The resumed run reused the transform saved at the start rather than fitting a new one.
    assert (out / "preprocess.safetensors").read_bytes() == fitted
    assert (out / "preprocess.safetensors").stat().st_mtime_ns == mtime


def test_a_fresh_run_never_overwrites_a_finished_one(data_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, "--arch wrn_10_1 --epochs 1 --batch-size 32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="--resume"):
        train(data_dir, out, "--arch wrn_10_1 --epochs 1 --batch-size 32 --preprocess meanstd")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_reduced_sizes_must_follow_the_depth_formulas(data_dir, tmp_path):
    for arch, formula in (("wrn_23_1", r"6n\+4"), ("preact_resnet30", r"9n\+2")):
        with pytest.raises(ModelArgumentError, match=formula):
            train(data_dir, tmp_path / arch, f"--arch {arch} --epochs 1 --batch-size 32 --preprocess meanstd")
    assert not (tmp_path / "wrn_23_1").exists()  # nothing written


def test_absent_data_is_one_error_line(tmp_path):
    proc = run_script("--data", str(tmp_path), "--output", str(tmp_path / "o"), *FAST)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "no cifar10 data under" in proc.stderr and "--download" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_digits_experiment_writes_the_digits_as_cifar(tmp_path):
    spec = importlib.util.spec_from_file_location("digits_experiment", ROOT / "recipes" / "digits_experiment.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)  # imports train_cifar, registered above under that name

    digits.digits_as_cifar(tmp_path)
    train_split = read_cifar(tmp_path, "cifar10", train=True)
    test_split = read_cifar(tmp_path, "cifar10", train=False)
    assert (len(train_split.labels), len(test_split.labels)) == (1347, 450)  # scikit-learn's 1,797, 25% held out
    assert train_split.classes == tuple("0123456789")
    assert np.bincount(test_split.labels).min() >= 43  # stratified: a quarter of each digit (174 to 183)
    image = train_split.images[0]
    assert image.shape == (32, 32, 3) and np.array_equal(image[..., 0], image[..., 2])  # grey in RGB
    assert image.max() > 200 and image.min() == 0
    assert digits.milestones(200) == [60, 120, 160] and digits.milestones(10) == [3, 6, 8]


def test_soft_shared_run_killed_and_resumed_is_bit_identical(data_dir, tmp_path):
    # WRN-16-1, policy swrn: block 2 of each stage mixes a bank of 2 templates with its two 3x3s.
    # 16 of the 64 training images held out: 3 steps of 16 an epoch, the test set evaluated at the end.
    flags = (
        "--arch wrn_16_1 --policy swrn --templates 2 --val-split 16 --epochs 2 --batch-size 16 --deterministic --seed 3"
    )
    train(data_dir, tmp_path / "straight", flags)
    run = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert run["sharing"] == {"group_size": None, "scope": None, "templates": 2, "budget": None, "exclude": []}
    # 3 stages x 2 members, each with 2 coefficients: no weight decay on them, 5e-4 on the rest.
    state = torch.load(tmp_path / "straight" / "checkpoint-last.state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0] and len(groups[1]["params"]) == 3 * 2

    out = tmp_path / "killed"
    rc, output = kill_on_line(RECIPE, argv(data_dir, out, flags), r"^epoch 2/2 \[.*\] 1/3 ")
    assert rc == -signal.SIGKILL, output
    train(data_dir, out, flags + " --resume")
    # The same epochs, and the same test figures on the final and best epochs' lines.
    assert _without_speed(out) == _without_speed(tmp_path / "straight")
    assert "test_top1_err" in _metrics(out)[-1]
    resumed = load_file(out / "checkpoint-last.safetensors")
    straight = load_file(tmp_path / "straight" / "checkpoint-last.safetensors")
    assert resumed.keys() == straight.keys() and any(k.endswith("bank.templates") for k in resumed)
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)

    # A resume with other sharing options is refused in one line, before anything is built.
    changed = run_script(*argv(data_dir, out, flags.replace("--templates 2", "--templates 4")), "--resume")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        f"error: --resume: {out} was trained with --templates 2, this command gives --templates 4; its checkpoint "
        "holds the model these sharing options built, so resume with the same --templates or start a new run in "
        "another --output"
    ]


def test_sharing_experiment_reports_progress_and_the_settings_table(tmp_path, monkeypatch, capsys):
    from test_report import make_run

    recipes = ROOT / "recipes"
    modules = {}
    for name in ("digits_experiment", "sharing_experiment"):  # the second imports the first by name
        spec = importlib.util.spec_from_file_location(name, recipes / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, modules[name])
        spec.loader.exec_module(modules[name])
    sharing = modules["sharing_experiment"]
    trained = []

    def fake_train(args):
        """Stands in for a training run: writes the run directory train_cifar.py would, with a made-up error."""
        # The setting's index in sharing.SETTINGS (WRN) or sharing.BOTTLENECK_SETTINGS, read back from the flags.
        if args.arch == "wrn_28_1":
            if not args.share:
                index = 0
            elif args.policy == "swrn":
                index = 4
            else:
                index = 3 if args.scope == "all" else 2 if args.group_size == 2 else 1
        else:
            assert args.model_kwargs == {"base_width": 8}
            index = 0 if not args.share else 1 if args.scope is None else 2 if args.templates is None else 3
        trained.append((args.arch, index, args.seed, args.epochs))
        make_run(
            args.output.parent, args.output.name, arch=args.arch, dataset="digits", share=args.share, seed=args.seed,
            params=1000 - 100 * index, final_top1=index + args.seed, epochs=args.epochs, policy=args.policy,
            sharing={"group_size": args.group_size, "scope": args.scope, "templates": args.templates},
        )  # fmt: skip

    monkeypatch.setattr(sharing.digits_experiment.train_cifar, "main", fake_train)  # it trains the runs
    argv = ["--out", str(tmp_path / "out"), "--seeds", "0", "1", "--epochs", "2", "--bottleneck-epochs", "3"]
    argv += ["--figure", str(tmp_path / "f.png")]
    sharing.main(sharing.get_args_parser().parse_args(argv))
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("run ")]
    assert progress[0] == "run 1 of 18: wrn_28_1 original, seed 0; ETA for all runs after the first run"
    assert progress[10].startswith("run 11 of 18: preact_resnet38 original, seed 0; ETA for all runs ")
    assert all(line.startswith(f"run {k} of 18: ") and line.endswith(" min") for k, line in enumerate(progress[1:], 2))
    assert trained == [("wrn_28_1", i, seed, 2) for seed in (0, 1) for i in range(5)] + [
        ("preact_resnet38", i, seed, 3) for seed in (0, 1) for i in range(4)
    ]
    text = (tmp_path / "out" / "report" / "sharing.md").read_text()
    wrn, bottleneck = text.split("\n### ")[0], text.split("\n### ")[1]
    assert wrn.startswith("### WRN-28-1\n\n")
    assert bottleneck.startswith("ResNet-38 (pre-act bottleneck, base width 8)\n\n")
    table = wrn.splitlines()[2:]
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| WRN-28-1", "| WRN-28-1 Share", "| WRN-28-1 Share (group size 2)", "| WRN-28-1 Share (scope all)",
        "| WRN-28-1 Share (swrn, 2 templates)",
    ]  # fmt: skip
    assert table[4].split(" | ")[1:] == ["800", "20.0%", "2.00 / 3.00", "2.50 ± 0.71 |"]
    rows = bottleneck.splitlines()[4:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| ResNet-38", "| ResNet-38 Share", "| ResNet-38 Share (scope block)",
        "| ResNet-38 Share (scope block, 2 templates)",
    ]  # fmt: skip
    assert rows[2].split(" | ")[1:] == ["800", "20.0%", "2.00 / 3.00", "2.50 ± 0.71 |"]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second call trains nothing: every run is finished.
    sharing.main(sharing.get_args_parser().parse_args(argv))
    assert len(trained) == 18 and "trained 0 runs" in capsys.readouterr().out
    # --bottleneck '' leaves the bottleneck net out of the runs and the table
    sharing.main(sharing.get_args_parser().parse_args([*argv, "--bottleneck", ""]))
    assert "run 10 of 10: wrn_28_1 soft2, seed 1: done before" in capsys.readouterr().out
    assert "### ResNet-38" not in (tmp_path / "out" / "report" / "sharing.md").read_text()
    # bad --bottleneck-kwargs stop the command before any training
    with pytest.raises(ConfigError, match="--bottleneck-kwargs: constructor argument 'base_widht'"):
        sharing.main(sharing.get_args_parser().parse_args([*argv, "--bottleneck-kwargs", '{"base_widht": 8}']))
    assert len(trained) == 18


# -------------------------------------------------------------------------- model selection and the SWRN protocol


def test_the_best_checkpoint_is_chosen_on_the_held_out_split_and_the_test_set_judges_it_once(tmp_path):
    from share_transform.train.data.cifar import holdout_indices

    # Colour-coded classes; the test set's labels are shifted by one class, so the better the model learns the
    # training task, the worse its test error: the split's best epoch is late, the test set's early.
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (10, 3))

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        pixels = rng.normal(palette[labels][:, None, None, :], 25.0, (n, 32, 32, 3))
        return pixels.clip(0, 255).astype(np.uint8), labels

    train_set, (test_images, test_labels) = images(64), images(32)
    test_set = (test_images, (test_labels + 1) % 10)
    write_cifar(tmp_path / "full", "cifar10", train_set, test_set)
    # The same training images less the 16 --val-split 16 --seed 1 holds out, in the same order: a run on them
    # without a split trains exactly as the split run does, and evaluates the test set after every epoch.
    kept, _ = holdout_indices(64, 16, seed=1)
    write_cifar(tmp_path / "kept", "cifar10", (train_set[0][kept], train_set[1][kept]), test_set)
    flags = "--arch wrn_10_1 --no-share --preprocess meanstd --epochs 4 --batch-size 16 --lr 0.2 --deterministic"
    flags += " --seed 1"
    train(tmp_path / "full", tmp_path / "split", flags + " --val-split 16")
    train(tmp_path / "kept", tmp_path / "every-epoch", flags + " --val-split 0")

    split, every_epoch = _metrics(tmp_path / "split"), _metrics(tmp_path / "every-epoch")
    assert [m["train_loss"] for m in split] == [m["train_loss"] for m in every_epoch]  # one training, twice
    assert [m["val_images"] for m in split] == [16] * 4 and [m["train_images"] for m in split] == [48] * 4
    split_best = min(split, key=lambda m: (m["val_top1_err"], m["epoch"]))["epoch"]
    test_best = min(every_epoch, key=lambda m: (m["val_top1_err"], m["epoch"]))["epoch"]
    assert split_best != test_best and split_best != 4  # the test set would have chosen another epoch
    assert int(read_info(tmp_path / "split" / "checkpoint-best.safetensors").user["epoch"]) == split_best
    # The test set was evaluated on the final and the best checkpoints only, with the figures the every-epoch run
    # measured for those epochs' models.
    tested = {m["epoch"]: m["test_top1_err"] for m in split if "test_top1_err" in m}
    assert tested == {e: every_epoch[e - 1]["val_top1_err"] for e in (split_best, 4)}
    losses = {m["epoch"]: m["test_loss"] for m in split if "test_loss" in m}
    assert losses == pytest.approx({e: every_epoch[e - 1]["val_loss"] for e in (split_best, 4)})
    run = json.loads((tmp_path / "split" / "run.json").read_text())
    assert run["val_split"] == 16 and json.loads((tmp_path / "every-epoch" / "run.json").read_text())["val_split"] == 0
    from share_transform.train.report import load_run

    assert load_run(tmp_path / "split").best_chosen_on == "a held-out split of 16 training images"
    assert load_run(tmp_path / "split").final_test() == tested[4]


def _resolved(flags: str) -> argparse.Namespace:
    args = train_cifar.get_args_parser().parse_args(flags.split())
    return resolve_args(train_cifar.resolve_protocol(args), recipe="cifar")


SWRN_FLAGS = {
    # flag: (under --policy swrn, under --policy cifar), on CIFAR-100 with --device cuda (where autocast is the
    # default), and a value that overrides the swrn default
    "preprocess": (("meanstd", "zca"), "zca"),
    "pad": (("zero", None), "reflect"),
    "cutout": ((16, 0), 8),
    "dropout": ((0.0, 0.3), 0.3),
    "classifier_init": (("he", "uniform"), "uniform"),
    "amp": ((False, True), True),
    "val_split": ((5000, 0), 0),
}


@pytest.mark.parametrize("flag", list(SWRN_FLAGS))
def test_swrn_defaults_are_the_reference_protocol_flag_by_flag(flag):
    (swrn, paper), override = SWRN_FLAGS[flag]
    common = "--dataset cifar100 --device cuda"
    assert getattr(_resolved(f"{common} --policy swrn --templates 2"), flag) == swrn
    assert getattr(_resolved(f"{common} --policy cifar"), flag) == paper
    given = f"--{flag.replace('_', '-')}" + ("" if isinstance(override, bool) else f" {override}")
    if flag in ("pad", "cutout"):  # their alternative applies to meanstd inputs, as under swrn
        given += " --preprocess meanstd"
    if flag == "preprocess":  # ZCA inputs take no crop: swrn's pad and Cutout make way
        resolved = _resolved(f"{common} --policy swrn --templates 2 {given}")
        assert (resolved.preprocess, resolved.pad, resolved.cutout) == ("zca", None, 0)
        return
    assert getattr(_resolved(f"{common} --policy swrn --templates 2 {given}"), flag) == override


# ------------------------------------------------------------------------------------ the run directory's guards


def test_a_run_refused_by_the_lock_writes_nothing_into_the_running_ones_output(data_dir, tmp_path, monkeypatch):
    from share_transform.train.errors import OutputLockedError

    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, str(RECIPE), *argv(data_dir, out, "--arch wrn_10_1 --epochs 2 --batch-size 32")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        assert first.stdout is not None
        for line in first.stdout:  # training: the lock is held, the ZCA transform written
            if line.startswith("epoch 1/2 ["):
                break
        first.send_signal(signal.SIGSTOP)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert "preprocess.safetensors" in before
        # The order that lost: the second run checked the directory before the first locked it (its early check
        # is skipped here), so only the lock stands between it and the first run's files.
        monkeypatch.setattr(train_cifar, "check_output", lambda *a, **k: None)
        with pytest.raises(OutputLockedError, match=f"in use by another run \\(PID {first.pid}\\)"):
            train(data_dir, out, "--arch wrn_10_1 --epochs 2 --batch-size 32 --preprocess meanstd")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        first.send_signal(signal.SIGCONT)
        rest = first.stdout.read()
        assert first.wait(timeout=300) == 0, rest
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    assert load_preprocessing(out / "preprocess.safetensors").kind == "zca"  # the first run's, whole


def test_a_killed_loader_worker_is_one_line_and_the_checkpoint_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    args = argv(data_dir, out, "--arch wrn_10_1 --epochs 2 --batch-size 32 --preprocess meanstd")
    args += ["--workers", "1"]  # after FAST's 0: argparse keeps the last
    rc, output = kill_a_loader_worker(RECIPE, args, r"^epoch 2/2 \[")
    assert rc == 2, output
    assert "Traceback" not in output
    (error,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert error == (
        "error: a data loader worker (pid PID) was killed by SIGKILL; out of memory is the usual cause (the "
        "kernel's OOM killer sends SIGKILL): lower --workers or --batch-size; the last checkpoint, "
        f"{out / 'checkpoint-last.safetensors'} (epoch 1), is kept: continue with --resume"
    )
    assert [m["epoch"] for m in _metrics(out)] == [1]
    train(data_dir, out, "--arch wrn_10_1 --epochs 2 --batch-size 32 --preprocess meanstd --resume")
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]


def test_without_matplotlib_the_recipe_trains_and_skips_the_curves_in_one_line(data_dir, tmp_path):
    blocker = tmp_path / "site"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    out = tmp_path / "run"
    proc = run_script(
        *argv(data_dir, out, "--arch wrn_10_1 --epochs 1 --batch-size 32 --preprocess meanstd"),
        env={"PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "note: policy cifar shares nothing" if False else line for line in proc.stderr.splitlines()
    ]
    notes = [line for line in proc.stderr.splitlines() if "matplotlib" in line]
    assert notes == [
        "note: matplotlib is not installed, so curves.png is not drawn (pip install 'share-transform[train]' draws "
        "it); metrics.jsonl has every figure"
    ]
    assert len(_metrics(out)) == 1 and not (out / "curves.png").exists()


def test_help_offers_only_what_each_recipe_takes(capsys):
    text = " ".join(train_cifar.get_args_parser().format_help().split())
    for absent in ("--loader", "dali", "JPEG", "decode_jpeg"):
        assert absent not in text
    assert "--val-split N" in text and "--cutout SIZE" in text and "--pad {reflect,zero}" in text
    with pytest.raises(SystemExit) as e:
        train_cifar.get_args_parser().parse_args(["--loader", "torch"])
    assert e.value.code == 2 and "unrecognized arguments: --loader torch" in capsys.readouterr().err

    spec = importlib.util.spec_from_file_location("digits_experiment", ROOT / "recipes" / "digits_experiment.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    import re

    text = " ".join(digits.get_args_parser().format_help().split()).split("options:", 1)[1]
    shown = {o.split()[0]: o for o in re.split(r" (?=--?\w[\w-]* )", text)}
    for flag, default in (("--seeds", "[0, 1, 2]"), ("--epochs", "10"), ("--batch-size", "64"),
                          ("--preprocess", "meanstd"), ("--workers", "0"), ("--device", "cpu")):  # fmt: skip
        assert shown[flag].endswith(f"(default: {default})"), shown[flag]
