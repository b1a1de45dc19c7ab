"""Load and faults: 9000 concurrent connections, a steady connection rate with flat RSS, upstream faults.

Bounded: every test stops by itself (counts and timeouts are fixed).  Client and server run in separate
processes, so each stays below the 20000-fd hard limit; both raise their soft limit to the hard one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_ops import in_ns, log_of, scrape, start, stop, wait_serving
from test_restart import Load

pytestmark = pytest.mark.privileged

ARGS = ("--proto", "tcp", "--addr", "127.0.0.1", "--ports", "8000-8099", "--handoff-timeout", "0")

# Runs in its own process: opens N connections, checks an echo on each while all are open, holds them.
HOLD_CLIENT = textwrap.dedent(
    """
    import json, resource, selectors, socket, sys, time
    n = int(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, errors = [], []
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", 8000 + i % 100), timeout=10)
            s.sendall(b"%d;" % i)
            socks.append((i, s))
        except OSError as exc:
            errors.append(f"connect {i}: {exc!r}")
    ok = 0
    sel = selectors.DefaultSelector()
    pending = {}
    for i, s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        pending[i] = b""
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            i = key.data
            data = key.fileobj.recv(100)
            if not data:
                errors.append(f"eof {i}")
                sel.unregister(key.fileobj)
                pending.pop(i)
                continue
            pending[i] += data
            if pending[i] == b"%d;" % i:
                ok += 1
                sel.unregister(key.fileobj)
                pending.pop(i)
    errors += [f"no echo {i}" for i in pending]
    summary = {"ok": ok, "open": len(socks), "errors": errors[:10], "nerrors": len(errors)}
    print(json.dumps(summary), flush=True)
    sys.stdin.readline()  # hold every connection until the test has looked at the server
    for _, s in socks:
        s.close()
    """
)


def _status_value(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_9000_concurrent_connections(netns: Any, tmp_path: Path) -> None:
    n = 9000
    proc = start(netns, tmp_path, *ARGS, "--log-level", "warning")
    client = None
    try:
        wait_serving(netns, proc)
        client = subprocess.Popen(
            [*in_ns(netns), sys.executable, "-c", HOLD_CLIENT, str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        result = json.loads(client.stdout.readline())  # type: ignore[union-attr]
        assert result["nerrors"] == 0, result
        assert result["ok"] == n and result["open"] == n
        # All of them are open in the server at the same time (one fd per accepted connection).
        assert _fd_count(proc.pid) >= n
        assert proc.poll() is None, log_of(proc)
        client.stdin.write("\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        assert client.wait(timeout=60) == 0
        fds_after = lambda: _fd_count(proc.pid) < 100  # noqa: E731
        deadline = time.monotonic() + 30
        while not fds_after() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fds_after(), "the server did not release the connections"
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        assert stop(proc) == 0, log_of(proc)


def test_steady_rate_zero_errors_flat_rss(netns: Any, tmp_path: Path) -> None:
    # The 30 s version of this is bench/soak.py; the suite runs 5 s at 200 new connections/s.
    proc = start(netns, tmp_path, *ARGS, "--log-level", "warning")
    try:
        wait_serving(netns, proc)
        with Load(netns, rate=200) as load:
            time.sleep(1.0)  # warm-up: imports, first allocations
            rss_start = _status_value(proc.pid, "VmRSS")
            time.sleep(5.0)
            rss_end = _status_value(proc.pid, "VmRSS")
        assert load.errors == [], load.errors[:5]
        assert load.ok >= 5.5 * 200 * 0.9
        assert rss_end - rss_start < 4096, f"RSS grew by {rss_end - rss_start} KiB in 5 s"
    finally:
        assert stop(proc) == 0, log_of(proc)


def _expect_reset(netns: Any, port: int) -> float:
    def go() -> float:
        started = time.monotonic()
        # On loopback the proxy may accept and reset before connect() returns (which then fails), before
        # the send, or after it (recv fails): all of them are the reset.
        with (
            pytest.raises((ConnectionResetError, BrokenPipeError)),
            socket.create_connection(("127.0.0.1", port), timeout=10) as s,
        ):
            s.sendall(b"x")
            s.recv(10)
        return time.monotonic() - started

    return netns.call(go)


def test_upstream_refusing_resets_the_client_fast_and_counts(netns: Any, tmp_path: Path) -> None:
    # Nothing listens on 127.0.0.2:9 (outside the steered 127.0.0.1/32): every connect is refused.
    proc = start(netns, tmp_path, *ARGS, "--upstream", "127.0.0.2:9", "--metrics", "127.0.0.1:9464")
    try:
        wait_for_metrics(netns, proc)
        elapsed = [_expect_reset(netns, 8000 + i) for i in range(5)]
        assert max(elapsed) < 0.1, elapsed
        metrics = scrape(netns, 9464)
        assert metrics['sockpolicy_upstream_connect_failures_total{label="default",reason="refused"}'] == 5
        assert metrics['sockpolicy_connection_errors_total{label="default"}'] == 5
        assert "connect failed" in log_of(proc)
    finally:
        assert stop(proc) == 0, log_of(proc)


def test_upstream_hanging_hits_the_connect_timeout(netns: Any, tmp_path: Path) -> None:
    # A listener whose accept queue is full silently drops SYNs: connecting to it hangs.
    full = netns.socket()
    fillers: list[socket.socket] = []
    proc = None
    try:
        full.bind(("127.0.0.3", 7000))
        full.listen(0)
        for _ in range(2):
            filler = netns.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.3", 7000))
            fillers.append(filler)
        time.sleep(0.2)
        proc = start(netns, tmp_path, *ARGS, "--upstream", "127.0.0.3:7000", "--connect-timeout", "0.5",
                     "--metrics", "127.0.0.1:9464")  # fmt: skip
        wait_for_metrics(netns, proc)
        elapsed = _expect_reset(netns, 8000)
        assert 0.45 < elapsed < 2.0, elapsed
        metrics = scrape(netns, 9464)
        assert metrics['sockpolicy_upstream_connect_failures_total{label="default",reason="timeout"}'] == 1
        assert "connect timed out" in log_of(proc)
    finally:
        if proc is not None:
            assert stop(proc) == 0, log_of(proc)
        for s in [full, *fillers]:
            s.close()


def wait_for_metrics(netns: Any, proc: subprocess.Popen[str], port: int = 9464) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            scrape(netns, port)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no metrics endpoint:\n{log_of(proc)}") from None
            time.sleep(0.1)
