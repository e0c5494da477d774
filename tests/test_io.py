"""ShaResNet files: each shared weight stored once, exact round trips, plain safetensors compatibility,
atomic writes, and checkpoint reading that never unpickles objects."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file
from torch import nn

import share_transform as st
from share_transform.checkpoints import load_checkpoint, read_checkpoint
from share_transform.errors import CheckpointError, FileFormatError, MetaTensorError, MissingFileError, ShareError
from share_transform.files import load, read_info, save
from share_transform.fs import atomic_write

SMALL = {"layers": [2, 2, 2, 2], "channels": [8, 16, 32, 64], "num_classes": 5}
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def small_shared(seed: int = 0) -> nn.Module:
    """A reduced-width timm ResNet-18, built by build_model (so the file can name it) and shared."""
    torch.manual_seed(seed)
    return st.apply(st.build_model("resnet18", **SMALL))


def assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(X), b(X))


def test_round_trip_is_exact_and_tied(tmp_path: Path) -> None:
    model = small_shared()
    path = save(model, tmp_path / "m.safetensors")
    loaded = load(path)
    assert_same(model, loaded)
    assert st.is_tied(loaded)
    assert st.get_plan(loaded) == st.get_plan(model)
    assert st.count_parameters(loaded) == st.count_parameters(model) == st.get_plan(model).params_after
    assert st.build_spec(loaded) == st.build_spec(model)
    # Training the loaded model still moves one shared weight: it is one Parameter, not copies.
    g = st.get_plan(loaded).groups[0]
    modules = dict(loaded.named_modules())
    assert all(modules[m].weight is modules[g.members[0]].weight for m in g.members)


def test_each_shared_weight_is_stored_once(tmp_path: Path) -> None:
    model = small_shared()
    plan = st.get_plan(model)
    info = read_info(save(model, tmp_path / "m.safetensors"))
    assert len(info.aliases) == plan.spatial_convs_removed
    for g in plan.groups:
        stored = g.members[0] + ".weight"
        assert stored in info.tensors
        assert {f"{m}.weight": stored for m in g.members[1:]}.items() <= info.aliases.items()
    buffers = sum(b.numel() for b in model.buffers())
    assert info.stored_numel == plan.params_after + buffers
    assert info.build == {"source": "timm", "name": "resnet18", "kwargs": SMALL}
    assert info.policy == "imagenet" and info.version == st.__version__

    # The same model untied stores every member: the file grows by exactly the saved elements.
    unshared = read_info(save(st.untie(model), tmp_path / "u.safetensors"))
    assert unshared.aliases == {} and unshared.plan is None
    assert unshared.stored_numel - info.stored_numel == plan.params_before - plan.params_after


def test_plain_safetensors_load_model_into_a_tied_model(tmp_path: Path) -> None:
    model = small_shared(seed=0)
    path = save(model, tmp_path / "m.safetensors")
    target = small_shared(seed=1)  # same architecture, tied by apply, other weights
    missing, unexpected = load_model(target, str(path))
    assert (missing, unexpected) == (set(), [])
    assert_same(model, target)
    assert st.is_tied(target)


def test_user_metadata(tmp_path: Path) -> None:
    model = small_shared()
    info = read_info(save(model, tmp_path / "m.safetensors", metadata={"epoch": "90", "note": "best"}))
    assert info.user == {"epoch": "90", "note": "best"}
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
    with pytest.raises(FileFormatError, match="str to str"):
        save(model, tmp_path / "n.safetensors", metadata={"epoch": 90})
    with pytest.raises(FileFormatError, match="reserved"):
        save(model, tmp_path / "n.safetensors", metadata={"sharetx.plan": "{}"})
    assert not (tmp_path / "n.safetensors").exists()


def test_file_without_build_record_needs_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    path = save(model, tmp_path / "plain.safetensors")
    with pytest.raises(FileFormatError, match="does not record how to build"):
        load(path)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_checkpoint(other, path)
    assert torch.equal(other[0].weight, model[0].weight)


def test_bad_files_are_refused_with_specific_errors(tmp_path: Path) -> None:
    good = save(small_shared(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("trunc", "random", "empty"):
        with pytest.raises(FileFormatError, match="not a valid safetensors file"):
            load(tmp_path / f"{name}.safetensors")
    with pytest.raises(MissingFileError):
        load(tmp_path / "nope.safetensors")
    with pytest.raises(FileFormatError, match="not a file"):
        load(tmp_path)
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(FileFormatError, ShareError)


# ------------------------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old contents")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"x" * 1000)  # a partial file exists when the failure strikes
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_of_a_tensor_without_data_is_refused_before_writing(tmp_path: Path) -> None:
    target = tmp_path / "m.safetensors"
    save(small_shared(), target)
    before = target.read_bytes()
    model = small_shared()
    model.fc.register_buffer("no_data", torch.empty(10, device="meta"))
    with pytest.raises(MetaTensorError, match="fc.no_data has no data"):
        save(model, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    with pytest.raises(OSError):
        save(small_shared(), tmp_path / "missing-dir" / "m.safetensors")


def test_written_file_has_a_normal_mode(tmp_path: Path) -> None:
    path = save(small_shared(), tmp_path / "m.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# ------------------------------------------------------------------------------------------- checkpoints


def unshared_state(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = st.build_model("resnet18", **SMALL)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in s.items()}},
        lambda s: {"model": {f"model.{k}": v for k, v in s.items()}, "optimizer": {"lr": 0.1}},
        lambda s: {f"_orig_mod.{k}": v for k, v in s.items()},
    ],
    ids=["plain", "ddp-under-state_dict", "lightning-under-model", "torch-compile"],
)
def test_pth_checkpoints_with_wrappers_and_prefixes(tmp_path: Path, wrap) -> None:
    _, state = unshared_state(seed=3)
    torch.save(wrap(state), tmp_path / "ckpt.pth")
    model, _ = unshared_state(seed=4)
    load_checkpoint(model, tmp_path / "ckpt.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_safetensors_checkpoint_and_sharetx_file_as_checkpoint(tmp_path: Path) -> None:
    _, state = unshared_state(seed=3)
    save_file(state, str(tmp_path / "plain.safetensors"))
    model, _ = unshared_state(seed=4)
    load_checkpoint(model, tmp_path / "plain.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    # A ShaResNet file read as a checkpoint: its aliases are expanded, so an unshared model loads it.
    shared = small_shared(seed=5)
    path = save(shared, tmp_path / "shared.safetensors")
    model, _ = unshared_state(seed=4)
    assert read_checkpoint(path).keys() == model.state_dict().keys()
    load_checkpoint(model, path)
    assert_same(st.apply(model, plan=st.get_plan(shared)), shared)


class NotATensor:
    pass


def test_pth_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    _, state = unshared_state()
    torch.save({"state_dict": state, "extra": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"pickled .*NotATensor object.*weights_only=True"):
        read_checkpoint(tmp_path / "evil.pth")
    # A legacy (non-zip) pickle naming a global is refused the same way, never executed.
    with open(tmp_path / "legacy.pth", "wb") as f:
        pickle.dump({"x": os.system}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"pickled posix\.system object"):
        read_checkpoint(tmp_path / "legacy.pth")


def test_pth_without_a_state_dict(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="non-tensor entries such as epoch, lr"):
        read_checkpoint(tmp_path / "meta.pth")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="found a list"):
        read_checkpoint(tmp_path / "list.pth")


def test_corrupt_and_unknown_checkpoints(tmp_path: Path) -> None:
    _, state = unshared_state()
    torch.save(state, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    # Seeded: one urandom draw in 256 has "{" at byte 8 and is read as a safetensors file.
    (tmp_path / "random.pth").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04")
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "trunc.pth")
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "random.pth")
    with pytest.raises(FileFormatError, match="not a torch.save suffix"):
        read_checkpoint(tmp_path / "weights.npz")
    with pytest.raises(MissingFileError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.pth")


def test_checkpoint_of_another_architecture_names_keys_and_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(st.build_model("resnet34").state_dict(), tmp_path / "r34.pth")
    model = st.build_model("resnet18", layers=[2, 2, 2, 2])  # resnet18 proper: fewer blocks than resnet34
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, tmp_path / "r34.pth")
    msg = str(e.value)
    assert "does not fit resnet18" in msg and "unexpected key(s): layer1.2.conv1.weight" in msg

    torch.save(st.build_model("resnet18", num_classes=10).state_dict(), tmp_path / "r18-10.pth")
    mismatch = r"2 shape mismatch\(es\): fc.weight \(checkpoint 10x512, model 1000x512\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_checkpoint(model, tmp_path / "r18-10.pth")

    state = dict(model.state_dict())
    del state["bn1.running_mean"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): bn1.running_mean"):
        st.checkpoints.load_weights(model, state)


def test_load_onto_a_device_and_metadata_json_is_checked(tmp_path: Path) -> None:
    model = small_shared()
    path = save(model, tmp_path / "m.safetensors")
    loaded = load(path, device=torch.device("cpu"))
    assert st.is_tied(loaded)
    # A file whose recorded plan is not JSON is refused rather than half-loaded.
    tensors = {k: v.contiguous() for k, v in read_checkpoint(path).items() if k not in read_info(path).aliases}
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta["sharetx.plan"] = "{not json"
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(FileFormatError, match="not valid JSON"):
        load(tmp_path / "bad.safetensors")
    assert json.loads(meta["sharetx.aliases"])  # the aliases are JSON too


def test_unshared_checkpoint_into_a_tied_model_is_refused(tmp_path: Path) -> None:
    # Copying differing member weights into one shared Parameter would keep whichever came last.
    torch.manual_seed(1)
    unshared = st.build_model("resnet18", **SMALL)
    torch.save(unshared.state_dict(), tmp_path / "unshared.pth")
    model = small_shared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"holds different weights under layer1.0.conv2.weight and layer1.1"):
        load_checkpoint(model, tmp_path / "unshared.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing copied
    # Loaded before sharing, the same checkpoint is fine, and apply then ties it.
    fresh = st.build_model("resnet18", **SMALL)
    load_checkpoint(fresh, tmp_path / "unshared.pth")
    assert st.is_tied(st.apply(fresh))
