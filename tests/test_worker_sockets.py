"""Which worker serves which adopted listening socket after a restart (``_serve._socket_sets``).

Unprivileged: real loopback sockets, no BPF.  With ``--splice`` a listening socket must be served by the
worker whose splicer enrols the cgroup it was created in (the predecessor names it in the handoff);
the end-to-end tests in ``test_splice_restart_workers.py`` rely on it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from sockpolicy._handoff import Adopted
from sockpolicy._serve import ListenSockets, ServeConfig, _socket_sets, create_sockets

KEY = ("tcp", 4)


@pytest.fixture
def config() -> ServeConfig:
    return ServeConfig.from_cli(proto="tcp", addrs=["127.0.0.1/32"], workers=2)


@pytest.fixture
def channel() -> Iterator[socket.socket]:
    a, b = socket.socketpair()
    yield a
    a.close()
    b.close()


def predecessor(config: ServeConfig, count: int) -> list[socket.socket]:
    """``count`` listening sockets in one reuseport group, as a predecessor's workers have them."""
    first = create_sockets(config)
    socks = [first.socks[KEY]]
    for _ in range(count - 1):
        socks.append(create_sockets(config, like=first).socks[KEY])
    return socks


def adopt(
    config: ServeConfig, channel: socket.socket, socks: list[socket.socket], cgroups: list[str | None]
) -> Adopted:
    return Adopted(1, [(KEY, s) for s in socks], [], False, channel, cgroups=cgroups)


def served(sets: list[ListenSockets]) -> list[tuple[socket.socket, list[socket.socket]]]:
    """Per worker: its primary socket and its extra ones."""
    return [(s.socks[KEY], [sock for _, sock in s.extra]) for s in sets]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_adopted_sockets_go_to_the_worker_of_their_cgroup(
    config: ServeConfig, channel: socket.socket, order: list[int]
) -> None:
    """From 3 workers to 2: w0's and w1's sockets become the primaries of workers 0 and 1 whatever the
    order they arrive in (a predecessor that had extras offers them in its workers' order), w2's is an
    extra member, and no new socket is kept."""
    socks = predecessor(config, 3)
    names = ["x-w0", "x-w1", "x-w2"]
    adopted = adopt(config, channel, [socks[i] for i in order], [names[i] for i in order])
    sets = _socket_sets(config, adopted, cgroups=["x-w0", "x-w1"])
    try:
        (p0, e0), (p1, e1) = served(sets)
        assert (p0, p1) == (socks[0], socks[1])
        assert e0 + e1 == [socks[2]]
        assert {**sets[0].cgroup_of, **sets[1].cgroup_of} == dict(zip(socks, names, strict=True))
    finally:
        for s in sets:
            s.close()


def test_without_splice_adopted_sockets_fill_the_workers_first(
    config: ServeConfig, channel: socket.socket
) -> None:
    """No splice cgroups: the adopted sockets are spread in order and no new socket is needed."""
    socks = predecessor(config, 3)
    sets = _socket_sets(config, adopt(config, channel, socks, [None, None, None]))
    try:
        assert served(sets) == [(socks[0], [socks[2]]), (socks[1], [])]
        assert all(not s.cgroup_of for s in sets)
    finally:
        for s in sets:
            s.close()


def test_sockets_of_other_cgroups_are_extras_beside_new_ones(
    config: ServeConfig, channel: socket.socket
) -> None:
    """From a single splicing serve to 2 workers: its socket (of the label's own cgroup) is an extra, and
    each worker gets a new socket, recorded as created in its cgroup, in the same reuseport group."""
    (old,) = predecessor(config, 1)
    entered: list[int] = []
    sets = _socket_sets(
        config, adopt(config, channel, [old], ["x"]), before=entered.append, cgroups=["x-w0", "x-w1"]
    )
    try:
        (p0, e0), (p1, e1) = served(sets)
        assert old not in (p0, p1)
        assert e0 + e1 == [old]
        assert entered == [0, 1]
        assert sets[0].cgroup_of[p0] == "x-w0" and sets[1].cgroup_of[p1] == "x-w1"
        assert p0.getsockname() == p1.getsockname() == old.getsockname()
    finally:
        for s in sets:
            s.close()
