"""``sockpolicy serve --splice`` end to end: the real command in a namespace, an echo upstream beside it.

The upstream is a threaded echo server on 127.0.0.1 (an ephemeral port, outside the steered 8000-8999);
clients dial 127.0.0.1:8080, which the dispatcher steers to the proxy.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import struct
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
    """Echoes every connection until EOF, then half-closes.  Counts connections ended by an RST."""

    def __init__(self, ns: Any) -> None:
        self.listener = ns.call(lambda: socket.create_server(("127.0.0.1", 0)))
        self.port = self.listener.getsockname()[1]
        self.resets = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except ConnectionResetError:
                self.resets += 1
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


class Serves:
    """The ``serve`` processes of one test in the order started (a serve and its successors), each
    logging to its own file.  :meth:`stop` (in the test's ``finally``) stops them all and unloads the
    steering; :meth:`check` then asserts that each exited 0 without a traceback and returns their logs."""

    def __init__(self, ns: Any) -> None:
        self.ns = ns
        self.procs: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        self.codes: list[int] = []

    def start(self, log: Path, *args: str, command: str = "serve") -> subprocess.Popen[str]:
        proc = start(self.ns, log, *args, command=command)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def stop(self) -> None:
        self.codes = [stop(proc)[0] for proc in self.procs]
        sockpolicy(self.ns, "unload")

    def check(self) -> list[str]:
        texts = [log.read_text() for log in self.logs]
        for code, text in zip(self.codes, texts, strict=True):
            assert code == 0, text
        assert "Traceback" not in "".join(texts), texts
        return texts


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


class Stream:
    """A client that streams a pattern through the proxy to the echo upstream, paced, and checks every
    byte it gets back (both directions move at once).  :meth:`finish` half-closes and reads to EOF.
    With ``limit``, the writer half-closes by itself after that many bytes."""

    CHUNK = 64 << 10
    PERIOD = (4 << 20) + 7  # the pattern repeats with a period that no chunk boundary lines up with

    def __init__(self, sock: socket.socket, seed: int, rate: float = 8e6, limit: int | None = None) -> None:
        self.sock = sock
        base = pattern(seed, self.PERIOD)
        self.data = base + base[: self.CHUNK + (1 << 16)]  # byte i of the stream is data[i % PERIOD]
        self.sent = 0
        self.got = 0
        self.eof = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.reading = threading.Event()  # cleared: the reader stops reading (a slow client)
        self.reading.set()
        self._rate = rate
        self._limit = limit
        self.write_closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader.start()
        self._writer.start()

    def _write(self) -> None:
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                size = self.CHUNK if self._limit is None else min(self.CHUNK, self._limit - self.sent)
                if not size:
                    self.sock.shutdown(socket.SHUT_WR)
                    self.write_closed.set()
                    return
                at = self.sent % self.PERIOD
                self.sock.sendall(self.data[at : at + size])
                self.sent += size
                ahead = self.sent / self._rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as exc:
            self.error = exc

    def _read(self) -> None:
        try:
            while self.reading.wait() and (chunk := self.sock.recv(1 << 16)):
                at = self.got % self.PERIOD
                if chunk != self.data[at : at + len(chunk)]:
                    raise AssertionError(f"stream corrupted at byte {self.got}")
                self.got += len(chunk)
            self.eof = True
        except BaseException as exc:
            self.error = exc

    def progress(self, seconds: float) -> None:
        """Both directions move for ``seconds`` (fails on an error)."""
        start = self.got
        time.sleep(seconds)
        assert self.error is None, self.error
        assert self.got > start, "no bytes came back"

    def finish(self) -> None:
        self._stop.set()
        self._writer.join(30)
        assert self.error is None, self.error
        if not self.write_closed.is_set():
            self.sock.shutdown(socket.SHUT_WR)
        self._reader.join(30)
        assert not self._reader.is_alive(), f"no EOF: {self.got} of {self.sent} bytes back"
        assert self.error is None, self.error
        assert self.eof and self.got == self.sent, (self.got, self.sent)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def fds_of(pid: int) -> list[str]:
    """What a process's fds point to (socket:[...], anon_inode:bpf-map, ...), sorted."""
    fd_dir = Path(f"/proc/{pid}/fd")
    out = []
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = re.sub(r"\[\d+\]$", "", os.readlink(fd))
            out.append("LOG" if target.endswith(".log") else target)  # each process has its own log
    return sorted(out)


def test_reload_hands_spliced_connections_to_the_successor(
    netns: Any, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """A reload with spliced connections streaming both ways: the old process hands them over and exits
    (long before its drain timeout), and they keep moving bytes, byte-exact, through the successor,
    which also propagates EOF and RST and frees everything afterwards."""
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    args = serve_args(upstream, "--drain-timeout", "60")
    serves = Serves(netns)
    old = serves.start(old_log, *args)
    kept = doomed = None
    try:
        wait_for("the old serve", lambda: "serving 1 TCP" in old_log.read_text())
        baseline = fds_of(old.pid)
        kept = connect(netns)
        stream = Stream(kept, seed=7)
        stream.progress(1.0)
        doomed = connect(netns)
        doomed_stream = Stream(doomed, seed=8, rate=1e6)
        doomed_stream.progress(1.0)
        new = serves.start(new_log, *args, command="reload")
        wait_for("the successor", lambda: "serving 1 TCP" in new_log.read_text())
        old.wait(timeout=20)  # not the 60 s drain: nothing was left to drain
        assert gone(old.pid)
        old_text = old_log.read_text()
        assert "handed 2 spliced connections to pid" in old_text, old_text
        # The connections outlived the process that accepted them, still byte-exact both ways.
        stream.progress(1.0)
        doomed_stream.progress(0.5)
        # An RST from the client reaches the upstream through the successor.
        doomed.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        doomed.close()
        wait_for("the RST at the upstream", lambda: upstream.resets >= 1)
        # Half-close: EOF reaches the upstream, whose EOF comes back after every byte.
        stream.finish()
        kept.close()
        # A new connection, accepted by the successor on the adopted listener: spliced.  (256 KiB, not
        # 4 MiB: full-speed 4 MiB exchanges stall in the kernel's redirect path about 1 in 8 times, also
        # without any restart; docs/splice.md, "What remains".)
        data = pattern(9, 256 << 10)
        with connect(netns) as sock:
            assert exchange(sock, data, end=True) == data
        wait_for(
            "the adopted maps to be released",
            lambda: "released the splice maps adopted from pid" in new_log.read_text(),
        )
        # No fd leak: the successor holds what the old process held before the connections.
        wait_for("the successor's fds", lambda: fds_of(new.pid) == baseline, timeout=5)
        assert new.poll() is None
    finally:
        for sock in (kept, doomed):
            if sock is not None:
                sock.close()
        serves.stop()
    old_text, new_text = serves.check()
    assert "took over the SOCK_OPS attachment of cgroup" in new_text, new_text
    assert "adopted 2 spliced connections from pid" in new_text, new_text
    # The bytes of a connection are counted where it ends: the old process counts none of the two.
    assert (
        "splice: 2 connections spliced (0 bytes), 0 relayed in userspace; 0 adopted, 2 handed over"
        in old_text
    )
    spliced = r"splice: 1 connections spliced \([1-9]\d* bytes\), 0 relayed in userspace; "
    left = "left in the maps: socks=0 slot_of=0 owners=0 claimed=0"
    assert re.search(spliced + "2 adopted, 0 handed over; " + left, new_text), new_text


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_hands_over_throttled_and_half_closed_connections(
    netns: Any, upstream: EchoUpstream, tmp_path: Path, workers: int
) -> None:
    """A reload while two clients do not read: the kernel has throttled both connections towards the
    client, so their relays hold peeked bytes and wait for the client's socket to take them; one client has
    also half-closed (its EOF already went to the upstream, whose echo is still queued).  Both move to the
    successor at once (the old process exits long before its 60 s drain) and end byte-exact, the
    half-closed one with its EOF after the last byte.  With ``--workers 2`` the workers' relays do the
    same, whichever worker each connection landed on."""
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    args = serve_args(upstream, "--drain-timeout", "60", "--log-level", "debug", "--workers", str(workers))
    serves = Serves(netns)
    old = serves.start(old_log, *args)
    socks: list[socket.socket] = []

    def ready(log: Path) -> bool:
        return log.read_text().count("serving 1 TCP") == workers

    try:
        wait_for("the old serve", lambda: ready(old_log))
        socks.append(connect(netns))
        busy = Stream(socks[-1], seed=21)
        busy.progress(1.0)
        socks.append(connect(netns))
        half = Stream(socks[-1], seed=22, rate=2e7, limit=20 << 20)  # then its FIN
        half.progress(0.5)
        streams = [busy, half]
        for stream in streams:
            stream.reading.clear()  # the echo's bytes pile up towards the clients: the kernel throttles
        assert half.write_closed.wait(10), "the half-closing client could not send its 20 MiB"
        time.sleep(2.0)
        new = serves.start(new_log, *args, command="reload")
        wait_for("the successor", lambda: ready(new_log))
        old.wait(timeout=20)  # not the 60 s drain
        old_text = old_log.read_text()
        assert f"handed 2 spliced connections to pid {new.pid}" in old_text, old_text
        # The relays were suspended with bytes in hand (not at a quiet moment), in both connections.
        assert len(re.findall(r"handed over holding to_client=[1-9]", old_text)) == 2, old_text
        for stream in streams:
            stream.reading.set()
        busy.progress(1.0)
        for stream in streams:
            stream.finish()
        for sock in socks:
            sock.close()
        wait_for(
            "the adopted maps to be released",
            lambda: new_log.read_text().count("released the splice maps adopted from pid") == workers,
        )
    finally:
        for sock in socks:
            sock.close()
        serves.stop()
    old_text, new_text = serves.check()
    assert "adopted 2 spliced connections from pid" in new_text, new_text
    # The slots' counters moved with the maps: the successor's end-of-connection lines show the throttles.
    assert re.search(r"throttles=[1-9]", new_text), new_text
    left = "left in the maps: socks=0 slot_of=0 owners=0 claimed=0"
    if workers == 1:
        adopted = re.findall(r"(\d+) adopted, 0 handed over; " + left, new_text)
    else:  # each worker's exit line
        adopted = re.findall(left + r"; (\d+) adopted, 0 handed over", new_text)
    assert len(adopted) == workers and sum(map(int, adopted)) == 2, new_text


def test_reload_under_load_refuses_nothing_and_splices_on_adopted_listeners(
    netns: Any, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """50 new connections per second through a reload: none refused or corrupted, and the successor
    splices what it accepts on the adopted listener.  The only fallbacks allowed are connections the old
    program enrolled while the SOCK_OPS link switched over, each with that reason logged."""
    from test_restart import Load

    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    args = serve_args(upstream)
    serves = Serves(netns)
    old = serves.start(old_log, *args)
    try:
        wait_for("the old serve", lambda: "serving 1 TCP" in old_log.read_text())
        with Load(netns, rate=50) as load:
            time.sleep(1.0)
            serves.start(new_log, *args, command="reload")
            wait_for("the successor", lambda: "serving 1 TCP" in new_log.read_text())
            old.wait(timeout=20)
            time.sleep(2.0)
        assert load.errors == [], load.errors[:5]
        assert load.ok > 100
        # Everything the old process enrolled is gone from its maps, which the successor then drops.
        wait_for(
            "the adopted maps to be released",
            lambda: "released the splice maps adopted from pid" in new_log.read_text(),
            timeout=10,
        )
    finally:
        serves.stop()
    _old_text, new_text = serves.check()
    match = re.search(
        r"splice: (\d+) connections spliced \(\d+ bytes\), (\d+) relayed in userspace", new_text
    )
    assert match, new_text
    spliced, relayed = int(match.group(1)), int(match.group(2))
    assert spliced >= 90, new_text  # about 2 s at 50/s after the switch
    assert relayed == new_text.count("established while the restart switched over"), new_text
    assert "left in the maps: socks=0 slot_of=0 owners=0 claimed=0" in new_text, new_text


def test_sigkill_then_serve_splices_again(netns: Any, upstream: EchoUpstream, tmp_path: Path) -> None:
    """A killed splicing serve leaves its (empty) cgroup behind; the next serve reuses it and splices."""
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(netns, first_log, *serve_args(upstream))
    second = None
    try:
        with connect(netns) as sock:
            assert exchange(sock, b"x" * 1000, end=True) == b"x" * 1000
        first.kill()
        first.wait(timeout=10)
        second = start(netns, second_log, *serve_args(upstream))
        data = pattern(10, 256 << 10)  # not 4 MiB: the redirect stall of docs/splice.md "What remains"
        with connect(netns) as sock:
            assert exchange(sock, data, end=True) == data
    finally:
        stop(first)
        if second is not None:
            code, _ = stop(second)
        sockpolicy(netns, "unload")
    text = second_log.read_text()
    assert code == 0, text
    assert "taking over the bindings of serve pid" in text, text
    assert re.search(r"splice: 1 connections spliced \([1-9]\d* bytes\), 0 relayed in userspace", text), text
    assert "left in the maps: socks=0 slot_of=0 owners=0 claimed=0" in text, text
    assert "Traceback" not in text


def test_reload_without_splice_leaves_spliced_connections_draining(
    netns: Any, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """A successor without --splice takes nothing splice-related: the old process keeps its spliced
    connection (working, spliced) until its drain timeout ends it, and stops enrolling new ones."""
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    args = serve_args(upstream, "--drain-timeout", "4")
    serves = Serves(netns)
    old = serves.start(old_log, *args)
    try:
        with connect(netns) as kept:
            first = pattern(4, 1 << 20)
            assert exchange(kept, first, end=False) == first
            new = serves.start(new_log, *args[1:], command="reload")  # without --splice
            wait_for("the successor", lambda: "serving 1 TCP" in new_log.read_text())
            second = pattern(5, 1 << 20)
            assert exchange(kept, second, end=False) == second
            time.sleep(0.5)  # the old process detaches its SOCK_OPS program within 50 ms of the handoff
            data = pattern(6)
            with connect(netns) as sock:
                assert exchange(sock, data, end=True) == data
            old.wait(timeout=20)  # the drain timeout ends the old process, and with it the connection
            kept.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while kept.recv(1 << 16):
                    pass
        assert new.poll() is None
    finally:
        serves.stop()
    old_text, new_text = serves.check()
    spliced = r"splice: 1 connections spliced \([1-9]\d* bytes\), 0 relayed in userspace; 0 adopted, 0 handed"
    assert re.search(spliced, old_text), old_text
    # The successor's connection was not enrolled in the old maps: its slot would still be taken (owners).
    assert "left in the maps: socks=0 slot_of=0 owners=0 claimed=0" in old_text, old_text
    assert "splice:" not in new_text, new_text


@pytest.mark.parametrize("reloads", [0, 2])
def test_spliced_connection_through_reloads_and_a_throttle(
    netns: Any, upstream: EchoUpstream, tmp_path: Path, reloads: int
) -> None:
    """Handed over ``reloads`` times (a second successor gets the first one's adopted maps too); then,
    with the client not reading for a while, the kernel throttles (backlog over 4 MiB) and the last
    process holds the bytes in userspace and splices again: still byte-exact, nothing left behind.
    ``reloads=0`` is the same without a restart, for comparison."""
    logs = [tmp_path / f"serve{i}.log" for i in range(reloads + 1)]
    args = serve_args(upstream, "--drain-timeout", "60", "--log-level", "debug")
    serves = Serves(netns)
    procs = [serves.start(logs[0], *args)]
    kept = None
    try:
        kept = connect(netns)
        stream = Stream(kept, seed=11)
        stream.progress(1.0)
        for i in range(1, reloads + 1):
            procs.append(serves.start(logs[i], *args, command="reload"))
            wait_for(f"successor {i}", lambda i=i: "serving 1 TCP" in logs[i].read_text())
            procs[i - 1].wait(timeout=20)
            assert "handed 1 spliced connections to pid" in logs[i - 1].read_text()
            stream.progress(1.0)
        stream.reading.clear()  # the client stops reading: the echo's bytes pile up towards it
        time.sleep(3.0)
        stream.reading.set()
        stream.progress(1.0)
        stream.finish()
        kept.close()
        wait_for(
            "the adopted maps to be released",
            lambda: logs[-1].read_text().count("released the splice maps adopted from pid") == reloads,
        )
    finally:
        if kept is not None:
            kept.close()
        serves.stop()
    texts = serves.check()
    last = texts[-1]
    # The relay's debug line at the end of the connection: the kernel throttled it in the last process.
    assert re.search(r"throttles=[1-9]", last), last
    left = "left in the maps: socks=0 slot_of=0 owners=0 claimed=0"
    assert re.search(rf"{min(reloads, 1)} adopted, 0 handed over; " + left, last), last


def test_serve_splice_with_workers(netns: Any, upstream: EchoUpstream, tmp_path: Path) -> None:
    """``--workers 2 --splice``: each worker has its own splicer, cgroup and listening socket (created
    by the parent while in that worker's cgroup), so every connection is spliced, whichever worker the
    reuseport group picks, and each worker's maps are empty at the end."""
    log = tmp_path / "serve.log"
    proc = start(netns, log, *serve_args(upstream, "--workers", "2"))
    try:
        for seed in range(12):
            data = pattern(seed, 256 << 10)
            with connect(netns) as sock:
                assert exchange(sock, data, end=True) == data
    finally:
        code, _ = stop(proc)
        sockpolicy(netns, "unload")
    text = log.read_text()
    assert code == 0, text
    assert text.count("splice: enabled (cgroup ") == 2, text
    left = "left in the maps: socks=0 slot_of=0 owners=0 claimed=0"
    worker = r"splice: (\d+) connections spliced \(\d+ bytes\), 0 relayed in userspace \(worker\); "
    workers = re.findall(worker + left, text)
    assert len(workers) == 2, text
    assert sum(int(spliced) for spliced in workers) == 12, text
    assert "Traceback" not in text
