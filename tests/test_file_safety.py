"""Files that cannot be turned against their user: a build record is an allow-list, a file is checked against its
recorded architecture before anything is allocated, outputs never replace what is not a regular file, a killed
write's temporary is cleaned by the next write, tied weights with NaN round-trip, and a plan fits its model."""

from __future__ import annotations

import errno
import functools
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import share_transform as st
from share_transform.build import MODEL_KWARGS, check_model_kwargs
from share_transform.cli import main
from share_transform.errors import (
    CheckpointError,
    FileFormatError,
    ModelArgumentError,
    OutputExistsError,
    PlanMismatchError,
)
from share_transform.files import load, read_info, save
from share_transform.fs import TMP_SUFFIX, atomic_write, temporaries
from share_transform.tie import tensor_aliases

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"layers": [2, 2, 2, 2], "channels": [8, 16, 32, 64], "num_classes": 5}


def small_shared(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return st.apply(st.build_model("resnet18", **SMALL))


def sharetx(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="sharetx")


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sharetx: error: "), result.stderr
    return lines[0]


def rewrite_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """``src`` with some header metadata replaced, written with the safetensors library (as an attacker could)."""
    with safe_open(str(src), "pt") as f:
        metadata = {**f.metadata(), **changes}
    save_file(load_file(str(src)), str(dst), metadata=metadata)
    return dst


def header_only(path: Path, metadata: dict[str, str]) -> Path:
    """A safetensors file holding a header and no tensor: a few hundred bytes."""
    raw = json.dumps({"__metadata__": metadata}).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    return path


# --------------------------------------------------------------------------- item 1: the build record is an allow-list


class Payload:
    """Unpickling it creates the marker file: what a malicious pickle does in place of worse."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.marker, "w")


@pytest.fixture
def unsafe_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.load as torch < 2.6 and timm's older loaders called it: unpickling anything."""
    monkeypatch.setattr(torch, "load", functools.partial(torch.load, weights_only=False))


def _refused_builds(payload: Path) -> dict[str, dict[str, object]]:
    base = {"source": "timm", "name": "resnet18"}
    kwargs = {
        "checkpoint_path": str(payload),
        "pretrained": True,
        "pretrained_cfg": {"file": str(payload)},
        "pretrained_cfg_overlay": {"file": str(payload)},
        "cache_dir": str(payload.parent),
        "device": "cpu",
        "features_only": True,
    }
    builds: dict[str, dict[str, object]] = {k: {**base, "kwargs": {**SMALL, k: v}} for k, v in kwargs.items()}
    builds["hub name"] = {"source": "timm", "name": "hf-hub:timm/resnet18.a1_in1k", "kwargs": {}}
    builds["local-dir name"] = {"source": "timm", "name": f"local-dir:{payload.parent}", "kwargs": {}}
    builds["unknown source"] = {"source": "torch.hub", "name": "resnet18", "kwargs": {}}
    builds["null name"] = {"source": "timm", "name": None, "kwargs": {}}
    builds["kwargs a list"] = {"source": "timm", "name": "resnet18", "kwargs": [["checkpoint_path", "x"]]}
    builds["nested object value"] = {**base, "kwargs": {"layers": {"checkpoint_path": str(payload)}}}
    return builds


BUILD_CASES = list(_refused_builds(Path("/x/p.pt")))


def test_the_payload_runs_when_unpickled(tmp_path: Path, unsafe_torch_load: None) -> None:
    """The attack is real: the payload below creates its marker under the patched torch.load."""
    payload, marker = tmp_path / "payload.pt", tmp_path / "marker"
    torch.save(Payload(marker), payload)
    torch.load(payload)
    assert marker.exists()


@pytest.mark.parametrize("case", BUILD_CASES)
@pytest.mark.parametrize("via", ["load", "inspect", "export"])
def test_a_refused_build_record_runs_nothing(case: str, via: str, tmp_path: Path, unsafe_torch_load: None) -> None:
    payload, marker = tmp_path / "payload.pt", tmp_path / "marker"
    torch.save(Payload(marker), payload)
    good = save(small_shared(), tmp_path / "good.safetensors")
    build = _refused_builds(payload)[case]
    evil = rewrite_metadata(good, tmp_path / "evil.safetensors", **{"sharetx.build": json.dumps(build)})
    if via == "load":
        with pytest.raises(FileFormatError, match="the recorded build") as e:
            load(evil)
        message = str(e.value)
    else:
        args = ["inspect", str(evil)] if via == "inspect" else ["export", str(evil), "--onnx", str(tmp_path / "m.onnx")]
        message = one_line_error(sharetx(*args))
    named = {"hub name": "hf-hub:", "local-dir name": "local-dir:", "unknown source": "torch.hub"}
    argument = named.get(case, case if case in build["kwargs"] else "")  # type: ignore[operator]
    assert argument in message and "the recorded build" in message
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.safetensors", "good.safetensors", "payload.pt"]


def test_save_writes_only_what_load_reads_back(tmp_path: Path) -> None:
    model = st.build_model("resnet18", **SMALL, drop_rate=0.1)
    assert read_info(save(model, tmp_path / "ok.safetensors")).build["kwargs"]["drop_rate"] == 0.1
    model = st.build_model("resnet18", **SMALL, zero_init_last=False)  # timm takes it; the allow-list does not
    with pytest.raises(FileFormatError, match="'zero_init_last' is not accepted"):
        save(model, tmp_path / "no.safetensors")
    assert not (tmp_path / "no.safetensors").exists()


def test_model_kwargs_allow_list() -> None:
    assert {"checkpoint_path", "pretrained", "pretrained_cfg", "cache_dir", "device"}.isdisjoint(MODEL_KWARGS)
    assert check_model_kwargs({"layers": (2, 2, 2, 2), "drop_rate": 0.2}, where="x") == {
        "layers": (2, 2, 2, 2),
        "drop_rate": 0.2,
    }
    with pytest.raises(ModelArgumentError, match=r"--model-kwargs: constructor argument 'checkpoint_path'"):
        check_model_kwargs({"checkpoint_path": "/etc/passwd"}, where="--model-kwargs")


# ------------------------------------------------------------------------------- item 2: check before you allocate

HUGE = """
import json, sys, time
from pathlib import Path
import timm  # imports first: the time measured is load's own
import share_transform as st
import share_transform.files

def peak_rss():
    # getrusage's ru_maxrss would also count the pytest process this child was forked from (Linux carries the
    # parent's high-water mark across fork and exec); VmHWM is this program's own peak.
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

path = Path(sys.argv[1])
meta = {{"format": "pt", "sharetx.file_version": "1", "sharetx.version": st.__version__, "sharetx.aliases": "{{}}",
        "sharetx.build": json.dumps({{"source": "timm", "name": "vit_giant_patch14_dinov2",
                                      "kwargs": {{"num_classes": 10**12}}}})}}
raw = json.dumps({{"__metadata__": meta}}).encode()
raw += b" " * (-len(raw) % 8)
path.write_bytes(len(raw).to_bytes(8, "little") + raw)
start = time.perf_counter()
try:
    st.load(path)
except st.ShareError as e:
    seconds = time.perf_counter() - start
    print(json.dumps({{"error": type(e).__name__, "message": str(e), "seconds": seconds,
                      "peak_rss": peak_rss(),
                      "bytes": path.stat().st_size}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_a_header_naming_a_huge_model_is_refused_fast_and_small(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(HUGE.format()), str(tmp_path / "huge.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bytes"] < 400
    assert result["error"] == "CheckpointError" and "does not fit vit_giant_patch14_dinov2" in result["message"]
    # The 1.5e15-parameter model would need 6 PB; built on the meta device it costs nothing before the refusal.
    assert result["seconds"] < 2.0
    assert result["peak_rss"] < 1 << 30  # the whole child, torch and timm imports included


def test_a_file_that_does_not_fit_its_architecture_is_refused(tmp_path: Path) -> None:
    good = save(small_shared(), tmp_path / "good.safetensors")
    build = json.dumps({"source": "timm", "name": "resnet18", "kwargs": {**SMALL, "num_classes": 7}})
    other = rewrite_metadata(good, tmp_path / "other.safetensors", **{"sharetx.build": build})
    with pytest.raises(CheckpointError, match="the recorded plan does not fit the recorded architecture"):
        load(other)
    unshared = save(st.untie(small_shared()), tmp_path / "unshared.safetensors")
    other = rewrite_metadata(unshared, tmp_path / "other.safetensors", **{"sharetx.build": build})
    with pytest.raises(
        CheckpointError,
        match=r"2 shape mismatch\(es\): fc.bias \(checkpoint 5, model 7\), fc.weight \(checkpoint 5x64, model 7x64\)",
    ):
        load(other)
    # Same names and shapes, but an integer tensor where the model holds floats.
    state = load_file(str(good))
    state["fc.bias"] = torch.zeros(5, dtype=torch.int32)
    with safe_open(str(good), "pt") as f:
        save_file(state, str(tmp_path / "int.safetensors"), metadata=f.metadata())
    with pytest.raises(CheckpointError, match=r"dtype mismatch at fc.bias \(I32 in the file, torch.float32"):
        load(tmp_path / "int.safetensors")


def test_load_materialises_without_random_init_and_keeps_ties(tmp_path: Path) -> None:
    model = small_shared()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # a value random init never gives everywhere
    loaded = load(save(model, tmp_path / "m.safetensors"))
    assert all(bool((p == 0.5).all()) for p in loaded.parameters())
    assert st.is_tied(loaded) and st.count_parameters(loaded) == st.count_parameters(model)
    g = st.get_plan(loaded).groups[0]
    modules = dict(loaded.named_modules())
    assert all(modules[m].weight is modules[g.members[0]].weight for m in g.members)
    assert all(not p.is_meta for p in loaded.parameters())


def test_a_model_with_computed_buffers_loads(tmp_path: Path) -> None:
    """resnetblur's blur filter is a buffer the file does not hold: it must be the constructor's, not garbage."""
    torch.manual_seed(0)
    model = st.apply(st.build_model("resnetblur18", layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], num_classes=3))
    loaded = load(save(model, tmp_path / "b.safetensors"))
    want = dict(model.named_buffers())
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, want[name]), name
    model.eval(), loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sharetx.aliases", json.dumps(["layer1.1.conv2.weight"]), "must map names to stored tensors"),
        ("sharetx.aliases", json.dumps({"layer1.1.conv2.weight": None}), "must map names to stored tensors"),
        ("sharetx.build", json.dumps(None), "must be an object with source, name and kwargs"),
        ("sharetx.build", json.dumps({"source": "timm", "name": None, "kwargs": {}}), "names model None"),
        ("sharetx.plan", json.dumps({"groups": None}), "the recorded share plan is malformed"),
        ("sharetx.plan", json.dumps([1, 2]), "the recorded share plan is malformed"),
    ],
)
def test_malformed_header_fields_are_one_line(field: str, value: str, match: str, tmp_path: Path) -> None:
    good = save(small_shared(), tmp_path / "good.safetensors")
    bad = rewrite_metadata(good, tmp_path / "bad.safetensors", **{field: value})
    with pytest.raises(FileFormatError, match=match):
        load(bad)
    assert match in one_line_error(sharetx("inspect", str(bad)))


def test_the_writer_is_safetensors(tmp_path: Path) -> None:
    """The safetensors library writes the file: tensors aligned, read back equal, each shared weight once."""
    model = small_shared()
    model.fc.register_buffer("steps", torch.arange(3, dtype=torch.int64))
    model.fc.register_buffer("scale", torch.ones(3, dtype=torch.bfloat16))
    model.fc.register_buffer("flag", torch.tensor([True, False]))
    path = save(model, tmp_path / "m.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    for key, entry in header.items():
        if key != "__metadata__":
            start = entry["data_offsets"][0]
            assert start % torch.tensor([], dtype=getattr(torch, _TORCH[entry["dtype"]])).element_size() == 0, key
    got = load_file(str(path))
    stored, aliases = read_info(path).tensors, read_info(path).aliases
    state = model.state_dict()
    assert set(got) == set(stored) == set(state)  # state_dict() too lists each shared weight once
    assert set(aliases) == {alias for names in tensor_aliases(model) for alias in names[1:]}
    for k, v in got.items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k


_TORCH = {"F32": "float32", "I64": "int64", "BF16": "bfloat16", "BOOL": "bool"}


# ------------------------------------------------------------------------------------------------- item 3: outputs


def test_convert_force_never_replaces_a_fifo_or_a_symlink(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, force, says in [
        (fifo, True, "not a regular file"),
        (link, True, "is a symlink"),
        (dangling, True, "is a symlink"),
        (dangling, False, "is a symlink"),  # a dangling link counts as existing
        (tmp_path, True, "is a directory"),
    ]:
        flags = ["--force"] if force else []
        assert says in one_line_error(sharetx("convert", "--model", "resnet18", "-o", str(out), *flags))
    onnx = one_line_error(sharetx("export", str(target), "--onnx", str(fifo), "--force"))
    assert "not a regular file" in onnx
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert fifo.is_fifo() and link.is_symlink() and dangling.is_symlink()
    assert target.read_bytes() == b"keep me" and not (tmp_path / "nowhere.safetensors").exists()


KILLED_CONVERT = """
import os, signal, sys
import share_transform.files as files
write = files.write_safetensors
def write_then_die(*args):
    write(*args)  # the temporary file is complete: the kill lands just before the rename
    os.kill(os.getpid(), signal.SIGKILL)
files.write_safetensors = write_then_die
from share_transform.cli import main
main(sys.argv[1:])
"""

KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from share_transform.fs import atomic_write
def die(tmp):
    Path(tmp).write_bytes(b"left by a killed write")
    os.kill(os.getpid(), signal.SIGKILL)
atomic_write(sys.argv[1], die)
"""


def test_a_killed_converts_temporary_is_cleaned_by_the_next_convert(tmp_path: Path) -> None:
    out = tmp_path / "r18.safetensors"
    argv = ["convert", "--model", "resnet18", "--num-classes", "10", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CONVERT, *argv], env=env, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr
    # One thing is left, named for its destination and its dead writer; the library's own temporary is inside it.
    (left,) = temporaries(out)
    assert [p.name for p in tmp_path.iterdir()] == [left.name] and not out.exists()
    assert left.name.startswith(f".r18.safetensors.{proc.pid}-") and left.name.endswith(TMP_SUFFIX)
    assert [p.name for p in left.iterdir()] == ["r18.safetensors"]
    assert (left / "r18.safetensors").stat().st_size > 30_000_000  # the full-size file a kill leaves behind

    result = sharetx(*argv)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.safetensors"]
    assert st.count_parameters(load(out)) == 8_048_202


def test_the_longest_name_the_file_system_takes(tmp_path: Path) -> None:
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = tmp_path / ("m" * (name_max - len(".safetensors")) + ".safetensors")
    assert len(out.name) == name_max
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (left,) = temporaries(out)
    assert len(left.name) <= name_max and left.name.endswith(TMP_SUFFIX)
    model = small_shared()
    save(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert st.count_parameters(load(out)) == st.count_parameters(model)


@pytest.fixture
def file_size_limit() -> Iterator[None]:
    """Files may grow to 64 KiB (what a full disk does to a writer, for root too): writes past it fail EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_write_names_the_destination_and_keeps_the_old_file(tmp_path: Path, file_size_limit: None) -> None:
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(OSError) as e:
        save(small_shared(), out)
    assert e.value.errno == errno.EFBIG and e.value.filename == str(out) and TMP_SUFFIX not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"] and out.read_bytes() == b"old"
    result = sharetx("convert", "--model", "resnet18", "-o", str(out), "--force")
    assert one_line_error(result) == f"sharetx: error: {out}: File too large"


def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputExistsError, match="is a symlink"):
        atomic_write(link, lambda tmp: Path(tmp).write_text("x"))
    assert not (tmp_path / "elsewhere").exists()


# ------------------------------------------------------------------------------------------ item 5: NaN and Inf


def test_nan_and_inf_in_a_shared_weight_round_trip_bit_exactly(tmp_path: Path) -> None:
    model = small_shared()
    g = st.get_plan(model).groups[0]
    weight = dict(model.named_modules())[g.members[0]].weight
    with torch.no_grad():
        flat = weight.view(-1)
        flat[0], flat[1], flat[2] = float("nan"), float("inf"), -float("inf")
        flat.view(torch.int32)[3] = 0x7FC0_1234  # a NaN with a payload
    loaded = load(save(model, tmp_path / "nan.safetensors"))
    got = dict(loaded.named_modules())[g.members[0]].weight
    assert torch.equal(got.detach().view(torch.int32), weight.detach().view(torch.int32))
    assert st.is_tied(loaded)


def test_convert_warns_of_a_checkpoint_with_non_finite_values(tmp_path: Path) -> None:
    model = st.build_model("resnet18", num_classes=10)
    state = model.state_dict()
    state["fc.bias"][3] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    out = tmp_path / "out.safetensors"
    result = sharetx("convert", "--model", "resnet18", "--num-classes", "10", "--checkpoint", str(tmp_path / "nan.pth"),
                     "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"sharetx: warning: {tmp_path / 'nan.pth'} holds non-finite values (NaN or inf) in fc.bias"
    ]
    assert torch.isnan(load(out).fc.bias[3])


# ------------------------------------------------------------------------------------------------ item 6: plans


def test_a_plan_for_another_architecture_raises() -> None:
    r18 = st.build_model("resnet18", **SMALL)
    plan = st.plan(r18)
    r34 = st.build_model("resnet34", layers=[3, 4, 6, 3], channels=[8, 16, 32, 64], num_classes=5)
    with pytest.raises(PlanMismatchError, match="the plan was made for resnet18"):
        st.apply(r34, plan=plan)  # every member path and signature of the ResNet-18 plan exists in a ResNet-34
    deeper = st.build_model("resnet18", layers=[3, 4, 6, 3], channels=[8, 16, 32, 64], num_classes=5)
    sizes = f"made for a model of {st.count_parameters(r18):,} parameters, this one has {st.count_parameters(deeper):,}"
    with pytest.raises(PlanMismatchError, match=sizes):
        st.apply(deeper, plan=plan)
    wider_head = st.build_model("resnet18", **{**SMALL, "num_classes": 6})
    with pytest.raises(PlanMismatchError, match="parameters"):
        st.apply(wider_head, plan=plan)
    assert st.get_plan(r34) is None and st.get_plan(deeper) is None
    # The plan's own model, tied or untied again, still takes it.
    st.apply(r18, plan=plan)
    st.apply(r18, plan=plan)
    st.apply(st.untie(r18), plan=plan)
    assert st.is_tied(r18)
