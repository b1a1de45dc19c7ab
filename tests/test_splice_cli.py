"""``sockpolicy serve --splice`` end to end: the real command in a namespace, an echo upstream beside it.

The upstream is a threaded echo server on 127.0.0.1 (an ephemeral port, outside the steered 8000-8999);
clients dial 127.0.0.1:8080, which the dispatcher steers to the proxy.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _e2e import SCRIPT, in_ns, sockpolicy, stop

pytestmark = pytest.mark.privileged

SIZE = 4 << 20
PROXY = ("127.0.0.1", 8080)


def pattern(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


class EchoUpstream:
    """Echoes every connection until EOF, then half-closes."""

    def __init__(self, ns: Any) -> None:
        self.listener = ns.call(lambda: socket.create_server(("127.0.0.1", 0)))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.fixture
def upstream(netns: Any) -> Any:
    up = EchoUpstream(netns)
    yield up
    up.close()


def start(ns: Any, log: Path, *args: str, command: str = "serve") -> subprocess.Popen[str]:
    """``sockpolicy COMMAND ARGS`` in ``ns`` with stderr to ``log`` (readable while it runs)."""
    with log.open("w") as err:
        return subprocess.Popen(
            [*in_ns(ns), SCRIPT, command, *args], stdin=subprocess.DEVNULL, stdout=err, stderr=err, text=True
        )


def wait_for(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        time.sleep(0.1)


def connect(ns: Any) -> socket.socket:
    def go() -> socket.socket:
        deadline = time.monotonic() + 20
        while True:
            try:
                return socket.create_connection(PROXY, timeout=10)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    return ns.call(go)


def exchange(sock: socket.socket, data: bytes, *, end: bool) -> bytes:
    """Send ``data`` while reading the same amount back (both directions at once); with ``end``,
    half-close and read until EOF."""
    got = bytearray()
    error: list[BaseException] = []

    def reader() -> None:
        try:
            while len(got) < len(data) or end:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return
                got.extend(chunk)
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    sock.sendall(data)
    if end:
        sock.shutdown(socket.SHUT_WR)
    thread.join(30)
    assert not thread.is_alive(), "no reply within 30 s"
    if error:
        raise error[0]
    return bytes(got)


def metric(ns: Any, port: int, name: str) -> float:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    text = ns.call(get)
    match = re.search(rf'^{name}\{{label="default"\}} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


def serve_args(up: EchoUpstream, *extra: str) -> list[str]:
    return [
        "--splice",
        "--upstream",
        f"127.0.0.1:{up.port}",
        "--proto",
        "tcp",
        "--addr",
        "127.0.0.1/32",
        *extra,
    ]


def test_serve_splice_byte_exact_and_counted(netns: Any, upstream: EchoUpstream, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    proc = start(netns, log, *serve_args(upstream, "--metrics", "127.0.0.1:9464"))
    try:
        data = pattern(1)
        with connect(netns) as sock:
            assert exchange(sock, data, end=True) == data
        spliced = wait_for(
            "bytes_spliced", lambda: metric(netns, 9464, "sockpolicy_bytes_spliced_total"), timeout=10
        )
        assert 0 < spliced <= 2 * SIZE
        assert "splice: enabled" in log.read_text()
    finally:
        code, _ = stop(proc)
        sockpolicy(netns, "unload")
    text = log.read_text()
    assert code == 0, text
    assert re.search(r"splice: 1 connections spliced \([1-9]\d* bytes\), 0 relayed in userspace", text), text
    assert "Traceback" not in text


def test_serve_splice_forced_fallback(
    netns: Any, upstream: EchoUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOCKPOLICY_SPLICE_DISABLE", "all")
    log = tmp_path / "serve.log"
    proc = start(netns, log, *serve_args(upstream, "--metrics", "127.0.0.1:9464"))
    try:
        for seed in (2, 3):
            data = pattern(seed)
            with connect(netns) as sock:
                assert exchange(sock, data, end=True) == data
        assert metric(netns, 9464, "sockpolicy_bytes_spliced_total") == 0
    finally:
        code, _ = stop(proc)
        sockpolicy(netns, "unload")
    text = log.read_text()
    assert code == 0, text
    assert text.count("splice: unavailable (cgroup), serving in userspace") == 1, text
    assert "splice: enabled" not in text


def test_reload_splice_keeps_spliced_connection_during_drain(
    netns: Any, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """A spliced connection stays with the old process (its sockets are that process's fds): it keeps
    working, spliced, through the restart, until the old process's drain timeout ends it."""
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    args = serve_args(upstream, "--drain-timeout", "6")
    old = start(netns, old_log, *args)
    new = None
    try:
        kept = connect(netns)
        with kept:
            first = pattern(4, 1 << 20)
            assert exchange(kept, first, end=False) == first
            new = start(netns, new_log, *args, command="reload")
            wait_for("the successor", lambda: "serving 1 TCP" in new_log.read_text())
            # The old connection still works (the old process is draining), and is still spliced.
            second = pattern(5, 1 << 20)
            assert exchange(kept, second, end=False) == second
            # A new connection goes to the successor, on the adopted listener: relayed in userspace.
            data = pattern(6)
            with connect(netns) as sock:
                assert exchange(sock, data, end=True) == data
            # The drain timeout ends the old process, and with it the connection (its fds).
            old.wait(timeout=20)
            kept.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while kept.recv(1 << 16):
                    pass
        assert new.poll() is None
    finally:
        code, _ = stop(old)
        if new is not None:
            new_code, _ = stop(new)
        sockpolicy(netns, "unload")
    old_text, new_text = old_log.read_text(), new_log.read_text()
    assert code == 0, old_text
    assert new_code == 0, new_text
    assert re.search(r"splice: 1 connections spliced \([1-9]\d* bytes\)", old_text), old_text
    assert "listening sockets adopted from pid" in new_text, new_text
    assert re.search(r"splice: 0 connections spliced \(0 bytes\), 1 relayed in userspace", new_text), new_text
