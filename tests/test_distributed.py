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


LOCK_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    from share_transform.train.lock import lock_holder
    from share_transform.train.distributed import DistInfo
    from share_transform.train.trainer import locked_output

    rank, base, rounds = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"file://{base}/store", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    results = []
    for i in range(rounds + 1):
        output = base / f"run{i}"
        if i == rounds and rank == 0:
            output.write_text("a file where the run directory should be")  # rank 0 refuses this one
        if rank == 1 and i < rounds:
            # The ordering that lost the race: rank 1 arrives after rank 0 holds the lock.
            deadline = time.monotonic() + 60
            while lock_holder(output) is None and time.monotonic() < deadline:
                time.sleep(0.005)
        try:
            with locked_output(output, resume=False, dist_info=info, args=None):
                results.append(["ok", lock_holder(output) if rank == 1 else None])
                dist.barrier()
        except Exception as e:
            results.append([type(e).__name__, str(e)])
    (base / f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "results": results}))
    dist.destroy_process_group()
    """
)


def test_only_rank_0_checks_and_locks_the_output(tmp_path: Path) -> None:
    """Rank 1 reaches the run directory after rank 0 locked it, 20 times: it waits for rank 0's verdict instead
    of finding rank 0's lock; when rank 0 refuses the directory, rank 1 fails too, quoting it."""
    rounds = 20
    worker = tmp_path / "worker.py"
    worker.write_text(LOCK_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(r), str(tmp_path), str(rounds)], env=env, cwd=ROOT)
        for r in (0, 1)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["results"][:rounds] == [["ok", None]] * rounds
    assert rank1["results"][:rounds] == [["ok", rank0["pid"]]] * rounds  # rank 0 held the lock meanwhile
    output = tmp_path / f"run{rounds}"
    refused = f"--output {output} is a file, not a directory"
    assert rank0["results"][rounds] == ["OutputExistsError", refused]
    assert rank1["results"][rounds] == ["ConfigError", f"rank 0 refused --output {output}: {refused}"]


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
