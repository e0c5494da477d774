"""Runs that cannot be turned against their user: the best checkpoint survives a SIGKILL at every write of an
improving epoch, a second run on the same --output exits 2 naming the first's PID, --resume refuses changed
settings and tampered run files in one line, bad flags and a full disk are one line with exit 2."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train_imagenet import (
    RECIPE,
    ROOT,
    kill_a_loader_worker,
    kill_on_line,
    load_recipe,
    make_image_folder,
    read_metrics,
    recipe_argv,
    run_inprocess,
    run_script,
    tensors,
)

from share_transform.files import read_info
from share_transform.fs import TMP_SUFFIX
from share_transform.train.lock import LOCK_FILE


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny-imagenet"))


@pytest.fixture(scope="module")
def recipe() -> ModuleType:
    return load_recipe()


def deterministic(data: Path, output: Path, *extra: str) -> list[str]:
    return recipe_argv(data, output, "--share", "--deterministic", *extra)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted deterministic 2-epoch run."""
    output = tmp_path_factory.mktemp("reference") / "run"
    proc = run_script(deterministic(data, output))
    assert proc.returncode == 0, proc.stderr
    return output


def files(directory: Path) -> dict[str, bytes]:
    """The run's files, but the lock file (each run writes its own PID there)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != LOCK_FILE}


def file_epoch(output: Path, tag: str) -> int:
    return int(read_info(output / f"checkpoint-{tag}.safetensors").user["epoch"])


def state_of(output: Path, tag: str) -> dict:
    return torch.load(output / f"checkpoint-{tag}.state.pt", weights_only=True)


def best_epoch(output: Path) -> int:
    metrics = read_metrics(output)
    return min(metrics, key=lambda m: (m["val_top1_err"], m["epoch"]))["epoch"]


def improving_epoch(output: Path) -> int:
    """The last epoch that lowered the best test error (epoch 1 always does)."""
    best, epoch = float("inf"), 1
    for m in read_metrics(output):
        if m["val_top1_err"] < best:
            best, epoch = m["val_top1_err"], m["epoch"]
    return epoch


# -------------------------------------------------------------------------------- the best checkpoint is never lost

# The lines rank 0 prints around the writes of an epoch, in order: the epoch summary (then checkpoint-last is
# written), "saved checkpoint-last" (then checkpoint-best), "saved checkpoint-best" (then metrics and curves).
# SIGKILL from outside lands within moments of the line, inside or between the writes that follow it.
WRITE_POINTS = {
    "before checkpoint-last": r"^epoch {e}: train loss",
    "between last and best": r"^saved checkpoint-last\.safetensors \(epoch {e}\)",
    "after best, before the metrics line": r"^saved checkpoint-best\.safetensors \(epoch {e}\)",
}


@pytest.mark.parametrize("point", list(WRITE_POINTS))
def test_sigkill_at_each_write_of_an_improving_epoch_keeps_the_best(
    point: str, reference: Path, data: Path, tmp_path: Path
) -> None:
    epoch = improving_epoch(reference)
    output = tmp_path / "run"
    argv = deterministic(data, output)
    rc, out = kill_on_line(RECIPE, argv, WRITE_POINTS[point].format(e=epoch))
    assert rc == -signal.SIGKILL, out

    # A kill before the first checkpoint leaves nothing to resume (--resume says so): the same command starts over.
    again = ["--resume"] if (output / "checkpoint-last.safetensors").exists() else []
    resumed = run_script([*argv, *again])
    assert resumed.returncode == 0, resumed.stderr
    # checkpoint-best is a pair of the best epoch metrics.jsonl records, bit-identical to the uninterrupted run's.
    assert best_epoch(output) == best_epoch(reference)
    assert file_epoch(output, "best") == state_of(output, "best")["epoch"] == best_epoch(reference)
    for tag in ("best", "last"):
        got, want = (
            tensors(output / f"checkpoint-{tag}.safetensors"),
            tensors(reference / f"checkpoint-{tag}.safetensors"),
        )
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), tag
    assert file_epoch(output, "last") == state_of(output, "last")["epoch"] == 2
    assert [m["train_loss"] for m in read_metrics(output)] == [m["train_loss"] for m in read_metrics(reference)]
    # Nothing half-written stays: no epoch-stamped state, no temporary file.
    assert sorted(files(output)) == sorted(files(reference))
    assert not [p for p in output.iterdir() if ".epoch" in p.name or p.name.endswith(TMP_SUFFIX)]


# ------------------------------------------------------------------------------------ one run per output directory


def test_a_second_run_on_the_same_output_exits_2_naming_the_first(reference: Path, data: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    argv = deterministic(data, output)
    first = subprocess.Popen(
        [sys.executable, str(RECIPE), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        assert first.stdout is not None
        for line in first.stdout:  # the first run is training: its lock is held
            if line.startswith("epoch 1/2 ["):
                break
        first.send_signal(signal.SIGSTOP)  # hold it there while the second run tries
        before = files(output)
        for extra in ([], ["--resume"]):
            second = run_script([*argv, *extra])
            assert second.returncode == 2, second.stderr
            assert second.stderr == (
                f"error: {output} is in use by another run (PID {first.pid}); wait for it to end or choose another "
                "--output\n"
            )
        assert files(output) == before
        first.send_signal(signal.SIGCONT)
        rest = first.stdout.read()
        assert first.wait(timeout=300) == 0, rest
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    # The first run's files are whole and its result is the uninterrupted run's.
    got, want = tensors(output / "checkpoint-last.safetensors"), tensors(reference / "checkpoint-last.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    for key in ("epoch", "train_loss", "val_loss", "val_top1_err"):
        assert [m[key] for m in read_metrics(output)] == [m[key] for m in read_metrics(reference)], key
    assert (output / LOCK_FILE).read_text() == f"{first.pid}\n"


# --------------------------------------------------------------------------------------- what --resume refuses


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--seed", "1"], "was trained with --seed 0, this command gives --seed 1;"),
        (["--img-size", "40"], "was trained with --img-size 32, this command gives --img-size 40;"),
        (["--init", "fan_in"], "was trained with --init fan_out, this command gives --init fan_in;"),
        (["--policy", "cifar"], "was trained with --policy imagenet, this command gives --policy cifar;"),
        (["--model-kwargs", '{"layers": [1, 1, 1, 1]}'], "was trained with --model-kwargs {'channels'"),
        (["--epochs", "1"], "has 2 epochs done, more than --epochs 1; give --epochs 2 or more"),
    ],
    ids=["seed", "img-size", "init", "policy", "model-kwargs", "epochs"],
)
def test_resume_refuses_changed_settings(
    flags: list[str], expected: str, reference: Path, recipe: ModuleType, data: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    before = files(output)
    rc, _, err = run_inprocess(recipe, deterministic(data, output, "--resume", *flags), capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: --resume: {output} "), err
    assert expected in err, err
    assert files(output) == before  # run.json untouched: it still agrees with metrics.jsonl


def _tamper(output: Path, case: str) -> None:
    state = output / "checkpoint-last.state.pt"
    if case == "run.json not JSON":
        (output / "run.json").write_text('{"arch": "resnet18", ')
    elif case == "run.json not an object":
        (output / "run.json").write_text("[1, 2]")
    elif case == "state.pt random bytes":
        state.write_bytes(bytes(range(256)) * 8)
    elif case == "state.pt not a state":
        torch.save([1, 2, 3], state)
    elif case == "state.pt without its history":
        torch.save({k: v for k, v in torch.load(state, weights_only=True).items() if k != "history"}, state)
    elif case == "state.pt history of another length":
        s = torch.load(state, weights_only=True)
        torch.save({**s, "history": s["history"][:1]}, state)
    elif case == "weights without their epoch":
        weights = output / "checkpoint-last.safetensors"
        with safe_open(str(weights), "pt") as f:
            metadata = {k: v for k, v in f.metadata().items() if k != "epoch"}
        save_file(load_file(str(weights)), str(weights), metadata=metadata)


TAMPERED = {
    "run.json not JSON": "run.json is not valid JSON",
    "run.json not an object": "run.json is not a run record",
    "state.pt random bytes": "checkpoint-last.state.pt is unreadable",
    "state.pt not a state": "checkpoint-last.state.pt is not a training state",
    "state.pt without its history": "checkpoint-last.state.pt has no valid 'history'",
    "state.pt history of another length": "holds a history that is not one record per epoch done",
    "weights without their epoch": "checkpoint-last.safetensors does not record its epoch",
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_run_file_is_one_line(
    case: str, reference: Path, recipe: ModuleType, data: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    _tamper(output, case)
    before = files(output)
    rc, _, err = run_inprocess(recipe, deterministic(data, output, "--resume", "--epochs", "3"), capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and TAMPERED[case] in err, err
    assert files(output) == before


def test_a_tampered_metrics_file_is_rewritten_from_the_checkpoint(
    reference: Path, recipe: ModuleType, data: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    (output / "metrics.jsonl").write_text('{"epoch": 1, "val_top1_err": 0}\nnot json\n')
    rc, _, err = run_inprocess(recipe, deterministic(data, output, "--resume"), capsys)
    assert rc == 0, err
    assert (output / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


# ----------------------------------------------------------------------------------------- bad flags, full disk

BAD_FLAGS = {
    "zero lr": (["--lr", "0"], "--lr must be above 0, got 0.0"),
    "negative lr": (["--lr", "-0.1"], "--lr must be above 0, got -0.1"),
    "NaN lr": (["--lr", "nan"], "--lr must be above 0, got nan"),
    "zero momentum": (["--momentum", "0"], "--momentum must be above 0 and below 1, got 0.0"),
    "momentum 1": (["--momentum", "1"], "--momentum must be above 0 and below 1, got 1.0"),
    "negative weight decay": (["--weight-decay=-1e-4"], "--weight-decay must be at least 0, got -0.0001"),
    "zero img-size": (["--img-size", "0"], "--img-size must be at least 1, got 0"),
    "zero lr-reference-batch": (["--lr-reference-batch", "0"], "--lr-reference-batch must be at least 1, got 0"),
    "negative seed": (["--seed", "-1"], "--seed must be at least 0 and at most"),
    "seed too large": (["--seed", str(2**63)], "--seed must be at least 0 and at most"),
    "negative milestone": (["--lr-milestones", "-1"], "--lr-milestones must be epochs (0 or more), got -1"),
    "num_classes in model-kwargs": (["--model-kwargs", '{"num_classes": 5}'], "num_classes is set by the dataset"),
    "loader in model-kwargs": (
        ["--model-kwargs", '{"checkpoint_path": "/tmp/x.pth"}'],
        "--model-kwargs: constructor argument 'checkpoint_path' is not accepted",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_one_line(case: str, recipe: ModuleType, data: Path, tmp_path: Path, capsys) -> None:
    flags, expected = BAD_FLAGS[case]
    rc, _, err = run_inprocess(recipe, recipe_argv(data, tmp_path / "run", *flags), capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "run").exists()


def _small_files_only() -> None:
    """In the child: files may not grow past 256 KiB, what a full disk does to the writer (EFBIG, not a signal)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_full_disk_is_one_line_and_leaves_no_temporary(data: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(RECIPE), *recipe_argv(data, output, "--epochs", "1")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=_small_files_only,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: [Errno 27] File too large: '{output / 'checkpoint-last.epoch1.state.pt'}'\n"
    assert not [p for p in output.iterdir() if p.name.endswith(TMP_SUFFIX)]


# ------------------------------------------------------------------------------------------ a loader worker killed


def test_a_killed_loader_worker_is_one_line_and_the_checkpoint_resumes(reference: Path, data: Path, tmp_path: Path):
    output = tmp_path / "run"
    argv = deterministic(data, output, "--workers", "1")
    rc, out = kill_a_loader_worker(RECIPE, argv, r"^epoch 2/2 \[")
    assert rc == 2 and "Traceback" not in out, out
    (error,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert error == (
        "error: a data loader worker (pid PID) was killed by SIGKILL; out of memory is the usual cause (the "
        "kernel's OOM killer sends SIGKILL): lower --workers or --batch-size; the last checkpoint, "
        f"{output / 'checkpoint-last.safetensors'} (epoch 1), is kept: continue with --resume"
    )
    assert file_epoch(output, "last") == state_of(output, "last")["epoch"] == 1
    resumed = run_script([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    # The worker's death cost nothing: the run ends as the uninterrupted one.
    got, want = tensors(output / "checkpoint-last.safetensors"), tensors(reference / "checkpoint-last.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------- --resume without run.json, or emptied


@pytest.mark.parametrize("how", ["removed", "emptied", "an empty object"])
def test_resume_checks_the_checkpoints_record_when_run_json_is_gone(
    how: str, reference: Path, recipe: ModuleType, data: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    run_json = (output / "run.json").read_text()
    if how == "removed":
        (output / "run.json").unlink()
    else:
        (output / "run.json").write_text("" if how == "emptied" else "{}")
    before = files(output)
    rc, _, err = run_inprocess(recipe, deterministic(data, output, "--resume", "--lr", "5", "--seed", "3"), capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --resume: {output} was trained with --lr 0.8, this command gives --lr 5.0;"), err
    assert files(output) == before  # nothing written, run.json not recreated with flags training would not use

    # The same command as the run's: it resumes, and run.json is the run's record again.
    rc, out, err = run_inprocess(recipe, deterministic(data, output, "--resume"), capsys)
    assert rc == 0, err
    if how == "removed":
        assert f"note: {output / 'run.json'} was missing" in out
    expected = json.loads(run_json)
    expected["args"] |= {"resume": True, "output": str(output)}
    assert json.loads((output / "run.json").read_text()) == expected


def test_resume_refuses_when_nothing_records_the_runs_flags(
    reference: Path, recipe: ModuleType, data: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "run"
    shutil.copytree(reference, output)
    (output / "run.json").unlink()
    state = torch.load(output / "checkpoint-last.state.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "run"}, output / "checkpoint-last.state.pt")  # older
    before = files(output)
    rc, _, err = run_inprocess(recipe, deterministic(data, output, "--resume"), capsys)
    assert rc == 2 and err == (
        f"error: --resume: {output} records no flags to check this command against (run.json is missing or "
        "empty, and checkpoint-last.state.pt predates recording them); restore run.json, or start a new run in "
        "another --output\n"
    )
    assert files(output) == before
