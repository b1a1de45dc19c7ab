"""Root conftest: loads the sockpolicy test harness (tests/_harness.py) as a pytest plugin.

The harness provides the ``privileged`` gating (skip, or fail under SOCKPOLICY_REQUIRE_PRIVILEGED=1),
the fd-leak check around privileged tests, and the fixtures ``netns``, ``make_netns``, ``veth_pair``
and ``make_veth_pair``. See docs/testing.md. ``enforcer`` (an unpinned kernel-rules
:class:`~sockpolicy.Enforcer`, closed after the test) is defined here.
"""

from __future__ import annotations

from collections.abc import Iterator

import _harness
import pytest

from sockpolicy import Enforcer


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.is_registered(_harness):
        config.pluginmanager.register(_harness, "sockpolicy-harness")


@pytest.fixture
def enforcer() -> Iterator[Enforcer]:
    e = Enforcer.create()
    try:
        yield e
    finally:
        e.close()
