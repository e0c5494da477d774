"""torchrun + DDP on CPU (gloo): two ranks train the tiny ShaResNet, end with equal weights and intact ties.

Only rank 0 writes the run directory, so a small launcher runs the recipe's ``main`` under torchrun and
has every rank dump the model it ends with; the test compares the ranks' weights tensor by tensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train_imagenet import RECIPE, ROOT, make_image_folder, read_metrics, recipe_argv

import share_transform

LAUNCHER = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    import torch
    import share_transform

    spec = importlib.util.spec_from_file_location("train_imagenet", sys.argv[1])
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = recipe.get_args_parser().parse_args(sys.argv[3:])
    model = recipe.main(args)
    rank = int(os.environ["RANK"])
    out = os.path.join(sys.argv[2], f"rank{rank}")
    torch.save(model.state_dict(), out + ".pt")
    with open(out + ".json", "w") as f:
        json.dump({"tied": share_transform.is_tied(model), "unique": share_transform.count_parameters(model)}, f)
    """
)


def torchrun(*argv: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny-imagenet-ddp"))


def test_two_ranks_train_agree_and_stay_tied(data: Path, tmp_path: Path) -> None:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    output = tmp_path / "run"
    proc = torchrun(str(launcher), str(RECIPE), str(tmp_path), *recipe_argv(data, output, "--share"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2, 8 per rank" in proc.stdout
    assert proc.stdout.count("epoch 2:") == 1  # rank 0 alone prints

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:  # parameters and BatchNorm statistics alike
        assert torch.equal(rank0[name], rank1[name]), name
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    run = json.loads((output / "run.json").read_text())
    assert all(i["tied"] and i["unique"] == run["unique_params"] for i in infos)

    # The run directory (rank 0's) holds the same model.
    saved = share_transform.load(output / "checkpoint-last.safetensors")
    assert share_transform.is_tied(saved)
    for name, t in saved.state_dict().items():
        assert torch.equal(t, rank0[name]), name
    metrics = read_metrics(output)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(0 < m["train_loss"] < 10 and m["images_per_s"] > 0 for m in metrics)


def test_batch_not_divisible_by_world_size_under_torchrun(data: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    proc = torchrun(str(RECIPE), *recipe_argv(data, output, "--batch-size", "15"))
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours and all(
        line.endswith("--batch-size 15 is not divisible by the world size 2; use a multiple of 2") for line in ours
    )
    assert str(RECIPE.name) + '", line' not in proc.stderr  # no traceback from the recipe itself
    assert not output.exists()
