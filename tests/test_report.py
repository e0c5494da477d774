"""The report: runs collected from their directories into Tables 2 and 3 and Figures 4 and 5.

The run directories are written here in the recipes' format (run.json + metrics.jsonl), so these tests do
not depend on the training code.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import matplotlib
import matplotlib.image
import pytest

from share_transform.errors import ShareError
from share_transform.train.errors import ReportError
from share_transform.train.metrics import METRICS_FILE, RUN_FILE
from share_transform.train.report import (
    FIGURE4_FILE,
    FIGURE5_FILE,
    Report,
    build_report,
    find_runs,
    load_run,
    paper_model_name,
    write_report,
)
from share_transform.train.report.figures import figure4, figure5


def make_run(
    root: Path,
    name: str,
    *,
    arch: str,
    dataset: str,
    share: bool,
    seed: int,
    params: int,
    final_top1: float,
    final_top5: float | None = None,
    epochs: int = 3,
    done: int | None = None,
    recipe: str = "cifar",
    policy: str = "cifar",
    sharing: dict | None = None,
    val_split: int | None = None,
    tested: bool = True,
) -> Path:
    """A run directory as the recipes write it; the error falls linearly to ``final_top1``.

    With ``val_split`` (a held-out split chose the best epoch), ``val_*`` is the split's error, 1 point above the
    test error, and the final line carries the test figures (unless ``tested`` is false: killed before).
    """
    path = root / name
    path.mkdir(parents=True)
    (path / RUN_FILE).write_text(
        json.dumps(
            {
                "recipe": recipe,
                "arch": arch,
                "dataset": dataset,
                "share": share,
                "policy": policy if share else None,
                "sharing": sharing if share else None,
                "seed": seed,
                "epochs": epochs,
                "batch_size": 128,
                "lr": 0.1,
                "params_unshared": params,
                "unique_params": params,
                **({"val_split": val_split} if val_split is not None else {}),
                "args": {"arch": arch},
            }
        )
    )
    lines = []
    for e in range(1, (epochs if done is None else done) + 1):
        top1 = final_top1 + 10.0 * (epochs - e)
        record = {
            "epoch": e,
            "lr": 0.1,
            "train_loss": 2.0 / e,
            "train_top1_err": top1 - 1,
            "train_top5_err": 1.0,
            "val_loss": 2.5 / e,
            "val_top1_err": top1 + (1 if val_split else 0),
            "val_top5_err": final_top5 if final_top5 is not None else top1 / 3,
            "images_per_s": 100.0,
            "unique_params": params,
            "shared": share,
        }
        if val_split and tested and e == epochs:
            record |= {"test_loss": 2.5 / e, "test_top1_err": top1, "test_top5_err": record["val_top5_err"]}
        lines.append(json.dumps(record))
    (path / METRICS_FILE).write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # CIFAR-10 WRN-40-4, two seeds each way, and WRN-28-4 (Table 3's equal-size baseline).
    for seed, (orig, shared) in enumerate([(4.0, 5.0), (4.4, 5.6)]):
        make_run(
            root,
            f"w40-orig-{seed}",
            arch="wrn_40_4",
            dataset="cifar10",
            share=False,
            seed=seed,
            params=8_949_210,
            final_top1=orig,
        )
        make_run(
            root,
            f"w40-share-{seed}",
            arch="wrn_40_4",
            dataset="cifar10",
            share=True,
            seed=seed,
            params=5_852_634,
            final_top1=shared,
        )
    make_run(root, "w28-4", arch="wrn_28_4", dataset="cifar10", share=False, seed=0, params=5_849_050, final_top1=4.9)
    # ImageNet ResNet-50, with top-5, from the other recipe.
    make_run(
        root,
        "imnet/r50",
        arch="resnet50",
        dataset="imagenet",
        share=False,
        seed=0,
        params=25_557_032,
        final_top1=24.5,
        final_top5=7.5,
        recipe="imagenet",
    )
    make_run(
        root,
        "imnet/r50s",
        arch="resnet50",
        dataset="imagenet",
        share=True,
        seed=0,
        params=20_469_800,
        final_top1=25.0,
        final_top5=7.9,
        recipe="imagenet",
        policy="imagenet",
    )
    # A set the paper does not have, and a run that did not finish.
    make_run(root, "digits/s", arch="wrn_28_1", dataset="digits", share=True, seed=0, params=272_730, final_top1=2.0)
    make_run(root, "digits/o", arch="wrn_28_1", dataset="digits", share=False, seed=0, params=369_498, final_top1=1.5)
    make_run(
        root,
        "unfinished",
        arch="wrn_28_1",
        dataset="digits",
        share=True,
        seed=1,
        params=272_730,
        final_top1=50.0,
        done=1,
    )
    return root


def test_model_names_follow_the_paper():
    assert paper_model_name("wrn_28_10") == "WRN-28-10"
    assert paper_model_name("preact_resnet164") == "ResNet-164"
    assert paper_model_name("torchvision:resnet50") == "ResNet-50"
    assert paper_model_name("seresnext26d_32x4d") == "seresnext26d_32x4d"


def test_runs_are_grouped_over_seeds_and_paired(runs):
    report = build_report(find_runs([runs]))
    assert len(report.runs) == 10
    t2 = {(e.original.config.dataset, e.original.config.arch): e for e in report.table2}
    assert set(t2) == {("cifar10", "wrn_40_4"), ("imagenet", "resnet50"), ("digits", "wrn_28_1")}

    w40 = t2["cifar10", "wrn_40_4"]
    assert w40.original.top1.values == (4.0, 4.4) and w40.shared.top1.values == (5.0, 5.6)
    assert w40.shared.top1.mean == pytest.approx(5.3)
    assert w40.shared.top1.std == pytest.approx(statistics.stdev([5.0, 5.6]))
    assert w40.top1_diff == pytest.approx(5.3 - 4.2)
    assert w40.decrease_pct == pytest.approx(100 * (1 - 5_852_634 / 8_949_210))
    assert (w40.paper.top1_original, w40.paper.top1_shared) == (4.17, 5.1)

    r50 = t2["imagenet", "resnet50"]
    assert r50.top5_diff == pytest.approx(0.4)
    assert (r50.paper.top5_original, r50.paper.top5_shared) == (7.02, 7.41)
    assert t2["digits", "wrn_28_1"].paper is None
    # The unfinished run is left out: the digits shared result has one seed, not two.
    assert t2["digits", "wrn_28_1"].shared.top1.n == 1

    (t3,) = report.table3
    assert (t3.shared.config.arch, t3.baseline.config.arch) == ("wrn_40_4", "wrn_28_4")
    assert (t3.paper_shared.accuracy, t3.paper_baseline.accuracy) == (94.9, 95.0)


def test_report_files_carry_the_papers_numbers_beside_the_measured_ones(runs, tmp_path):
    out = tmp_path / "report"
    write_report([runs], out)
    md = (out / "report.md").read_text()
    # Table 2, WRN-40-4 on CIFAR-10: measured 4.20 ± 0.28 against 5.30 ± 0.42; the paper 4.17 -> 5.10.
    w40 = next(line for line in md.splitlines() if "| CIFAR-10 | WRN-40-4 |" in line)
    assert "8,949,210 → 5,852,634" in w40 and "34.6%" in w40
    assert "4.20 ± 0.28" in w40 and "5.30 ± 0.42" in w40 and "+1.10" in w40
    assert "4.17 → 5.10 (+0.93)" in w40
    r50 = next(line for line in md.splitlines() if "| ImageNet | ResNet-50 |" in line)
    assert "24.01 → 24.61 (+0.60)" in r50 and "7.02 → 7.41 (+0.39)" in r50
    digits = next(line for line in md.splitlines() if "| digits | WRN-28-1 |" in line)
    cells = [c.strip() for c in digits.strip().strip("|").split("|")]
    assert cells[9] == cells[-1] == "—"  # no paper figure for this set, top-1 or top-5
    # Table 3: WRN-40-4 Share beside WRN-28-4, with the paper's 5.85 M and errors 5.10 / 5.00.
    assert "| CIFAR-10 | WRN-40-4 Share | 5,852,634 | 5.30 ± 0.42 | WRN-40-4 Share | 5.85 M | 5.10 |" in md
    assert "| CIFAR-10 | WRN-28-4 | 5,849,050 | 4.90 | WRN-28-4 | 5.85 M | 5.00 |" in md
    assert "unfinished`: 1/3 epochs" in md

    data = json.loads((out / "report.json").read_text())
    w40_json = next(e for e in data["table2"] if e["model"] == "WRN-40-4")
    assert w40_json["paper"]["top1_original"] == 4.17 and w40_json["paper"]["top1_diff"] == 0.93
    assert w40_json["shared"]["top1_err"]["values"] == [5.0, 5.6]
    assert data["table3"][0]["paper_baseline"]["top1_err"] == 5.0
    assert data["unfinished"] == [{"path": str(runs / "unfinished"), "epochs_done": 1, "epochs": 3}]
    assert set(data["figures"].values()) == {FIGURE4_FILE, FIGURE5_FILE}


def test_figures_are_drawn_from_the_runs(runs, tmp_path):
    report = build_report(find_runs([runs]))
    fig5, fig4 = figure5(report.results), figure4(report.table2)

    # Figure 5: one panel per dataset; in each, one measured curve per architecture through its settings, ordered
    # by parameters (millions), at the mean final top-1 error with the seeds' standard deviation as error bars.
    panels = {ax.get_title(): ax for ax in fig5.axes}
    assert set(panels) == {"CIFAR-10", "ImageNet", "digits"}
    measured = {c.get_label(): c for c in panels["CIFAR-10"].containers}
    assert set(measured) == {"WRN-40-4 (measured)", "WRN-28-4 (measured)"}
    line, _, (bars,) = measured["WRN-40-4 (measured)"]
    assert list(line.get_xdata()) == pytest.approx([5.852634, 8.949210])
    assert list(line.get_ydata()) == pytest.approx([5.3, 4.2])  # shared (5.0, 5.6), original (4.0, 4.4)
    spans = [seg[1][1] - seg[0][1] for seg in bars.get_segments()]  # each bar: mean - std .. mean + std
    assert spans == pytest.approx([2 * statistics.stdev([5.0, 5.6]), 2 * statistics.stdev([4.0, 4.4])])
    (line28, *_) = measured["WRN-28-4 (measured)"]
    assert (list(line28.get_xdata()), list(line28.get_ydata())) == (pytest.approx([5.84905]), pytest.approx([4.9]))
    # The paper's points, hollow on dashed lines, where it has the dataset; none for digits.
    paper = {ln.get_label(): ln for ln in panels["CIFAR-10"].lines if "(paper)" in ln.get_label()}
    assert set(paper) == {"ResNet (paper)", "ShaResNet (paper)"}
    assert all(ln.get_markerfacecolor() == "none" and ln.get_linestyle() == "--" for ln in paper.values())
    assert (5.85, 5.1) in zip(paper["ShaResNet (paper)"].get_xdata(), paper["ShaResNet (paper)"].get_ydata())
    assert not [ln for ln in panels["digits"].lines if "(paper)" in ln.get_label()]

    # Figure 4: a row per original/shared pair, loss (left) and test accuracy (right): the seeds' mean per epoch,
    # in the paper's colours, with a min-max band where there are several seeds.
    rows = {ax.get_title(): ax for ax in fig4.axes}
    assert len(fig4.axes) == 2 * 3
    loss, acc = rows["WRN-40-4, CIFAR-10: training loss"], rows["WRN-40-4, CIFAR-10: test accuracy"]
    curves = {ln.get_label(): ln for ln in loss.lines}
    assert set(curves) == {"WRN-40-4 (n=2)", "WRN-40-4 Share (n=2)"}
    assert list(curves["WRN-40-4 (n=2)"].get_xdata()) == [1, 2, 3]
    assert list(curves["WRN-40-4 (n=2)"].get_ydata()) == pytest.approx([2.0, 1.0, 2.0 / 3])
    assert curves["WRN-40-4 (n=2)"].get_color() == "tab:blue"
    assert curves["WRN-40-4 Share (n=2)"].get_color() == "tab:green"
    accuracy = {ln.get_label(): list(ln.get_ydata()) for ln in acc.lines}
    # Shared seeds end at 5.0 and 5.6, 10 points higher an epoch earlier: accuracy = 100 - mean error.
    assert accuracy["WRN-40-4 Share (n=2)"] == pytest.approx([100 - 25.3, 100 - 15.3, 100 - 5.3])
    assert len(acc.collections) == 2  # the two bands
    assert len(rows["WRN-28-1, digits: test accuracy"].collections) == 0  # one seed each: no band

    write_report([runs], tmp_path / "report")  # and the files are those figures
    assert matplotlib.image.imread(tmp_path / "report" / FIGURE5_FILE).shape[1] > 0
    assert (tmp_path / "report" / FIGURE4_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_leaves_the_matplotlib_backend_alone(runs, tmp_path):
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        write_report([runs / "digits"], tmp_path / "out")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "out" / FIGURE4_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_rewrite_keeps_the_old_report(runs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_report([runs / "digits"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A text that cannot be encoded fails half-way through writing report.md.
    monkeypatch.setattr(Report, "markdown", lambda self: "# report\n\ud800")
    with pytest.raises(UnicodeEncodeError):
        write_report([runs / "digits"], out)
    assert (out / "report.md").read_bytes() == before["report.md"]
    assert {p.name for p in out.iterdir()} == set(before)  # no temporary file left either


def test_only_figure5_without_a_pair(tmp_path):
    make_run(tmp_path / "runs", "a", arch="wrn_28_1", dataset="digits", share=True, seed=0, params=1, final_top1=3)
    report = write_report([tmp_path / "runs"], tmp_path / "out")
    assert report.table2 == [] and (tmp_path / "out" / FIGURE5_FILE).exists()
    assert not (tmp_path / "out" / FIGURE4_FILE).exists()
    assert "No architecture was trained both shared and original." in (tmp_path / "out" / "report.md").read_text()


def test_an_epoch_logged_twice_after_resume_counts_once(tmp_path):
    path = make_run(tmp_path, "r", arch="wrn_28_1", dataset="digits", share=True, seed=0, params=1, final_top1=3)
    lines = (path / METRICS_FILE).read_text().splitlines()
    repeated = json.loads(lines[1]) | {"val_top1_err": 7.0}
    (path / METRICS_FILE).write_text("\n".join(lines[:2] + [json.dumps(repeated)] + lines[2:]) + "\n")
    run = load_run(path)
    assert [m["epoch"] for m in run.metrics] == [1, 2, 3]
    assert run.metrics[1]["val_top1_err"] == 7.0 and run.complete


def test_bad_run_directories_are_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="no run directories") as e:
        find_runs([tmp_path])
    assert isinstance(e.value, ShareError)
    with pytest.raises(ReportError, match="not a directory"):
        find_runs([tmp_path / "absent"])
    path = make_run(tmp_path, "r", arch="wrn_28_1", dataset="digits", share=True, seed=0, params=1, final_top1=3)
    (path / METRICS_FILE).write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(ReportError, match="metrics.jsonl:2"):
        load_run(path)
    (path / RUN_FILE).write_text('{"arch": "x"}')
    with pytest.raises(ReportError, match="lacks dataset, share, epochs, unique_params"):
        load_run(path)


def _load_reproduce():
    spec = importlib.util.spec_from_file_location(
        "reproduce", Path(__file__).resolve().parents[1] / "recipes" / "reproduce.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_prints_every_paper_run_and_writes_the_report(runs, tmp_path, capsys):
    reproduce = _load_reproduce()
    parser = reproduce.get_args_parser()
    reproduce.main(parser.parse_args(["--commands", "--data", "/d", "--seeds", "0", "1"]))
    commands = capsys.readouterr().out.splitlines()
    # Table 1's seven pairs and Table 3's three equal-size baselines, per seed.
    assert len(commands) == 2 * (7 * 2 + 3)
    assert (
        "python recipes/train_cifar.py --dataset cifar100 --data /d --arch wrn_28_10 --share --seed 1 "
        "--output runs/cifar100/wrn_28_10-shared-seed1" in commands
    )
    assert any(
        c.startswith("python recipes/train_imagenet.py") and "--arch resnet152 --no-share" in c for c in commands
    )
    assert sum("--arch preact_resnet92 --no-share" in c for c in commands) == 2

    reproduce.main(parser.parse_args([str(runs), "--out", str(tmp_path / "out")]))
    assert "4.17 → 5.10 (+0.93)" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.md", "report.json", FIGURE4_FILE, FIGURE5_FILE}


def test_runs_group_by_their_sharing_options(tmp_path):
    common = {"arch": "wrn_28_1", "dataset": "digits", "share": True, "params": 1}
    for seed in (0, 1):
        make_run(tmp_path, f"paper{seed}", **common, seed=seed, final_top1=3 + seed)
        make_run(tmp_path, f"g2-{seed}", **common, seed=seed, final_top1=5, sharing={"group_size": 2, "scope": None})
        make_run(tmp_path, f"soft{seed}", **common, seed=seed, final_top1=7, policy="swrn", sharing={"templates": 2})
    report = write_report([tmp_path], tmp_path / "out")
    by_label = {r.label: r for r in report.results}
    assert set(by_label) == {"WRN-28-1 Share", "WRN-28-1 Share (group size 2)", "WRN-28-1 Share (swrn, 2 templates)"}
    assert by_label["WRN-28-1 Share"].top1.values == (3.0, 4.0)
    assert by_label["WRN-28-1 Share (swrn, 2 templates)"].seeds == [0, 1]
    assert {r["sharing"] for r in report.to_json()["results"]} == {"", "group size 2", "2 templates"}


def test_runs_with_a_held_out_split_report_the_test_set_and_say_what_chose_the_best(tmp_path):
    common = {"arch": "wrn_28_1", "dataset": "digits", "params": 1}
    make_run(tmp_path, "old", **common, share=False, seed=0, final_top1=4.0)  # before --val-split existed
    make_run(tmp_path, "split", **common, share=True, seed=0, final_top1=3.0, val_split=100)
    make_run(tmp_path, "untested", **common, share=True, seed=1, final_top1=9.0, val_split=100, tested=False)
    make_run(tmp_path, "none", **common, share=True, seed=2, final_top1=6.0, val_split=0)
    report = write_report([tmp_path], tmp_path / "out")
    runs = {r.path.name: r for r in report.runs}
    assert runs["split"].final_test() == 3.0 and runs["split"].final["val_top1_err"] == 4.0
    assert runs["old"].final_test() == 4.0 and runs["none"].final_test() == 6.0
    # The split run's error in the tables is its test error, not the split's; the untested one waits.
    by_label = {r.label: r for r in report.results}
    assert by_label["WRN-28-1 Share"].top1.values == (3.0, 6.0)
    assert by_label["WRN-28-1 Share"].best_chosen_on == "a held-out split of 100 training images; the test set"
    assert not runs["untested"].complete
    md = (tmp_path / "out" / "report.md").read_text()
    assert "* a held-out split of 100 training images: 2 runs (the test set evaluated once" in md
    assert "* the test set: 2 runs (an optimistic choice" in md
    assert "untested`: 3/3 epochs, the test set not yet evaluated (--resume evaluates it)" in md
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["best_chosen_on"][str(tmp_path / "split")] == "a held-out split of 100 training images"
