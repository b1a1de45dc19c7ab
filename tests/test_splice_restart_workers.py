"""Restart of ``sockpolicy serve --splice --workers N``: the splicing state and the quiet spliced connections
move from every worker of the old serve to the worker of the successor that takes over its cgroup.

The real command in a namespace, with the threaded echo upstream of ``test_splice_cli``; clients dial
127.0.0.1:8080, which the dispatcher steers to the proxy's reuseport group.
"""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from _e2e import sockpolicy, stop
from test_splice_cli import (
    EchoUpstream,
    Stream,
    connect,
    exchange,
    fds_of,
    gone,
    pattern,
    serve_args,
    start,
    wait_for,
)

pytestmark = pytest.mark.privileged

LEFT = "left in the maps: socks=0 slot_of=0 owners=0 claimed=0"
WORKER_LINE = re.compile(
    r"splice: (\d+) connections spliced \(\d+ bytes\), (\d+) relayed in userspace \(worker\); "
    r"(left in the maps: [^;]*); (\d+) adopted, (\d+) handed over"
)


def worker_lines(text: str) -> list[tuple[int, int, str, int, int]]:
    """``(spliced, relayed, left in the maps, adopted, handed over)`` of each worker's last line."""
    return [(int(a), int(b), left, int(c), int(d)) for a, b, left, c, d in WORKER_LINE.findall(text)]


@pytest.fixture
def upstream(netns: Any) -> Any:
    up = EchoUpstream(netns)
    yield up
    up.close()


def children(pid: int) -> list[int]:
    """The worker pids of a ``serve --workers`` parent, in fork order."""
    return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def sockets_of(pid: int) -> int:
    return sum(1 for target in fds_of(pid) if target.startswith("socket:"))


def serving(log: Path, count: int) -> bool:
    return log.read_text().count("serving ") >= count


def spread_streams(ns: Any, workers: list[int], per_worker: int, seed: int) -> list[Stream]:
    """Spliced streams until every worker has ``per_worker`` of them (the kernel's reuseport hash picks
    the worker; each connection adds a client and an upstream socket to its worker's fds)."""
    streams: list[Stream] = []
    counts = dict.fromkeys(workers, 0)
    for attempt in range(40):
        if min(counts.values()) >= per_worker:
            break
        before = {pid: sockets_of(pid) for pid in workers}
        sock = connect(ns)
        stream = Stream(sock, seed=seed + attempt, rate=2e6)
        stream.progress(0.3)  # the worker has connected upstream: its socket count is final
        owner = [pid for pid in workers if sockets_of(pid) == before[pid] + 2]
        assert len(owner) == 1, (before, {pid: sockets_of(pid) for pid in workers})
        counts[owner[0]] += 1
        streams.append(stream)
    assert min(counts.values()) >= per_worker, counts
    return streams


def test_reload_with_workers_hands_spliced_connections_to_the_successor(
    netns: Any, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """``--workers 2 --splice`` reloaded into ``--workers 2 --splice`` with spliced connections streaming
    both ways in both workers: each old worker hands its quiet connections to its parent, which passes
    them on with both SOCK_OPS links and both workers' maps; the old serve exits long before its drain
    timeout, the connections stay byte-exact both ways through the successor's workers, EOF and RST still
    propagate, new connections on the adopted listeners are spliced by the successor, and at the end the
    maps are empty and the new processes hold exactly the fds the old ones held before the connections.
    """
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    args = serve_args(upstream, "--workers", "2", "--drain-timeout", "60")
    old = start(netns, old_log, *args)
    new = None
    streams: list[Stream] = []
    try:
        wait_for("the old workers", lambda: serving(old_log, 2))
        old_workers = children(old.pid)
        assert len(old_workers) == 2
        baseline = [fds_of(pid) for pid in [old.pid, *old_workers]]
        streams = spread_streams(netns, old_workers, per_worker=2, seed=20)
        for stream in streams:
            stream.progress(0.2)
        new = start(netns, new_log, *args, command="reload")
        wait_for("the successor's workers", lambda: serving(new_log, 2))
        old.wait(timeout=20)  # not the 60 s drain: nothing was left to drain
        assert gone(old.pid)
        old_text = old_log.read_text()
        assert f"handed {len(streams)} spliced connections to pid {new.pid}" in old_text, old_text
        new_workers = children(new.pid)
        assert len(new_workers) == 2
        # Still byte-exact both ways, through the successor's workers.
        for stream in streams:
            stream.progress(0.5)
        # An RST from a client reaches the upstream through the successor.
        doomed = streams.pop()
        doomed.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        doomed.sock.close()
        wait_for("the RST at the upstream", lambda: upstream.resets >= 1)
        # Half-close: the EOF reaches the upstream, whose EOF comes back after every byte.
        for stream in streams:
            stream.finish()
            stream.sock.close()
        # New connections, accepted by the successor on the adopted listeners: spliced by its workers.
        for seed in range(30, 38):
            data = pattern(seed, 256 << 10)
            with connect(netns) as sock:
                assert exchange(sock, data, end=True) == data
        wait_for(
            "both adopted groups of maps to be released",
            lambda: new_log.read_text().count("released the splice maps adopted from pid") == 2,
        )
        # No fd leak: the successor's processes hold what the old ones held before the connections.
        wait_for(
            "the successor's fds",
            lambda: [fds_of(pid) for pid in [new.pid, *new_workers]] == baseline,
            timeout=5,
        )
        assert new.poll() is None
    finally:
        for stream in streams:
            stream.sock.close()
        code, _ = stop(old)
        if new is not None:
            new_code, _ = stop(new)
        sockpolicy(netns, "unload")
    old_text, new_text = old_log.read_text(), new_log.read_text()
    assert code == 0, old_text
    assert new_code == 0, new_text
    assert new_text.count("took over the SOCK_OPS attachment of cgroup") == 2, new_text
    assert "not carried over" not in new_text and "relayed in userspace (docs" not in new_text, new_text
    assert f"adopted {len(streams) + 1} spliced connections from pid {old.pid}" in new_text, new_text
    old_lines = worker_lines(old_text)
    assert len(old_lines) == 2, old_text
    assert old_text.count("handed over (the successor has them)") == 2, old_text
    # Each old worker handed over all it had spliced (and counts no bytes: a connection's bytes are counted
    # where it ends); it left the maps to the successor.
    assert sum(line[4] for line in old_lines) == len(streams) + 1, old_lines
    assert all(line[0] == line[4] and line[1] == 0 for line in old_lines), old_lines
    new_lines = worker_lines(new_text)
    assert len(new_lines) == 2, new_text
    assert all(line[2] == LEFT for line in new_lines), new_lines
    assert sum(line[0] for line in new_lines) == 8, new_lines  # the new connections, all spliced
    assert sum(line[1] for line in new_lines) == 0, new_lines
    assert sum(line[3] for line in new_lines) == len(streams) + 1, new_lines
    assert "Traceback" not in old_text + new_text
