"""Shared pytest set-up: the opt-in slow marker, and skips for tests whose optional extra is not installed."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

#: ``@pytest.mark.needs("nvidia.dali", extra="dali")``: skip, naming the extra, where the module cannot be imported.
NEEDS = "needs"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run the slow full sweeps")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{NEEDS}(module, extra): the test imports an optional extra's module")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = None if config.getoption("--runslow") else pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if slow is not None and "slow" in item.keywords:
            item.add_marker(slow)
        for mark in item.iter_markers(NEEDS):
            module, extra = mark.args[0], mark.kwargs["extra"]
            if not _importable(module):
                item.add_marker(pytest.mark.skip(reason=f"needs {module}: pip install -e '.[{extra}]'"))


@pytest.fixture(autouse=True)
def _registries_as_they_were() -> Iterator[None]:
    """Whatever a test registers (a policy, a shape rule; the doctests of docs/api.md register one of each) is
    gone after it, so no test sees another's registrations."""
    from share_transform import policies, trace

    policies_before, rules_before = dict(policies.POLICIES), dict(trace._SHAPE_RULES)
    yield
    for registry, before in ((policies.POLICIES, policies_before), (trace._SHAPE_RULES, rules_before)):
        registry.clear()
        registry.update(before)
