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
from test_splice_cli import (
    EchoUpstream,
    Serves,
    Stream,
    connect,
    exchange,
    fds_of,
    gone,
    pattern,
    serve_args,
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


def no_cgroups_left(*texts: str) -> None:
    """Every splice cgroup the serves used (``splice: enabled (cgroup PATH)``) is gone once all stopped:
    each was removed by the last process to use it, none left behind by a handoff."""
    paths = {Path(p) for text in texts for p in re.findall(r"splice: enabled \(cgroup (\S+)\)", text)}
    assert paths, texts
    assert [p for p in paths if p.exists()] == []


def children(pid: int) -> list[int]:
    """The worker pids of a ``serve --workers`` parent, in fork order."""
    return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def held(pid: int) -> tuple[list[str], int]:
    """What a process holds: its fds, and how many BPF maps it has mmapped (an mmap keeps a map alive)."""
    mapped = sum(1 for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "bpf-map" in line)
    return fds_of(pid), mapped


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
    serves = Serves(netns)
    old = serves.start(old_log, *args)
    streams: list[Stream] = []
    try:
        wait_for("the old workers", lambda: serving(old_log, 2))
        old_workers = children(old.pid)
        assert len(old_workers) == 2
        baseline = [held(pid) for pid in [old.pid, *old_workers]]
        streams = spread_streams(netns, old_workers, per_worker=2, seed=20)
        for stream in streams:
            stream.progress(0.2)
        new = serves.start(new_log, *args, command="reload")
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
        # No fd or mmap leak: the successor's processes hold what the old ones held before the connections
        # (the parent: every worker's maps; a worker: its own only).
        wait_for(
            "the successor's fds",
            lambda: [held(pid) for pid in [new.pid, *new_workers]] == baseline,
            timeout=5,
        )
        assert new.poll() is None
    finally:
        for stream in streams:
            stream.sock.close()
        serves.stop()
    old_text, new_text = serves.check()
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
    no_cgroups_left(old_text, new_text)


SINGLE_LINE = re.compile(
    r"splice: (\d+) connections spliced \(\d+ bytes\), (\d+) relayed in userspace; (\d+) adopted, "
    r"(\d+) handed over; (left in the maps: socks=\d+ slot_of=\d+ owners=\d+ claimed=\d+)"
)


def final_lines(text: str) -> list[tuple[int, int, str, int, int]]:
    """The last splice line of every splicer of a serve, single-process or worker, as :func:`worker_lines`."""
    single = [(int(a), int(b), left, int(c), int(d)) for a, b, c, d, left in SINGLE_LINE.findall(text)]
    return single + worker_lines(text)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (3, 2)])
def test_reload_changing_the_worker_count_carries_the_spliced_connections(
    netns: Any, upstream: EchoUpstream, tmp_path: Path, before: int, after: int
) -> None:
    """A splicing reload that changes the worker count: every spliced connection still moves (any process
    can run a group of maps), each predecessor cgroup's SOCK_OPS link goes to the successor's splicer of
    the same cgroup if there is one, and what cannot be carried over is said in one warning line each:
    the links of cgroups nobody here enrols, and the adopted listening sockets of such cgroups, whose
    connections are relayed in userspace (still byte-exact).  Nothing is enrolled twice or left behind."""
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    common = ("--drain-timeout", "60")
    serves = Serves(netns)
    old = serves.start(old_log, *serve_args(upstream, "--workers", str(before), *common))
    streams: list[Stream] = []
    try:
        wait_for("the old serve", lambda: serving(old_log, before))
        workers = children(old.pid) if before > 1 else [old.pid]
        streams = spread_streams(netns, workers, per_worker=1, seed=40)
        new = serves.start(new_log, *serve_args(upstream, "--workers", str(after), *common), command="reload")
        wait_for("the successor", lambda: serving(new_log, after))
        old.wait(timeout=20)  # everything was handed over: nothing left to drain
        assert f"handed {len(streams)} spliced connections to pid {new.pid}" in old_log.read_text()
        for stream in streams:
            stream.progress(0.5)
        for stream in streams:
            stream.finish()
            stream.sock.close()
        for seed in range(50, 56):
            data = pattern(seed, 256 << 10)
            with connect(netns) as sock:
                assert exchange(sock, data, end=True) == data
        wait_for(
            "the adopted maps to be released",
            lambda: new_log.read_text().count("released the splice maps adopted from pid") == before,
        )
        assert new.poll() is None
    finally:
        for stream in streams:
            stream.sock.close()
        serves.stop()
    old_text, new_text = serves.check()
    base = re.search(r"sockpolicy-splice-(\d+-default)", new_text)
    assert base, new_text
    names = [f"{base.group(1)}-w{i}" for i in range(before)] if before > 1 else [base.group(1)]
    ours = [f"{base.group(1)}-w{i}" for i in range(after)] if after > 1 else [base.group(1)]
    taken, dropped = [n for n in names if n in ours], [n for n in names if n not in ours]
    assert new_text.count("took over the SOCK_OPS attachment of cgroup") == len(taken), new_text
    warnings = [line for line in new_text.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, warnings
    assert f"the SOCK_OPS attachment of cgroup {', '.join(dropped)} is not carried over" in warnings[0]
    assert f"{len(dropped)} of the {before} listening sockets adopted from pid {old.pid}" in warnings[1]
    lines = final_lines(new_text)
    assert len(lines) == after, new_text
    assert all(line[2] == LEFT for line in lines), lines
    assert sum(line[3] for line in lines) == len(streams), lines  # adopted
    assert sum(line[0] + line[1] for line in lines) == 6, lines  # the new connections
    no_cgroups_left(old_text, new_text)  # also those of the predecessor that the successor did not use


def test_spliced_connections_through_two_reloads_with_workers(
    netns: Any, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """Two reloads of ``--workers 2 --splice``: the second successor gets, from each worker, the maps that
    worker adopted in the first restart as well as its own, and the connections spliced in the first
    process still move (their slots are in the first process's maps), byte-exact to the end."""
    logs = [tmp_path / f"serve{i}.log" for i in range(3)]
    args = serve_args(upstream, "--workers", "2", "--drain-timeout", "60")
    serves = Serves(netns)
    procs = [serves.start(logs[0], *args)]
    streams: list[Stream] = []
    try:
        wait_for("the first serve", lambda: serving(logs[0], 2))
        streams = spread_streams(netns, children(procs[0].pid), per_worker=1, seed=60)
        for i in (1, 2):
            procs.append(serves.start(logs[i], *args, command="reload"))
            wait_for(f"successor {i}", lambda i=i: serving(logs[i], 2))
            procs[i - 1].wait(timeout=20)
            text = logs[i - 1].read_text()
            assert f"handed {len(streams)} spliced connections to pid {procs[i].pid}" in text, text
            for stream in streams:
                stream.progress(0.5)
        for stream in streams:
            stream.finish()
            stream.sock.close()
        # Each worker of the last serve releases the two groups of maps it adopted.
        wait_for(
            "the adopted maps to be released",
            lambda: logs[2].read_text().count("released the splice maps adopted from pid") == 4,
        )
    finally:
        for stream in streams:
            stream.sock.close()
        serves.stop()
    texts = serves.check()
    lines = worker_lines(texts[2])
    assert len(lines) == 2, texts[2]
    assert all(line[2] == LEFT for line in lines), lines
    assert sum(line[3] for line in lines) == len(streams), lines
    assert "WARNING" not in texts[1] + texts[2], texts
    no_cgroups_left(*texts)


def test_sigterm_then_serve_with_workers_takes_the_links_of_exited_workers(
    netns: Any, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """SIGTERM, then a new ``serve`` within the handoff window: the old workers had nothing to drain and
    have exited, but their parent still holds their SOCK_OPS links and maps, so the successor's workers
    take the links over (no second program on the cgroups) and splice what the adopted listeners accept."""
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    args = serve_args(upstream, "--workers", "2")
    serves = Serves(netns)
    old = serves.start(old_log, *args, "--handoff-timeout", "30")
    try:
        wait_for("the old workers", lambda: serving(old_log, 2))
        workers = children(old.pid)
        with connect(netns) as sock:
            assert exchange(sock, b"x" * 1000, end=True) == b"x" * 1000
        old.terminate()
        wait_for("the old workers to exit", lambda: all(gone(pid) for pid in workers))
        assert old.poll() is None  # the parent offers the sockets for --handoff-timeout
        serves.start(new_log, *args)
        wait_for("the successor's workers", lambda: serving(new_log, 2))
        old.wait(timeout=20)
        for seed in range(70, 76):
            data = pattern(seed, 256 << 10)
            with connect(netns) as sock:
                assert exchange(sock, data, end=True) == data
    finally:
        serves.stop()
    old_text, new_text = serves.check()
    assert len(re.findall(r"splice: worker \d has exited", old_text)) == 2, old_text
    assert new_text.count("took over the SOCK_OPS attachment of cgroup") == 2, new_text
    assert "WARNING" not in new_text, new_text
    lines = worker_lines(new_text)
    assert len(lines) == 2, new_text
    assert all(line[2] == LEFT for line in lines), lines
    assert sum(line[0] for line in lines) == 6 and sum(line[1] for line in lines) == 0, lines
    no_cgroups_left(old_text, new_text)


def test_reload_from_a_serve_without_splice_into_workers(
    netns: Any, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """``--workers 2`` without ``--splice`` reloaded into ``--workers 2 --splice``: nothing splice-related
    to take; the adopted listening sockets were created outside any splice cgroup, which one warning
    says, and every worker gets a socket of its own cgroup beside them, so new connections work (those
    the kernel hashes to an old socket relayed in userspace, the others spliced)."""
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    args = serve_args(upstream, "--workers", "2")
    serves = Serves(netns)
    old = serves.start(old_log, *args[1:])  # without --splice
    try:
        wait_for("the old workers", lambda: serving(old_log, 2))
        serves.start(new_log, *args, command="reload")
        wait_for("the successor's workers", lambda: serving(new_log, 2))
        old.wait(timeout=20)
        for seed in range(80, 92):
            data = pattern(seed, 64 << 10)
            with connect(netns) as sock:
                assert exchange(sock, data, end=True) == data
    finally:
        serves.stop()
    _old_text, new_text = serves.check()
    warnings = [line for line in new_text.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "2 of the 2 listening sockets adopted from pid" in warnings[0], warnings
    assert "(outside any splice cgroup)" in warnings[0], warnings
    assert "took over the SOCK_OPS attachment" not in new_text, new_text
    lines = worker_lines(new_text)
    assert len(lines) == 2 and all(line[2] == LEFT for line in lines), lines
    assert sum(line[0] + line[1] for line in lines) == 12, lines
    assert sum(line[0] for line in lines) > 0, lines  # the workers' own sockets splice
    no_cgroups_left(new_text)
