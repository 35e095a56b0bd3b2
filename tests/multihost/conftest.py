"""Multi-host tests need root (network namespaces); CI runs as root, so they run there."""

from __future__ import annotations

import pytest

from tests.multihost.netns import can_make_namespaces


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if can_make_namespaces():
        return
    skip = pytest.mark.skip(reason="network namespaces need root and iproute2")
    for item in items:
        if "multihost" in str(item.fspath):
            item.add_marker(skip)
