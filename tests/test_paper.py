"""The paper's tables as data, and Tables 1 and 3 measured from the full-size models."""

from __future__ import annotations

import pytest

from share_transform import paper
from share_transform.paper import TABLE1, TABLE2, TABLE3, Table1Measurement, printed_as

# model -> (params before, after, spatial convs removed, distinct Conv2d weights before, after)
MEASURED_TABLE1 = {
    "ResNet-164": (1_703_258, 929_114, 48, 166, 118),
    "WRN-40-4": (8_949_210, 5_852_634, 12, 40, 28),
    "WRN-28-10": (36_536_884, 26_860_084, 6, 28, 22),
    "ResNet-34": (21_797_672, 13_613_864, 12, 36, 24),
    "ResNet-50": (25_557_032, 20_469_800, 9, 53, 44),
    "ResNet-101": (44_549_160, 29_434_920, 26, 104, 78),
    "ResNet-152": (60_192_808, 36_821_032, 43, 155, 112),
}


@pytest.fixture(scope="module")
def table1() -> dict[str, Table1Measurement]:
    return {m.row.model: m for m in paper.measure_table1()}


def test_table1_rows_in_paper_order(table1: dict[str, Table1Measurement]) -> None:
    assert list(table1) == list(MEASURED_TABLE1) == [r.model for r in TABLE1]


@pytest.mark.parametrize("model", list(MEASURED_TABLE1))
def test_table1_measured(table1: dict[str, Table1Measurement], model: str) -> None:
    m = table1[model]
    measured = (
        m.params_before,
        m.params_after,
        m.spatial_convs_removed,
        m.conv_weights_before,
        m.conv_weights_after,
    )
    assert measured == MEASURED_TABLE1[model]


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
    assert measured == {
        "ResNet-164": 116,
        "WRN-40-4": 28,
        "WRN-28-10": 22,
        "ResNet-34": 22,
        "ResNet-50": 41,
        "ResNet-101": 75,
        "ResNet-152": 109,
    }
    # Every row differs from the paper's column ...
    assert all(m.conv_number_differs for m in table1.values())
    # ... which is depth - sum(n_s - 1) for all rows but ResNet-34, where the paper prints 20, not 22.
    follows_formula = {model for model, m in table1.items() if m.convs_formula == m.row.convs_shared}
    assert follows_formula == set(table1) - {"ResNet-34"}
    assert table1["ResNet-34"].convs_formula == 22 and table1["ResNet-34"].row.convs_shared == 20


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
