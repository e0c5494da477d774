"""The paper's tables as data, and Tables 1 and 3 measured from the full-size models."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import timm
import torch

import share_transform as st
from share_transform import paper
from share_transform.paper import TABLE1, TABLE2, TABLE3, Table1Measurement, printed_as


class Counts(NamedTuple):
    params_before: int
    params_after: int
    spatial_convs_removed: int
    conv_weights_before: int  # distinct Conv2d weights
    conv_weights_after: int
    blocks_per_stage: tuple[int, ...]


def _shared_stage(blocks: int, width: int, kept: int) -> tuple[int, int]:
    """(parameters saved, spatial convs removed) when the last ``blocks - kept`` blocks of a stage share one
    ``width x width x 3 x 3`` weight."""
    members = blocks - kept
    return (members - 1) * 9 * width * width, members - 1


def imagenet_resnet(blocks: tuple[int, ...], bottleneck: bool, classes: int = 1000) -> Counts:
    """torchvision's ResNet-34/50/101/152 counted by hand, shared with policy "imagenet".

    Stem 7x7 conv 3->64 + BN; stage widths 64/128/256/512; a basic block is 3x3-BN-3x3-BN, a bottleneck
    1x1-BN-3x3-BN-1x1-BN expanding 4x; a 1x1 conv + BN projection where the block changes shape; a linear
    classifier with bias. Bottlenecks put stage 2-4 strides on their first block's 3x3, which keeps its weight.
    """
    params, convs, saved, removed = 3 * 64 * 49 + 2 * 64, 1, 0, 0
    c_in = 64
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        out = 4 * width if bottleneck else width
        for b in range(n):
            if bottleneck:
                params += c_in * width + 2 * width + 9 * width * width + 2 * width + width * out + 2 * out
                convs += 3
            else:
                params += 9 * c_in * width + 2 * width + 9 * width * width + 2 * width
                convs += 2
            if b == 0 and (stage > 0 or c_in != out):
                params += c_in * out + 2 * out
                convs += 1
            c_in = out
        stage_saved, stage_removed = _shared_stage(n, width, kept=1 if bottleneck and stage > 0 else 0)
        saved, removed = saved + stage_saved, removed + stage_removed
    params += c_in * classes + classes
    return Counts(params, params - saved, removed, convs, convs - removed, blocks)


def cifar_net(
    n: int, widths: tuple[int, ...], block: Callable[[int, int], tuple[int, int, int]], classes: int
) -> Counts:
    """The authors' CIFAR frame, shared with policy "cifar": stem 3x3 conv 3->16; stages of ``n`` pre-activation
    blocks, whose first block keeps its own spatial conv; final BN, linear. ``block(c_in, width)`` gives a block's
    (parameters, convs, output channels); the spatial conv is ``width x width x 3 x 3``."""
    params, convs, saved, removed = 3 * 16 * 9, 1, 0, 0
    c_in = 16
    for width in widths:
        for _ in range(n):
            block_params, block_convs, c_in = block(c_in, width)
            params, convs = params + block_params, convs + block_convs
        stage_saved, stage_removed = _shared_stage(n, width, kept=1)
        saved, removed = saved + stage_saved, removed + stage_removed
    params += 2 * c_in + c_in * classes + classes
    return Counts(params, params - saved, removed, convs, convs - removed, (n,) * len(widths))


def preact_bottleneck(c_in: int, width: int) -> tuple[int, int, int]:
    """BN-1x1-BN-3x3-BN-1x1 expanding 4x (each BN before its conv), a 1x1 projection where the shape changes
    (the first block of each stage)."""
    out = 4 * width
    params = 2 * c_in + c_in * width + 2 * width + 9 * width * width + 2 * width + width * out
    return (params + c_in * out, 4, out) if c_in != out else (params, 3, out)


def wide_basic(c_in: int, width: int) -> tuple[int, int, int]:
    """BN-3x3-BN-3x3, a 1x1 projection where the width changes."""
    params = 2 * c_in + 9 * c_in * width + 2 * width + 9 * width * width
    return (params + c_in * width, 3, width) if c_in != width else (params, 2, width)


def preact_resnet(depth: int, classes: int) -> Counts:
    """Pre-activation bottleneck ResNet-(9n+2): widths 16/32/64, outputs 64/128/256."""
    return cifar_net((depth - 2) // 9, (16, 32, 64), preact_bottleneck, classes)


def wide_resnet(depth: int, k: int, classes: int) -> Counts:
    """WRN-d-k: (d-4)/6 blocks per stage, widths 16k/32k/64k."""
    return cifar_net((depth - 4) // 6, (16 * k, 32 * k, 64 * k), wide_basic, classes)


# Table 1 in closed form, from each network's widths and blocks per stage: not from the code under test.
CLOSED_FORM = {
    "ResNet-164": preact_resnet(164, classes=10),
    "WRN-40-4": wide_resnet(40, 4, classes=10),
    "WRN-28-10": wide_resnet(28, 10, classes=100),
    "ResNet-34": imagenet_resnet((3, 4, 6, 3), bottleneck=False),
    "ResNet-50": imagenet_resnet((3, 4, 6, 3), bottleneck=True),
    "ResNet-101": imagenet_resnet((3, 4, 23, 3), bottleneck=True),
    "ResNet-152": imagenet_resnet((3, 8, 36, 3), bottleneck=True),
}


@pytest.fixture(scope="module")
def table1() -> dict[str, Table1Measurement]:
    return {m.row.model: m for m in paper.measure_table1()}


def test_table1_rows_in_paper_order(table1: dict[str, Table1Measurement]) -> None:
    assert list(table1) == list(CLOSED_FORM) == [r.model for r in TABLE1]


@pytest.mark.parametrize("model", list(CLOSED_FORM))
def test_table1_plan_matches_closed_form(table1: dict[str, Table1Measurement], model: str) -> None:
    m = table1[model]
    measured = Counts(
        m.params_before,
        m.params_after,
        m.spatial_convs_removed,
        m.conv_weights_before,
        m.conv_weights_after,
        m.blocks_per_stage,
    )
    assert measured == CLOSED_FORM[model]


@pytest.mark.parametrize("row", TABLE1, ids=[r.model for r in TABLE1])
def test_table1_apply_matches_closed_form(row: paper.Table1Row) -> None:
    expected = CLOSED_FORM[row.model]
    with torch.device("meta"):  # planned and tied on meta tensors: nothing allocated
        model = timm.create_model(row.arch, num_classes=row.num_classes)
    assert sum(p.numel() for p in model.parameters()) == expected.params_before
    st.apply(model, row.policy)
    assert st.count_parameters(model) == sum(p.numel() for p in model.parameters()) == expected.params_after
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(conv_weights) == expected.conv_weights_after


def test_table1_closed_form_is_the_papers() -> None:
    # The hand counts give the printed millions (rounded to the printed decimals) and decrease percentages
    # (rounded, except ResNet-34 and ResNet-101, which the paper truncates).
    for row in TABLE1:
        counts = CLOSED_FORM[row.model]
        scale = 10 ** (6 - row.decimals)
        assert round(counts.params_before / scale) == round(row.params_original * 10**row.decimals), row.model
        assert round(counts.params_after / scale) == round(row.params_shared * 10**row.decimals), row.model
        decrease = 100 * (counts.params_before - counts.params_after) / counts.params_before
        printed = int(decrease) if row.model in ("ResNet-34", "ResNet-101") else round(decrease)
        assert printed == row.decrease_pct, row.model


def test_table1_parameters_agree_rounded(table1: dict[str, Table1Measurement]) -> None:
    for m in table1.values():
        assert m.agrees, m.row.model
        assert m.params_before_printed_as == m.params_after_printed_as == "rounded", m.row.model


def test_table1_decrease_as_printed(table1: dict[str, Table1Measurement]) -> None:
    # The paper rounds its decrease column except for ResNet-34 (37.54% -> 37) and ResNet-101 (33.93% -> 33).
    how = {model: m.decrease_printed_as for model, m in table1.items()}
    assert {model for model, h in how.items() if h == "truncated"} == {"ResNet-34", "ResNet-101"}
    assert {model for model, h in how.items() if h == "rounded"} == set(table1) - {"ResNet-34", "ResNet-101"}
    assert round(table1["ResNet-152"].decrease_pct, 2) == 38.83


def test_table1_conv_numbers(table1: dict[str, Table1Measurement]) -> None:
    # Measured in the paper's sense: depth minus the spatial convs that lost their own weight.
    measured = {model: m.convs_shared for model, m in table1.items()}
    expected = {r.model: r.convs_original - CLOSED_FORM[r.model].spatial_convs_removed for r in TABLE1}
    assert measured == expected
    # Every row differs from the paper's column ...
    assert all(m.conv_number_differs for m in table1.values())
    assert all(expected[r.model] != r.convs_shared for r in TABLE1)
    # ... which is depth - sum(n_s - 1) for all rows but ResNet-34, where the paper prints 20, not 22.
    formula = {r.model: r.convs_original - sum(n - 1 for n in CLOSED_FORM[r.model].blocks_per_stage) for r in TABLE1}
    assert {model: m.convs_formula for model, m in table1.items()} == formula
    assert {r.model for r in TABLE1 if formula[r.model] == r.convs_shared} == set(table1) - {"ResNet-34"}
    assert formula["ResNet-34"] == expected["ResNet-34"] == 22 and table1["ResNet-34"].row.convs_shared == 20


def test_format_table1(table1: dict[str, Table1Measurement]) -> None:
    text = paper.format_table1(list(table1.values()))
    lines = text.splitlines()
    assert len(lines) == 2 + 7
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    row34 = next(line for line in lines if line.startswith("| ResNet-34 "))
    assert "21,797,672" in row34 and "13,613,864" in row34 and "21.8 M -> 13.6 M" in row34
    assert "yes (decrease truncated)" in row34 and "34 -> 22 / 20 (differs)" in row34
    assert "**no**" not in text


def test_table3_measured() -> None:
    measured = paper.measure_table3()
    params = {m.row.model: m.params for m in measured}
    assert params == {
        "ResNet-164 Share": 929_114,
        "ResNet-92": 961_370,
        "WRN-40-4 Share": 5_852_634,
        "WRN-28-4": 5_849_050,
        "WRN-28-10 Share": 26_860_084,
        "WRN-22-10": 26_855_604,
    }
    # WRN-22-10 is 26.856 M; the paper prints 26.85 M (truncated).
    how = {m.row.model: m.params_printed_as for m in measured}
    assert how == {model: "rounded" for model in params} | {"WRN-22-10": "truncated"}
    text = paper.format_table3(measured)
    assert len(text.splitlines()) == 2 + 6 and "yes (params truncated)" in text


def test_tables_consistent() -> None:
    shared_in_table1 = {r.arch: r.params_shared for r in TABLE1}
    for row in TABLE3:
        if row.policy is not None:
            assert shared_in_table1[row.arch] == row.params
    assert [r.model for r in TABLE2] == [r.model for r in TABLE1]


def test_table2_cifar_rows_agree_with_table3() -> None:
    # Table 2 prints its CIFAR rows as accuracies (stored as errors); Table 3 prints the shared nets' accuracy
    # again: 100 - top-1 error must give it back.
    arch = {r.model: r.arch for r in TABLE1}
    shared_accuracy = {r.arch: r.accuracy for r in TABLE3 if r.policy is not None}
    cifar = [r for r in TABLE2 if r.dataset in ("CIFAR-10", "CIFAR-100")]
    assert [r.model for r in cifar] == ["ResNet-164", "WRN-40-4", "WRN-28-10"]
    assert set(shared_accuracy) == {arch[r.model] for r in cifar}
    for row in cifar:
        assert round(100 - row.top1_shared, 2) == shared_accuracy[arch[row.model]], row.model
        assert row.top5_original is None and row.top5_shared is None


def test_table2_differences() -> None:
    rows = {r.model: r for r in TABLE2}
    assert rows["ResNet-152"].top1_diff == 0.07 and rows["ResNet-152"].top5_diff == -0.02
    assert rows["ResNet-34"].top1_diff == 1.52  # printed 0.52 in the paper
    assert rows["WRN-28-10"].top1_diff == 0.2 and rows["WRN-28-10"].top5_diff is None


@pytest.mark.parametrize(
    ("value", "printed", "decimals", "how"),
    [
        (37.544, 37, 0, "truncated"),
        (19.905, 20, 0, "rounded"),
        (19.905, 21, 0, None),
        (26.855604, 26.85, 2, "truncated"),
        (26.860084, 26.86, 2, "rounded"),
        (1.703258, 1.70, 2, "rounded"),
        (0.929114, 0.92, 2, "truncated"),
        (0.929114, 0.94, 2, None),
    ],
)
def test_printed_as(value: float, printed: float, decimals: int, how: str | None) -> None:
    assert printed_as(value, printed, decimals) == how
