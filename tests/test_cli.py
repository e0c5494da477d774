"""``sharetx``: convert round trips (files, counts, tensors, outputs), the reports, and one-line errors with
exit code 2 that write nothing. In-process with click's CliRunner, and once as the installed console script."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner, Result

import share_transform as st
from share_transform.cli import SharetxGroup, main
from share_transform.errors import ExportError
from share_transform.files import load, read_info, save

SMALL = ["--model", "resnet18", "--num-classes", "10"]
# timm resnet18 with 10 classes: 11,181,642 parameters, 20 convs. Each stage's two blocks share their second
# 3x3 (64, 128, 256, 512 channels): 9 * (64^2 + 128^2 + 256^2 + 512^2) = 3,133,440 fewer, 4 convs fewer.
SMALL_UNIQUE = 8_048_202


def sharetx(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="sharetx")


def assert_one_line_error(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sharetx: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def listing(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in path.iterdir()}


# ------------------------------------------------------------------------------------- convert round trips


@pytest.mark.parametrize(
    ("args", "build", "policy", "unique", "x"),
    [
        (["--model", "resnet152"], ("resnet152", {}), "imagenet", 36_821_032, (3, 64, 64)),
        (
            ["--model", "resnet34", "--source", "torchvision"],
            ("torchvision:resnet34", {}),
            "imagenet",
            13_613_864,
            (3, 64, 64),
        ),
        (
            ["--model", "wrn_40_4", "--policy", "cifar", "--num-classes", "10"],
            ("wrn_40_4", {"num_classes": 10}),
            "cifar",
            5_852_634,
            (3, 32, 32),
        ),
    ],
    ids=["timm-resnet152", "torchvision-resnet34", "cifar-wrn-40-4"],
)
def test_convert_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args, build, policy, unique, x) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    result = sharetx("convert", *args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    path = Path(report["file"]["path"])
    assert path.name == f"{build[0].split(':')[-1]}-share.safetensors" and path.exists()
    assert report["total"]["params_after"] == unique and report["file"]["bytes"] == path.stat().st_size

    # The model the command built, rebuilt from the same seed, is what the file holds, exactly.
    torch.manual_seed(0)
    saved = st.apply(st.build_model(build[0], **build[1]), policy)
    loaded = load(path)
    assert st.is_tied(loaded) and st.count_parameters(loaded) == unique
    assert st.get_plan(loaded).policy == policy
    a, b = saved.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved.eval(), loaded.eval()
    batch = torch.randn(2, *x)
    with torch.no_grad():
        assert torch.equal(saved(batch), loaded(batch))

    # Against the same weights saved unshared: only the shared weights' extra copies are gone.
    unshared = save(st.untie(saved), tmp_path / "unshared.safetensors")
    plan = st.get_plan(loaded)
    assert read_info(unshared).stored_numel - read_info(path).stored_numel == plan.params_before - plan.params_after
    if build[0] == "resnet152":
        assert path.stat().st_size <= 0.62 * unshared.stat().st_size


def test_convert_text_report_and_force(tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    result = sharetx("convert", *SMALL, "--init", "mean", "-o", str(out))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "ShaResNet resnet18 (timm), policy imagenet, input 3x224x224"
    assert lines[1].split() == [
        "stage",
        "resolution",
        "blocks",
        "shared",
        "params",
        "before",
        "params",
        "after",
        "decrease",
        "conv",
        "weights",
        "bytes",
        "on",
        "disk",
    ]
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[4:7] == ["11,181,642", "8,048,202", "28.0%"]  # timm resnet18, 10 classes
    assert f"file: {out} ({out.stat().st_size:,} bytes" in result.stdout

    before = out.read_bytes()
    assert_one_line_error(sharetx("convert", *SMALL, "-o", str(out)))
    assert out.read_bytes() == before
    assert sharetx("convert", *SMALL, "-o", str(out), "--force").exit_code == 0
    assert out.read_bytes() != before  # a new random init was written
    assert listing(tmp_path).keys() == {"small.safetensors"}


def test_convert_from_a_pth_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = st.build_model("resnet18", num_classes=10)
    torch.save(
        {"epoch": 90, "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}},
        tmp_path / "trained.pth",
    )
    out = tmp_path / "shared.safetensors"
    result = sharetx(
        "convert", *SMALL, "--checkpoint", str(tmp_path / "trained.pth"), "--init", "mean", "-o", str(out), "--json"
    )
    assert result.exit_code == 0, result.output
    loaded = load(out)
    modules, trained_modules = dict(loaded.named_modules()), dict(trained.named_modules())
    for g in st.get_plan(loaded).groups:
        mean = torch.stack([trained_modules[m].weight for m in g.members]).mean(dim=0)
        assert torch.allclose(modules[g.members[0]].weight, mean)
    shared = {f"{m}.weight" for g in st.get_plan(loaded).groups for m in g.members}
    for k, v in trained.state_dict().items():
        if k not in shared:
            assert torch.equal(loaded.state_dict()[k], v), k


def test_plan_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = sharetx("plan", "--model", "resnet50", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["total"]["params_before"], report["total"]["params_after"]) == (25_557_032, 20_469_800)
    assert (report["total"]["convs_before"], report["total"]["convs_after"]) == (53, 44)
    assert [s["spatial_shared"] for s in report["stages"]] == [3, 3, 5, 2]
    assert sum(s["params_after"] for s in report["stages"]) + report["rest"]["params_after"] == 20_469_800
    assert report["file"] is None
    text = sharetx("plan", "--model", "resnet50").stdout
    assert "20,469,800" in text and "19.9%" in text and "53 -> 44" in text
    assert list(tmp_path.iterdir()) == []


def test_inspect(tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    assert sharetx("convert", *SMALL, "-o", str(out)).exit_code == 0
    result = sharetx("inspect", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["build"] == {"source": "timm", "name": "resnet18", "kwargs": {"num_classes": 10}}
    assert data["policy"] == "imagenet" and data["parameters"] == SMALL_UNIQUE and data["bytes"] == out.stat().st_size
    assert data["aliases"] == 4 and data["summary"]["total"]["convs_after"] == 16
    text = sharetx("inspect", str(out)).stdout
    assert "model timm:resnet18(num_classes=10)" in text and "8,048,202 unique parameters" in text


def test_export(tmp_path: Path) -> None:
    src, onnx_out = tmp_path / "small.safetensors", tmp_path / "small.onnx"
    assert sharetx("convert", *SMALL, "-o", str(src)).exit_code == 0
    result = sharetx("export", str(src), "--onnx", str(onnx_out), "--input-size", "3", "64", "64", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["conv_weight_initializers"] == data["distinct_conv_weights"] == 16
    assert data["max_abs_diff"] <= 1e-4 and data["file_bytes"] == onnx_out.stat().st_size
    assert_one_line_error(sharetx("export", str(src), "--onnx", str(onnx_out)))


def test_models() -> None:
    result = sharetx("models", "wrn")
    assert result.exit_code == 0
    # The paper's WRNs and their ShaResNets; a reduced wrn_<d>_<k> that another test built by name in this
    # process is registered with timm too, so it may be listed beside them.
    names = set(result.stdout.split())
    assert {"wrn_22_10", "wrn_28_4", "wrn_28_10", "wrn_40_4", "wrn_28_10_share", "wrn_40_4_share"} <= names
    assert all(re.fullmatch(r"wrn_\d+_\d+(_share)?", n) for n in names)
    names = json.loads(sharetx("models", "resnet1*", "--source", "torchvision", "--json").stdout)
    assert set(names) == {"torchvision:resnet18", "torchvision:resnet101", "torchvision:resnet152"}
    result = sharetx("models", "no-such-net")  # finds nothing: fails like grep, one line on stderr
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "sharetx: error: no model name matches 'no-such-net'\n"
    result = sharetx("models", "no-such-net", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout) == []


def test_table() -> None:
    """The measured counts against the paper's printed figures, compared here rather than through the code's own
    ``agrees`` flag."""
    from share_transform.paper import TABLE1

    result = sharetx("table", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["arch"] for r in rows] == [row.arch for row in TABLE1]
    for r, row in zip(rows, TABLE1, strict=True):
        paper = (r["paper_params_original_m"], r["paper_params_shared_m"], r["paper_decrease_pct"])
        assert paper == (row.params_original, row.params_shared, row.decrease_pct)
        # Millions rounded to the decimals the paper prints them with are the paper's figures.
        assert round(r["params_before"] / 1e6, row.decimals) == row.params_original, row.model
        assert round(r["params_after"] / 1e6, row.decimals) == row.params_shared, row.model
        decrease = 100 * (1 - r["params_after"] / r["params_before"])
        assert r["decrease_pct"] == pytest.approx(decrease, abs=1e-4)
        # The paper truncates two decreases (ResNet-34 37.54 -> 37, ResNet-101 33.93 -> 33) and rounds the rest.
        printed = math.floor(decrease) if row.model in ("ResNet-34", "ResNet-101") else round(decrease)
        assert printed == row.decrease_pct, row.model
        assert r["agrees"] is True
    resnet152 = rows[-1]
    assert (resnet152["params_before"], resnet152["params_after"]) == (60_192_808, 36_821_032)
    assert sharetx("table").stdout.startswith("| model |")


@pytest.mark.parametrize("command", ["convert", "plan", "inspect", "table", "export", "models", "sweep"])
def test_help_has_an_example(command: str) -> None:
    result = sharetx(command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout and f"sharetx {command}" in result.stdout


def test_version_and_group_help() -> None:
    assert sharetx("--version").stdout.strip() == f"sharetx, version {st.__version__}"
    assert all(c in sharetx("--help").stdout for c in ("convert", "plan", "inspect", "table", "export", "models"))


# ------------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("bad-files")
    good = tmp_path / "good.safetensors"
    save(st.apply(st.build_model("resnet18", layers=[1, 1, 1, 1], channels=[8, 8, 8, 8])), good)
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    # Seeded: one urandom draw in 256 has "{" at byte 8 and reads as a safetensors header.
    noise = random.Random(0)
    (tmp_path / "random.safetensors").write_bytes(noise.randbytes(10_000))
    (tmp_path / "random.pth").write_bytes(noise.randbytes(10_000))
    torch.save({"state_dict": {"w": torch.ones(1)}, "config": click.Context}, tmp_path / "object.pth")
    torch.save(st.build_model("resnet34", num_classes=10).state_dict(), tmp_path / "resnet34.pth")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "truncated.safetensors"], "not a valid safetensors file"),
        (["inspect", "random.safetensors"], "not a valid safetensors file"),
        (["inspect", "missing.safetensors"], "no such file"),
        (["export", "truncated.safetensors", "--onnx", "out.onnx"], "not a valid safetensors file"),
        (["export", "missing.safetensors", "--onnx", "out.onnx"], "no such file"),
        (["convert", *SMALL, "--checkpoint", "truncated.safetensors"], "not a valid safetensors file"),
        (["convert", *SMALL, "--checkpoint", "random.pth"], "truncated or corrupt"),
        (["convert", *SMALL, "--checkpoint", "missing.pth"], "no such checkpoint"),
        (["convert", *SMALL, "--checkpoint", "object.pth"], "pickled click.core.Context object"),
        (["convert", *SMALL, "--checkpoint", "resnet34.pth"], "does not fit resnet18: 96 unexpected key(s)"),
        (["convert", "--model", "resnt50"], "did you mean resnet50"),
        (["convert", "--model", "torchvision:resnt50"], "unknown torchvision model 'resnt50'"),
        (["convert", "--model", "resnet50", "--policy", "foo"], "Invalid value for '--policy'"),
        (["convert", "--model", "resnet50", "--num-classes", "0"], "Invalid value for '--num-classes'"),
        (["convert", *SMALL, "-o", "no-dir/x.safetensors"], "does not exist"),
        (["convert", *SMALL, "-o", "good.safetensors"], "exists; pass --force"),
        (["convert"], "Missing option '--model'"),
        (["export", "good.safetensors"], "Missing option '--onnx'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["convert", *SMALL, "--group-size", "0"], "group_size must be an integer >= 1"),
        (["plan", *SMALL, "--templates", "0"], "templates must be an integer >= 1"),
        (["convert", *SMALL, "--scope", "every"], "unknown scope 'every'; choose one of last, all"),
        (["plan", *SMALL, "--budget", "0"], "budget is a fraction of the original parameters in (0, 1], got 0.0"),
        (["convert", *SMALL, "--budget", "1.5"], "budget is a fraction of the original parameters in (0, 1]"),
        (["convert", "--model", "wrn_16_1", "--policy", "swrn"], "policy 'swrn' is soft sharing; give templates"),
        (["plan", *SMALL, "--budget", "0.8", "--group-size", "2"], "give budget or group_size, not both"),
        (["plan", *SMALL, "--budget", "0.3"], "budget 0.3 is unreachable"),
        (["sweep", *SMALL, "--plot", "no-dir/sweep.png"], "does not exist"),
    ],
)
def test_errors_are_one_line_exit_2_and_write_nothing(
    bad_files: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(bad_files)
    before = listing(bad_files)
    line = assert_one_line_error(sharetx(*args))
    assert message in line
    assert listing(bad_files) == before


def test_internal_failures_exit_1() -> None:
    @click.group(cls=SharetxGroup)
    def group() -> None:
        pass

    @group.command()
    def bug() -> None:
        raise KeyError("oops")

    @group.command()
    def exporter() -> None:
        raise ExportError("onnxruntime differs from PyTorch by 0.3")

    runner = CliRunner()
    line = assert_one_line_error(runner.invoke(group, ["bug"]), code=1)
    assert "internal error (KeyError: 'oops')" in line
    assert "differs" in assert_one_line_error(runner.invoke(group, ["exporter"]), code=1)


def _break_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(name: str, source: str | None, num_classes: int | None) -> None:
        raise ZeroDivisionError("a bug in the build")

    monkeypatch.setattr("share_transform.cli._build", build)


@pytest.mark.parametrize("how", ["--debug", "SHARETX_DEBUG=1"])
def test_debug_prints_the_traceback_of_an_internal_error(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    _break_the_build(monkeypatch)
    monkeypatch.delenv("SHARETX_DEBUG", raising=False)
    line = assert_one_line_error(sharetx("plan", *SMALL), code=1)  # the default: one line
    assert line == (
        "sharetx: error: internal error (ZeroDivisionError: a bug in the build); please report it "
        "(rerun with sharetx --debug for the traceback)"
    )
    assert_one_line_error(CliRunner().invoke(main, ["plan", *SMALL], env={"SHARETX_DEBUG": "0"}), code=1)

    args, env = (["--debug", "plan", *SMALL], {}) if how == "--debug" else (["plan", *SMALL], {"SHARETX_DEBUG": "1"})
    result = CliRunner().invoke(main, args, env=env, prog_name="sharetx")
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert any(ln.strip() == 'raise ZeroDivisionError("a bug in the build")' for ln in lines)  # the raising frame
    assert lines[-2:] == [
        "ZeroDivisionError: a bug in the build",
        "sharetx: error: internal error (ZeroDivisionError: a bug in the build); please report it",
    ]


def test_debug_shows_where_a_share_error_was_raised_too() -> None:
    result = sharetx("--debug", "plan", *SMALL, "--group-size", "0")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and 'policies.py", line' in result.stderr
    assert lines[-1].startswith("sharetx: error: resnet18: group_size must be an integer >= 1")
    assert lines[-2].startswith("share_transform.errors.ShareOptionError: resnet18: group_size must be")


# --------------------------------------------------------------------------------- the installed script


def test_installed_console_script(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("sharetx")
    assert exe.exists(), "the package is not installed with its console script"
    out = tmp_path / "small.safetensors"
    run = subprocess.run([str(exe), "convert", *SMALL, "-o", str(out), "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["total"]["params_after"] == SMALL_UNIQUE
    assert st.count_parameters(load(out)) == SMALL_UNIQUE

    (tmp_path / "random.safetensors").write_bytes(os.urandom(1000))
    run = subprocess.run([str(exe), "inspect", str(tmp_path / "random.safetensors")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("sharetx: error: ") and "Traceback" not in run.stderr

    run = subprocess.run([sys.executable, "-m", "share_transform", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"sharetx, version {st.__version__}"


# ------------------------------------------------------------------------------------------- the sharing dial

# resnet18: two basic blocks a stage of widths 64..512; the first 3x3 of stages 2-4 is strided.
WIDTHS = (64, 128, 256, 512)


def test_sweep_table_json_and_plot(tmp_path: Path) -> None:
    result = sharetx("sweep", *SMALL, "--json", "--plot", str(tmp_path / "sweep.png"))
    assert result.exit_code == 0, result.output
    rows = {(r["scope"], r["group_size"], r["templates"]): r for r in json.loads(result.stdout)}
    original = SMALL_UNIQUE + sum(w * w * 9 for w in WIDTHS)
    assert rows[("last", 1, None)]["unique_params"] == original
    assert rows[("last", None, None)]["unique_params"] == SMALL_UNIQUE
    # soft, one template: the shared weight plus one coefficient per member (2 members a stage)
    assert rows[("last", None, 1)]["unique_params"] == SMALL_UNIQUE + 4 * 2
    # scope all: stage 1 shares 4 convs, stages 2-4 three (their first 3x3 is strided)
    members = (4, 3, 3, 3)
    assert rows[("all", None, None)]["unique_params"] == original - sum(
        (m - 1) * w * w * 9 for w, m in zip(WIDTHS, members)
    )
    two = rows[("all", None, 2)]
    assert two["unique_params"] == original - sum(m * w * w * 9 - 2 * (w * w * 9 + m) for w, m in zip(WIDTHS, members))
    assert two["distinct_conv_weights"] == 20 - sum(members) + 4 * 2
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = sharetx("sweep", *SMALL)
    assert text.exit_code == 0 and text.stdout.splitlines()[1].split() == [
        "scope", "group", "size", "templates", "unique", "params", "decrease", "distinct", "weights"
    ]  # fmt: skip


def test_convert_soft_sharing_round_trip_and_inspect(tmp_path: Path) -> None:
    out = tmp_path / "soft.safetensors"
    result = sharetx("convert", *SMALL, "--templates", "2", "--scope", "all", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    members = (4, 3, 3, 3)
    original = SMALL_UNIQUE + sum(w * w * 9 for w in WIDTHS)
    expected = original - sum(m * w * w * 9 - 2 * (w * w * 9 + m) for w, m in zip(WIDTHS, members))
    assert json.loads(result.stdout)["total"]["params_after"] == expected
    model = load(out)
    assert st.count_parameters(model) == expected and st.is_tied(model)
    info = sharetx("inspect", str(out), "--json")
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["sharing"] == {"group_size": None, "scope": "all", "templates": 2, "budget": None, "exclude": []}
    assert data["parameters"] == expected
    text = sharetx("inspect", str(out)).stdout
    assert "scope all, 2 templates" in text and "stage 1: 2 templates 64x64x3x3 for 4 convs" in text


# --------------------------------------------------------------------------------------- extension points


def test_exclude_on_plan_convert_inspect_and_sweep(tmp_path: Path) -> None:
    # resnet18's stage 4: two blocks whose second 3x3 (512 -> 512) shares; excluded, both keep their weights.
    unique = SMALL_UNIQUE + 512 * 512 * 9
    result = sharetx("plan", *SMALL, "--exclude", "layer4.*", "--exclude", "layer1.0.conv2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stage1 = 64 * 64 * 9  # stage 1 loses a member, so its group is gone too (one left)
    assert report["total"]["params_after"] == unique + stage1
    assert report["options"]["exclude"] == ["layer4.*", "layer1.0.conv2"]
    assert report["excluded"] == ["layer1.0.conv2", "layer4.0.conv2", "layer4.1.conv2"]
    text = sharetx("plan", *SMALL, "--exclude", "layer4.*").stdout
    assert text.splitlines()[0].endswith("exclude layer4.*")
    assert "excluded (keep their own weights): layer4.0.conv2, layer4.1.conv2" in text

    out = tmp_path / "r18.safetensors"
    assert sharetx("convert", *SMALL, "--exclude", "layer4", "-o", str(out)).exit_code == 0
    assert read_info(out).plan.options.exclude == ("layer4",)  # type: ignore[union-attr]
    assert st.count_parameters(load(out)) == unique
    inspected = json.loads(sharetx("inspect", str(out), "--json").stdout)
    assert inspected["sharing"]["exclude"] == ["layer4"] and inspected["parameters"] == unique

    rows = json.loads(sharetx("sweep", *SMALL, "--exclude", "layer4", "--json").stdout)
    stage = [r for r in rows if (r["scope"], r["group_size"], r["templates"]) == ("last", None, None)]
    assert [r["unique_params"] for r in stage] == [unique]
    assert_one_line_error(sharetx("sweep", *SMALL, "--exclude", "layer9"))


def test_a_policy_registered_before_main_runs_is_a_choice() -> None:
    assert "every-block" not in sharetx("plan", "--help").stdout
    bad = assert_one_line_error(sharetx("plan", *SMALL, "--policy", "every-block"))
    assert "Invalid value for '--policy': 'every-block' is not one of" in bad
    st.register_policy("every-block", keep_first_block=False, scope="all", description="both 3x3s share")
    try:
        assert "every-block" in sharetx("plan", "--help").stdout
        result = sharetx("plan", *SMALL, "--policy", "every-block", "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["policy"] == "every-block" and report["options"]["scope"] == "all"
        members = (4, 3, 3, 3)  # scope all on resnet18: as in test_sweep_table_json_and_plot
        original = SMALL_UNIQUE + sum(w * w * 9 for w in WIDTHS)
        assert report["total"]["params_after"] == original - sum((m - 1) * w * w * 9 for w, m in zip(WIDTHS, members))
    finally:
        del st.POLICIES["every-block"]
