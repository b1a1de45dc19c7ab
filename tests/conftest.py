"""Root conftest: loads the sockpolicy test harness (tests/_harness.py) as a pytest plugin.

The harness provides the ``privileged`` gating (skip, or fail under SOCKPOLICY_REQUIRE_PRIVILEGED=1),
the fd-leak check around privileged tests, and the fixtures ``netns``, ``make_netns``, ``veth_pair``
and ``make_veth_pair``. See docs/testing.md.
"""

from __future__ import annotations

import _harness
import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.is_registered(_harness):
        config.pluginmanager.register(_harness, "sockpolicy-harness")
