"""Files you can trust, second round: a header is checked by one schema and against its tensors before anything is
allocated, every writer has its own temporary, outputs follow one rule, and the CLI checks paths before importing
torch. One test (or one parametrized family) per defect class."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import share_transform as st
from share_transform.checkpoints import load_weights, read_checkpoint
from share_transform.cli import main
from share_transform.errors import (
    CheckpointError,
    DeviceError,
    FileFormatError,
    InputSizeError,
    ShareError,
    ShareOptionError,
)
from share_transform.files import load, read_info, save
from share_transform.fs import temporaries
from share_transform.modelinfo import MAX_INPUT_PIXELS, check_input_size

SMALL = {"layers": [2, 2, 2, 2], "channels": [8, 16, 32, 64], "num_classes": 5}


def small(**options: Any) -> nn.Module:
    torch.manual_seed(0)
    return st.apply(st.build_model("resnet18", **SMALL), **options)


def sharetx(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="sharetx")


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sharetx: error: ") and "internal error" not in lines[0], lines
    return lines[0]


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def rewrite(src: Path, dst: Path, **changes: str) -> Path:
    """``src`` with some header metadata replaced, written with the safetensors library (as an attacker could)."""
    save_file(load_file(str(src)), str(dst), metadata={**metadata_of(src), **changes})
    return dst


def raw_file(path: Path, header: dict[str, Any], data: bytes = b"") -> Path:
    """A safetensors file written byte by byte, for headers the library would not write."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def refused_everywhere(path: Path, match: str) -> None:
    """``load``, ``read_checkpoint`` and ``sharetx inspect`` / ``export`` all refuse ``path`` as FileFormatError."""
    with pytest.raises(FileFormatError, match=match):
        load(path)
    with pytest.raises(FileFormatError, match=match):
        read_checkpoint(path)
    assert re.search(match, one_line_error(sharetx("inspect", str(path))))
    assert re.search(match, one_line_error(sharetx("export", str(path), "--onnx", str(path.with_suffix(".onnx")))))
    assert not path.with_suffix(".onnx").exists()


# ------------------------------------------------------------------- item 1: bounded memory before any check

BOMB = """
import json, resource, sys, time
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a safety net: a regression fails, not the machine
import timm  # imports first: the time measured is the refusal's own
import share_transform as st
import share_transform.files
from share_transform.cli import main

def peak_rss():
    # VmHWM is this program's own peak (ru_maxrss would carry the forking pytest's high-water mark).
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

path, via = Path(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
if via == "load":
    try:
        st.load(path)
        error = None
    except st.ShareError as e:
        error = f"{type(e).__name__}: {e}"
else:
    args = ["inspect", str(path)] if via == "inspect" else ["export", str(path), "--onnx", str(path) + ".onnx"]
    code = main(args, standalone_mode=False)
    error = f"exit {code}"
print(json.dumps({"error": error, "seconds": time.perf_counter() - start, "peak_rss": peak_rss()}))
"""


def header_only(path: Path, plan: dict[str, Any], build: dict[str, Any]) -> Path:
    meta = {
        "format": "pt",
        "sharetx.file_version": "1",
        "sharetx.version": st.__version__,
        "sharetx.aliases": "{}",
        "sharetx.build": json.dumps(build),
        "sharetx.policy": plan["policy"],
        "sharetx.plan": json.dumps(plan),
    }
    return raw_file(path, {"__metadata__": meta})


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
@pytest.mark.parametrize("via", ["load", "inspect", "export"])
def test_a_header_claiming_a_billion_templates_is_refused_fast_and_small(via: str, tmp_path: Path) -> None:
    plan = st.get_plan(small(templates=2)).to_dict()
    plan["templates"] = 10**9
    for g in plan["groups"]:
        g["templates"] = 10**9
    build = {"source": "timm", "name": "resnet18", "kwargs": SMALL}
    path = header_only(tmp_path / "bomb.safetensors", plan, build)
    assert path.stat().st_size < 16_000  # the tiny model's plan; no tensor at all
    proc = subprocess.run(
        [sys.executable, "-c", BOMB, str(path), via],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    if via == "load":
        assert result["error"].startswith("FileFormatError") and "templates=1000000000" in result["error"]
    else:
        assert result["error"] == "exit 2" and "templates=1000000000" in proc.stderr
    assert result["seconds"] < 2.0
    assert result["peak_rss"] < 1 << 30  # the whole child, torch and timm imports included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.safetensors"]


def test_templates_are_bounded_by_the_largest_group(tmp_path: Path) -> None:
    model = st.build_model("resnet18", **SMALL)  # groups of 2 members (one per stage)
    assert st.plan(model, templates=2).groups[0].templates == 2
    with pytest.raises(ShareOptionError, match=r"templates=3 is more than the 2 members of the plan's largest group"):
        st.plan(model, templates=3)
    # A plan made elsewhere (a file, a hand edit) is refused by apply before a bank is allocated.
    forged = st.get_plan(small(templates=2)).to_dict()
    forged["templates"] = 100_000
    for g in forged["groups"]:
        g["templates"] = 100_000
    fresh = st.build_model("resnet18", **SMALL)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ShareOptionError, match="templates=100000"):
        st.apply(fresh, plan=st.SharePlan.from_dict(forged))
    assert st.get_plan(fresh) is None and fresh.state_dict().keys() == before.keys()
    # scope all: stage 1 shares 3 convs (its first 3x3 widens 64 -> 8), so 3 templates fit.
    assert st.plan(model, scope="all", templates=3).templates == 3
    # The sweep lists no setting past the bound: templates (None, 1, 2, 4) meet groups of at most 3.
    rows = {(p.scope, p.group_size, p.templates) for p in st.sweep(model)}
    assert {("all", None, 2), ("all", 2, 2), ("last", None, 2)} <= rows
    assert not [r for r in rows if r[2] == 4]
    out = tmp_path / "r18.safetensors"
    line = one_line_error(sharetx("convert", "--model", "resnet18", "--templates", "100000", "-o", str(out)))
    assert "templates=100000 is more than the 2 members" in line and not out.exists()


def test_an_input_size_is_bounded(tmp_path: Path) -> None:
    model = st.build_model("resnet18", **SMALL)
    for size in [(3, 10**9, 10**9), (3, 2**63, 224), (3, 4096, 4097), (2000, 32, 32), (3, True, 32), (3, 1.5, 32)]:
        with pytest.raises(InputSizeError):
            st.plan(model, input_size=size)
    assert check_input_size((3, 4096, 4096), "x") == (3, 4096, 4096) and 4096 * 4096 == MAX_INPUT_PIXELS
    # A file's header is input too: export would run the model on 3x12000x12000.
    good = save(small(), tmp_path / "good.safetensors")
    big = rewrite(good, tmp_path / "big.safetensors", **{"sharetx.input_size": "[3, 12000, 12000]"})
    refused_everywhere(big, "input size 3x12000x12000 is past the largest")
    plan = json.loads(metadata_of(good)["sharetx.plan"])
    plan["input_size"] = [3, 12000, 12000]
    big_plan = rewrite(good, tmp_path / "big-plan.safetensors", **{"sharetx.plan": json.dumps(plan)})
    refused_everywhere(big_plan, "input size 3x12000x12000 is past the largest")


# ------------------------------------------------------------------- item 3: the header against its tensors


def test_an_alias_to_another_tensor_of_the_same_shape_is_refused(tmp_path: Path) -> None:
    good = save(small(), tmp_path / "good.safetensors")
    aliases = json.loads(metadata_of(good)["sharetx.aliases"])
    assert aliases["layer1.1.conv2.weight"] == "layer1.0.conv2.weight"
    # layer1.1.conv1 has the shared weight's shape (8x8x3x3): loading would overwrite the shared weight with it.
    evil = rewrite(
        good,
        tmp_path / "evil.safetensors",
        **{"sharetx.aliases": json.dumps({**aliases, "layer1.1.conv2.weight": "layer1.1.conv1.weight"})},
    )
    refused_everywhere(evil, "layer1.1.conv2.weight must be an alias of layer1.0.conv2.weight")
    # Without a plan, the rebuilt model's own ties are the judge: it does not tie these two.
    unshared = save(st.untie(small()), tmp_path / "unshared.safetensors")
    state = load_file(str(unshared))
    del state["layer1.0.conv2.weight"]
    save_file(state, str(tmp_path / "folded.safetensors"), metadata={
        **metadata_of(unshared), "sharetx.aliases": json.dumps({"layer1.0.conv2.weight": "layer1.1.conv1.weight"})
    })  # fmt: skip
    with pytest.raises(CheckpointError, match="makes layer1.0.conv2.weight an alias of layer1.1.conv1.weight"):
        load(tmp_path / "folded.safetensors")


@pytest.mark.parametrize(
    ("templates", "groups_too", "match"),
    [
        (7, False, r"plan.groups\[0\].templates \(2\) differs from the plan's \(7\)"),  # "7 templates" in inspect
        (3, True, r"the file stores \S+ as 2x8x8x3x3"),
        (7, True, "templates=7 is more than"),
    ],
)
def test_a_plan_claiming_more_templates_than_the_bank_holds_is_refused(
    templates: int, groups_too: bool, match: str, tmp_path: Path
) -> None:
    good = save(small(templates=2, scope="all"), tmp_path / "soft.safetensors")  # banks of 2; groups of 3 at most
    plan = json.loads(metadata_of(good)["sharetx.plan"])
    plan["templates"] = templates
    for g in plan["groups"] if groups_too else []:
        g["templates"] = templates
    bad = rewrite(good, tmp_path / "bad.safetensors", **{"sharetx.plan": json.dumps(plan)})
    refused_everywhere(bad, match)
    result = sharetx("inspect", str(bad))
    one_line_error(result)
    assert result.stdout == ""  # no report states a number the tensors deny


def _plan_with(path: Path, edit: str) -> str:
    plan = json.loads(metadata_of(path)["sharetx.plan"])
    target: Any = plan
    *keys, last = edit.split("=", 1)[0].split(".")
    for key in keys:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[int(last) if isinstance(target, list) else last] = json.loads(edit.split("=", 1)[1])
    return json.dumps(plan)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("plan", 'groups.0.templates="2"', r"plan.groups\[0\].templates must be an integer in \[1, "),
        ("plan", "groups.0.templates=2.0", r"templates must be an integer"),
        ("plan", "groups.0.templates=true", r"templates must be an integer"),
        ("plan", "templates=-1", r"plan.templates must be an integer in \[1, "),
        ("plan", "templates=0", r"plan.templates must be an integer in \[1, "),
        ("plan", "templates=1e30", r"plan.templates must be an integer"),
        ("plan", 'groups.0.numel="x"', r"plan.groups\[0\].numel must be an integer"),
        ("plan", "groups.0.numel=577", r"plan.groups\[0\].numel must be 576"),
        ("plan", 'budget="abc"', r"plan.budget must be a fraction in \(0, 1\]"),
        ("plan", 'exclude="layer4.*"', r"plan.exclude must be a list"),
        ("plan", "exclude=[[1]]", r"plan.exclude must be a list of module paths"),
        ("plan", "budget=NaN", r"plan.budget must be a fraction in \(0, 1\]"),
        ("plan", "groups.0.signature.kernel_size=[1000000000000000000, 1000000000000000000]", r"kernel_size\[0\]"),
        ("plan", "stages.0.resolution=[0, 8]", r"plan.stages\[0\].resolution\[0\] must be an integer in \[1, "),
        ("plan", "groups.0.members=[]", r"members must be two or more convs"),
        ("plan", 'policy="swrn"', r"'sharetx.policy' \('imagenet'\) differs from the plan's \('swrn'\)"),
        ("plan", "deep", "nested too deeply"),
        ("aliases", "deep", "nested too deeply"),
        ("build", "deep", "nested too deeply"),
        ("plan", "bigint", "is not valid JSON"),
        ("file_version", "2", "the file's layout is version '2'"),
    ],
)
def test_malformed_header_values_are_file_format_errors(key: str, value: str, match: str, tmp_path: Path) -> None:
    good = save(small(), tmp_path / "good.safetensors")
    if value == "deep":
        text = "[" * 100_000 + "]" * 100_000
    elif value == "bigint":
        text = "1" * 5000  # more digits than Python converts from text
    elif key == "plan":
        text = _plan_with(good, value)
    else:
        text = value
    bad = rewrite(good, tmp_path / "bad.safetensors", **{f"sharetx.{key}": text})
    refused_everywhere(bad, match)


def test_a_tensor_shape_past_what_torch_indexes_is_refused(tmp_path: Path) -> None:
    # No bytes back a tensor with a 0 dimension, so the format accepts it; torch's strides overflow on it.
    path = raw_file(
        tmp_path / "zero.safetensors", {"t": {"dtype": "F32", "shape": [0, 10**18, 10**18], "data_offsets": [0, 0]}}
    )
    with pytest.raises(FileFormatError, match=r"'t' has shape \[0, 1000000000000000000, 1000000000000000000\]"):
        read_checkpoint(path)
    assert "has shape" in one_line_error(sharetx("inspect", str(path)))


# ----------------------------------------------------------------------------------- item 4: concurrent writers

WRITER = """
import os, random, sys, time
from pathlib import Path
from share_transform.fs import atomic_write

dest, role, sync = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
other = "b" if role == "a" else "a"
data = random.Random(role).randbytes(int(sys.argv[4]))

def wait_for(name):
    deadline = time.monotonic() + 120
    while not (sync / name).exists():
        if time.monotonic() > deadline:
            sys.exit(f"{role}: timed out waiting for {name}")
        time.sleep(0.01)

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        (sync / f"{role}.half").touch()
        wait_for(f"{other}.half")  # both writers are half-way: their writes overlap
        if role == "b":
            wait_for("checked")  # b finishes only after a renamed and the parent read the destination
        f.write(data[len(data) // 2 :])

atomic_write(dest, write)
(sync / f"{role}.done").touch()
"""


def test_two_writers_to_one_destination_each_rename_a_whole_file(tmp_path: Path) -> None:
    dest, sync = tmp_path / "out" / "model.bin", tmp_path / "sync"
    dest.parent.mkdir()
    sync.mkdir()
    size = 16 << 20
    expected = {role: random.Random(role).randbytes(size) for role in "ab"}
    dest.write_bytes(b"old")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writers = {
        role: subprocess.Popen(
            [sys.executable, "-c", WRITER, str(dest), role, str(sync), str(size)], env=env, stderr=subprocess.PIPE
        )
        for role in "ab"
    }
    try:
        _, stderr = writers["a"].communicate(timeout=180)
        assert writers["a"].returncode == 0, stderr
        # a renamed while b was half-way: readers see a's whole file, not b's half (one fixed temporary gave that).
        assert dest.read_bytes() == expected["a"]
        assert len(temporaries(dest)) == 1  # b's, in progress: a left it alone
        (sync / "checked").touch()
        _, stderr = writers["b"].communicate(timeout=180)
        assert writers["b"].returncode == 0, stderr
    finally:
        for proc in writers.values():
            proc.kill()
    assert dest.read_bytes() == expected["b"]  # the last rename wins, whole
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.bin"]


# ------------------------------------------------------------------------- item 5: outputs follow one rule


def test_sweep_plot_needs_force_to_replace_a_file(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "x.safetensors"
    plot.write_bytes(b"my weights")
    args = ["sweep", "--model", "resnet18", "--num-classes", "10", "--plot", str(plot)]
    assert "exists; pass --force" in one_line_error(sharetx(*args))
    assert plot.read_bytes() == b"my weights"
    result = sharetx(*args, "--force")
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ item 6: API errors are ShareErrors


def test_load_onto_a_device_this_machine_lacks(tmp_path: Path) -> None:
    path = save(small(), tmp_path / "m.safetensors")
    devices = ["meta", "nonsense", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        with pytest.raises(DeviceError, match=device.split(":")[0]) as e:
            load(path, device=device)
        assert isinstance(e.value, RuntimeError) and isinstance(e.value, ShareError)


def test_aliases_in_different_dtypes_name_the_dtype() -> None:
    model = small()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layer1.1.conv2.weight"] = state["layer1.0.conv2.weight"].to(torch.float64)  # equal values
    with pytest.raises(CheckpointError, match="as torch.float32 and layer1.1.conv2.weight as torch.float64") as e:
        load_weights(model, state)
    assert "unshared checkpoint" not in str(e.value)


@pytest.mark.needs("onnxruntime", extra="onnx")
def test_export_of_an_input_size_the_model_refuses_is_one_line(tmp_path: Path) -> None:
    path = save(small(), tmp_path / "m.safetensors")
    exe = Path(sys.executable).with_name("sharetx")
    onnx = tmp_path / "m.onnx"
    run = subprocess.run(
        [str(exe), "export", str(path), "--onnx", str(onnx), "--input-size", "1", "32", "32"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [run.stderr.strip()] and "the model rejects input size 1x32x32" in run.stderr
    assert not onnx.exists()


# --------------------------------------------------------------------------- item 7: every save round-trips


def _timm_sharesnet() -> nn.Module:
    return timm.create_model("sharesnet18", num_classes=10)


def _applied_timm() -> nn.Module:
    return st.apply(timm.create_model("resnet18", num_classes=3, in_chans=1), input_size=(1, 224, 224))


def _built() -> nn.Module:
    return st.apply(st.build_model("resnet18", **SMALL), templates=2)


def _built_torchvision() -> nn.Module:
    return st.apply(st.build_model("torchvision:resnet18", num_classes=4))


@pytest.mark.parametrize("make", [_timm_sharesnet, _applied_timm, _built, _built_torchvision])
def test_save_then_load_round_trips(make: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make()
    loaded = load(save(model, tmp_path / "m.safetensors"))
    assert type(loaded) is type(model) and st.is_tied(loaded) and st.get_plan(loaded) == st.get_plan(model)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert st.count_parameters(loaded) == st.count_parameters(model)


def test_save_refuses_a_timm_model_it_cannot_rebuild(tmp_path: Path) -> None:
    model = timm.create_model("resnet18", layers=[1, 1, 1, 1])  # timm records the name, not the layers
    with pytest.raises(FileFormatError, match=r"share_transform.build_model\('resnet18', num_classes=1000, ...\)"):
        save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------- item 8: nothing shared is said


@pytest.mark.parametrize("command", ["convert", "plan"])
def test_nothing_shared_is_said_on_stderr(command: str, tmp_path: Path) -> None:
    out = ["-o", str(tmp_path / "r10.safetensors")] if command == "convert" else []
    result = sharetx(command, "--model", "resnet10t", "--num-classes", "10", *out)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "sharetx: warning: nothing is shared: all 4 spatial convs of resnet10t keep their own weight (every stage "
        "has a single block, so no two spatial convs are in one stage); the result is the unshared model"
    ]
    out = ["-o", str(tmp_path / "r18.safetensors")] if command == "convert" else []
    shared = sharetx(command, "--model", "resnet18", "--num-classes", "10", *out)
    assert shared.exit_code == 0 and shared.stderr == ""  # a shared model: no warning


# ------------------------------------------------------------- item 9: paths first, and the real input size

NO_TORCH = """
import json, sys
from share_transform.cli import main
code = main(sys.argv[1:], standalone_mode=False)
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "timm": "timm" in sys.modules}))
"""


def test_bad_paths_are_refused_before_torch_is_imported(tmp_path: Path) -> None:
    existing = tmp_path / "resnet18-share.safetensors"
    existing.write_bytes(b"mine")
    cases = [
        ["inspect", str(tmp_path / "nonexistent.safetensors")],
        ["export", str(tmp_path / "nonexistent.safetensors"), "--onnx", str(tmp_path / "m.onnx")],
        ["export", str(existing), "--onnx", str(existing)],
        ["convert", "--model", "resnet18", "-o", str(existing)],
        ["convert", "--model", "resnet18", "--checkpoint", str(tmp_path / "nope.pth"), "-o", str(tmp_path / "n")],
    ]
    for args in cases:
        proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"code": 2, "torch": False, "timm": False}, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and ("no such" in proc.stderr or "exists" in proc.stderr)
    assert existing.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == [existing.name]


def test_the_input_size_a_model_was_trained_at_is_recorded_and_shown(tmp_path: Path) -> None:
    path = save(small(), tmp_path / "m.safetensors", input_size=(3, 64, 64), metadata={"epoch": "3"})
    info = read_info(path)
    assert info.input_size == (3, 64, 64) and info.plan is not None and info.plan.input_size == (3, 224, 224)
    assert metadata_of(path)["sharetx.input_size"] == "[3, 64, 64]"
    text = sharetx("inspect", str(path))
    assert text.exit_code == 0 and "input 3x64x64" in text.stdout and "3x224x224" not in text.stdout
    assert json.loads(sharetx("inspect", str(path), "--json").stdout)["input_size"] == [3, 64, 64]
    # Without it, the plan's input size stands.
    assert read_info(save(small(), tmp_path / "p.safetensors")).input_size == (3, 224, 224)
    with pytest.raises(InputSizeError):
        save(small(), tmp_path / "n.safetensors", input_size=(3, 0, 64))
    assert not (tmp_path / "n.safetensors").exists()
