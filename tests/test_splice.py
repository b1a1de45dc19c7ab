"""Kernel splicing (SOCKHASH + SK_SKB redirect) end to end, byte-exact, under adversarial timing.

The proxy runs in a child process (``python -m sockpolicy._splice_server``): splicing moves the serving
process into a cgroup of its own, which the pytest process must not join.  The child joins the test's
network namespace; clients and the upstream server live in this process, in the same namespace, outside
the cgroup, so only the proxy's own sockets are enrolled.

Every stream is a seeded pattern that the receiver checks byte for byte, so a lost, duplicated or
reordered byte fails the test.  The cases that a naive splice gets wrong are forced, not left to chance:
the client sends before ``accept()`` (``--hold``), the switch is paused while both sides stream
(``--switch-pause``), the upstream speaks first, both directions at once, a tiny backlog bound with a
slow reader (the throttle path).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from _harness import NetNS

import sockpolicy.progs
from sockpolicy.proxy._streams import SockStream

pytestmark = pytest.mark.privileged

TIMEOUT = 60.0
_P = 1 << 20
_BASE = random.Random(20261130).randbytes(_P)
_PATTERN = _BASE + _BASE[:65536]  # periodic: any slice of up to 64 KiB from any start is the stream
HEADER = struct.Struct("!4sIQQ")  # magic, connection id, bytes client -> upstream, bytes upstream -> client
MAGIC = b"SPLC"
LINGER_RST = struct.pack("ii", 1, 0)
SO_SNDBUFFORCE = 32
#: a 256 KiB backlog bound (64 KiB to splice again): a slow reader is throttled soon
SMALL_BACKLOG = ("--backlog-high", "262144", "--backlog-low", "65536")


def pattern(conn_id: int, direction: int, offset: int, size: int) -> bytes:
    """``size`` bytes of connection ``conn_id``'s stream in ``direction`` (0 up, 1 down) from ``offset``."""
    out = bytearray()
    start = (conn_id * 7919 + direction * 104729 + offset) % _P
    while len(out) < size:
        take = min(size - len(out), 65536)
        out += _PATTERN[start : start + take]
        start = (start + take) % _P
    return bytes(out)


async def send_pattern(
    sock: trio.socket.SocketType, conn_id: int, direction: int, size: int, rng: random.Random | None
) -> None:
    offset = 0
    while offset < size:
        chunk = min(size - offset, rng.choice((1, 7, 1000, 16384, 65536, 200000)) if rng else 65536)
        view = memoryview(pattern(conn_id, direction, offset, chunk))
        while view:
            view = view[await sock.send(view) :]
        offset += chunk
        if rng is not None and rng.random() < 0.05:
            await trio.sleep(rng.random() * 0.01)


async def recv_pattern(
    sock: trio.socket.SocketType,
    conn_id: int,
    direction: int,
    size: int,
    *,
    rate: float = 0,
    slow_bytes: int | None = None,
) -> int:
    """Read and check ``size`` bytes; then expect EOF.  ``rate``: bytes/s limit (a slow reader), for the
    first ``slow_bytes`` only if given (then as fast as it can)."""
    offset = 0
    started = trio.current_time()
    while offset < size:
        data = await sock.recv(min(65536, size - offset))
        if not data:
            raise AssertionError(f"conn {conn_id} dir {direction}: EOF after {offset} of {size} bytes")
        expected = pattern(conn_id, direction, offset, len(data))
        if data != expected:
            bad = next(i for i in range(len(data)) if data[i] != expected[i])
            raise AssertionError(f"conn {conn_id} dir {direction}: wrong byte at offset {offset + bad}")
        offset += len(data)
        if rate and (slow_bytes is None or offset < slow_bytes):
            ahead = offset / rate - (trio.current_time() - started)
            if ahead > 0:
                await trio.sleep(ahead)
    extra = await sock.recv(65536)
    assert extra == b"", f"conn {conn_id} dir {direction}: {len(extra)} bytes after the end"
    return offset


async def read_line(sock: trio.socket.SocketType) -> bytes:
    """One line; ``b""`` at an EOF before its first byte."""
    line = bytearray()
    while not line.endswith(b"\n"):
        data = await sock.recv(1)
        if not data:
            if line:
                raise AssertionError(f"EOF inside a preamble line {bytes(line)!r}")
            return b""
        line += data
    return bytes(line)


async def skip_preamble(sock: trio.socket.SocketType) -> bool:
    """Read up to the preamble's last line; False at EOF (a client that connected and closed)."""
    while (line := (await read_line(sock)).rstrip()) not in (b"PRE", b"SPLICE"):
        if not line:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------
# the upstream server (in this process)


@dataclass
class Upstream:
    addr: tuple[str, int]
    preamble: bytes = b"PRE\n"
    results: dict[int, int] = field(default_factory=dict)  # conn id -> bytes received, checked
    errors: list[str] = field(default_factory=list)
    rate: float = 0.0  # bytes/s the upstream reads at (0: as fast as it can)
    slow_bytes: int | None = None  # ... only the first slow_bytes at that rate
    resets: int = 0


async def _serve_upstream(up: Upstream, sock: trio.socket.SocketType) -> None:
    with sock:
        try:
            await sock.send(up.preamble)  # the upstream speaks first
            if not await skip_preamble(sock):
                return
            header = b""
            while len(header) < HEADER.size:
                data = await sock.recv(HEADER.size - len(header))
                if not data:
                    return  # a client that only connects
                header += data
            magic, conn_id, up_size, down_size = HEADER.unpack(header)
            assert magic == MAGIC, header
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_pattern, sock, conn_id, 1, down_size, None)
                got = await recv_pattern(sock, conn_id, 0, up_size, rate=up.rate, slow_bytes=up.slow_bytes)
            up.results[conn_id] = got
        except BaseException as exc:
            if _find(exc, ConnectionResetError):
                up.resets += 1
            elif error := _find(exc, (AssertionError, OSError)):
                up.errors.append(f"{type(error).__name__}: {error}")
            else:
                raise


def _find(exc: BaseException, kinds: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc`` or, for a group, in its members."""
    if isinstance(exc, BaseExceptionGroup):
        for member in exc.exceptions:
            if found := _find(member, kinds):
                return found
        return None
    return exc if isinstance(exc, kinds) else None


@contextlib.asynccontextmanager
async def upstream_server(netns: NetNS, host: str = "127.0.0.1", **kwargs: Any) -> AsyncIterator[Upstream]:
    """The test upstream (speaks first, checks every byte, answers with a pattern) on ``host``; an IPv6
    ``host`` gets an IPv6-only listener."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = netns.socket(family)
    if family == socket.AF_INET6:
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    lsock.bind((host, 0))
    lsock.listen(4096)
    listener = trio.socket.from_stdlib_socket(lsock)
    up = Upstream(listener.getsockname()[:2], **kwargs)
    async with trio.open_nursery() as nursery:

        async def accept_loop() -> None:
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(_serve_upstream, up, sock)

        nursery.start_soon(accept_loop)
        try:
            yield up
        finally:
            nursery.cancel_scope.cancel()
            listener.close()


# ---------------------------------------------------------------------------------------------------------
# the proxy process


class ProxyProcess:
    def __init__(self, proc: subprocess.Popen[str], hello: dict[str, Any], log: Any) -> None:
        self.proc = proc
        self.port: int = hello["port"]
        self.splice_reason: str | None = hello["splice"]
        self.pid: int = hello["pid"]
        self.log = log

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def command(self, line: str) -> dict[str, Any]:
        def ask() -> str:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline()

        reply = await trio.to_thread.run_sync(ask)
        if not reply:
            raise AssertionError(f"proxy exited: {self.stderr()}")
        return json.loads(reply)

    def stderr(self) -> str:
        # pread, not seek(0)+read: the child shares this file's offset, so a seek races with the child's
        # writes and the read can start mid-file.
        fd = self.log.fileno()
        chunks, offset = [], 0
        while chunk := os.pread(fd, 1 << 16, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode(errors="replace")

    async def wait_idle(self, timeout: float = 20.0) -> dict[str, Any]:
        """Stats once every connection is closed and every slot freed."""
        with trio.move_on_after(timeout):
            while True:
                stats = await self.command("stats")
                entries = stats.get("entries", {})
                if stats["serve"]["active"] == 0 and not any(entries.values()):
                    return stats
                await trio.sleep(0.1)
        return stats


@contextlib.asynccontextmanager
async def proxy_process(
    netns: NetNS, upstream: Upstream, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[ProxyProcess]:
    argv = [sys.executable, "-m", "sockpolicy._splice_server", "--netns", netns.path]
    argv += ["--upstream", f"{upstream.addr[0]}:{upstream.addr[1]}", *args]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "SOCKPOLICY_LOG": "INFO", **(env or {})},
        )
        try:
            assert proc.stdout is not None
            hello = await trio.to_thread.run_sync(proc.stdout.readline)
            if not hello:
                log.seek(0)
                raise AssertionError(f"proxy did not start: {log.read()}")
            yield ProxyProcess(proc, json.loads(hello), log)
        finally:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            try:
                await trio.to_thread.run_sync(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


# ---------------------------------------------------------------------------------------------------------
# clients


def client_sockets(netns: NetNS, count: int) -> list[trio.socket.SocketType]:
    """``count`` TCP sockets created inside ``netns`` (one thread hop for all)."""
    return [
        trio.socket.from_stdlib_socket(s) for s in netns.call(lambda: [socket.socket() for _ in range(count)])
    ]


async def exchange(
    sock: trio.socket.SocketType,
    addr: tuple[str, int],
    conn_id: int,
    up_size: int,
    down_size: int,
    *,
    preamble: bytes = b"PRE\n",
    rng: random.Random | None = None,
    connected: bool = False,
    down_rate: float = 0,
    eof_delay: float = 0,
) -> None:
    """One full connection: preamble + header + up_size bytes out, down_size bytes in, half-close.

    ``down_rate``: bytes/s the client reads at (0: as fast as it can); ``eof_delay``: seconds between the
    end of the upload and the half-close.
    """
    with sock:
        if not connected:
            await sock.connect(addr)
        first = preamble + HEADER.pack(MAGIC, conn_id, up_size, down_size)
        # Header and the first data in one write: the splice request arrives with more bytes behind it.
        head = pattern(conn_id, 0, 0, min(up_size, 3000))
        view = memoryview(first + head)
        while view:
            view = view[await sock.send(view) :]

        async def upload() -> None:
            rest = up_size - len(head)
            if rest:
                await _send_from(sock, conn_id, len(head), rest, rng)
            await trio.sleep(eof_delay)
            sock.shutdown(socket.SHUT_WR)  # half-close: the reply must still arrive in full

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            assert await skip_preamble(sock), f"conn {conn_id}: EOF before the upstream's preamble"
            await recv_pattern(sock, conn_id, 1, down_size, rate=down_rate)


async def _send_from(sock: trio.socket.SocketType, conn_id: int, offset: int, size: int, rng: Any) -> None:
    end = offset + size
    while offset < end:
        chunk = min(end - offset, rng.choice((1, 7, 1000, 16384, 65536, 200000)) if rng else 65536)
        view = memoryview(pattern(conn_id, 0, offset, chunk))
        while view:
            view = view[await sock.send(view) :]
        offset += chunk
        if rng is not None and rng.random() < 0.05:
            await trio.sleep(rng.random() * 0.01)


def assert_clean(stats: dict[str, Any]) -> None:
    assert stats["serve"]["active"] == 0, stats
    assert stats["serve"]["errors"] == 0, stats
    assert all(v == 0 for v in stats["entries"].values()), stats["entries"]
    assert stats["kernel"]["enrol_failed"] == 0 and stats["kernel"]["no_slot"] == 0, stats["kernel"]


# ---------------------------------------------------------------------------------------------------------
# tests


async def test_connect_splice_both_directions(netns: NetNS) -> None:
    async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:
        assert px.splice_reason is None, px.stderr()
        with trio.fail_after(TIMEOUT):
            [sock] = client_sockets(netns, 1)
            await exchange(sock, px.addr, 1, 3_000_000, 3_000_000)
            stats = await px.wait_idle()
    assert up.errors == [] and up.results == {1: 3_000_000}
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 1
    # Most went through the kernel.  A direction whose sender queued everything before the relay caught
    # up (the upstream answers the header with a 3 MB burst) legitimately finishes in userspace.
    assert stats["serve"]["bytes_spliced"] >= 3_000_000, stats


async def test_client_sends_before_accept(netns: NetNS) -> None:
    """Bytes queued on the accepted socket before the proxy accepts (and before the splice)."""
    async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect", "--hold") as px:
        with trio.fail_after(TIMEOUT):
            [sock] = client_sockets(netns, 1)
            await sock.connect(px.addr)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: exchange(sock, px.addr, 2, 2_000_000, 100_000, connected=True))
                await trio.sleep(0.3)  # the client has filled the unaccepted socket's receive queue
                assert (await px.command("go"))["ok"]
            stats = await px.wait_idle()
    assert up.errors == [] and up.results == {2: 2_000_000}
    assert_clean(stats)
    assert stats["serve"]["bytes_spliced"] > 0, stats


@pytest.mark.parametrize("policy", ["message", "down"])
async def test_switch_paused_while_both_stream(netns: NetNS, policy: str) -> None:
    """Splice() from on_message, mid-chunk, with the switch held open while both sides keep sending.

    ``message``: the client's line ``SPLICE`` decides (bytes after it in the same read sit in the framer);
    ``down``: the upstream speaks first and its line decides.
    """
    preamble = b"hello\nSPLICE\n"
    up_kw = {"preamble": preamble} if policy == "down" else {}
    client_preamble = preamble if policy == "message" else b"PRE\n"
    # What each slot's verdict may see at most: the client's and the upstream's whole stream.
    totals = {
        "client": len(client_preamble) + HEADER.size + 4_000_000,
        "upstream": len(preamble if policy == "down" else b"PRE\n") + 4_000_000,
    }
    async with (
        upstream_server(netns, **up_kw) as up,
        proxy_process(
            netns, up, "--policy", policy, "--switch-pause", "0.3", env={"SOCKPOLICY_LOG": "DEBUG"}
        ) as px,
    ):
        with trio.fail_after(TIMEOUT):
            socks = client_sockets(netns, 4)
            async with trio.open_nursery() as nursery:
                for i, sock in enumerate(socks):
                    rng = random.Random(i)
                    nursery.start_soon(
                        lambda s=sock, i=i, rng=rng: exchange(
                            s, px.addr, 10 + i, 4_000_000, 4_000_000, preamble=client_preamble, rng=rng
                        )
                    )
            stats = await px.wait_idle()
        assert_no_overcount(px.stderr(), totals)
    print("kernel", stats["kernel"])  # old_dropped / old_trimmed: how often retransmissions overlapped
    assert stats["kernel"]["trim_failed"] == 0 and stats["kernel"]["seq_unknown"] == 0, stats["kernel"]
    assert up.errors == [] and up.results == {10 + i: 4_000_000 for i in range(4)}
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 4
    assert stats["serve"]["bytes_spliced"] > 4_000_000, stats


async def test_stream_receive_keeps_bytes_when_cancelled() -> None:
    """The root cause of the old intermittent ECONNRESET (issue 4): the relay wakes a pump blocked in
    ``SockStream.receive`` by cancelling it (a splice request), and ``receive`` used to lose the chunk
    it had already read when the cancellation hit its periodic yield (every 4 reads that did not
    wait).  The upstream then saw a gap in the stream at a multiple of 64 KiB and reset.

    Every read here happens under an already-cancelled scope; a cancelled one is retried uncancelled.
    Nothing may be lost, and the fast path must have been taken (so the yield was reached).
    """
    left, right = socket.socketpair()
    with left, right:
        # Queue everything before the first read, so that reads keep finding data without waiting.
        left.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
        payload = pattern(50, 0, 0, 2 << 20)
        left.sendall(payload)
        left.shutdown(socket.SHUT_WR)
        stream = SockStream(trio.socket.from_stdlib_socket(right))
        got = bytearray()
        fast = 0
        while True:
            with trio.CancelScope() as scope:
                scope.cancel()
                data = await stream.receive(65536)
            if scope.cancelled_caught:
                data = await stream.receive(65536)
            else:
                fast += 1
            if not data:
                break
            got += data
        assert fast >= 8, fast  # reads that completed although their scope was cancelled
        assert bytes(got) == payload


async def test_slow_reader_bounded_by_throttle(netns: NetNS) -> None:
    """A 1 MB/s upstream reader behind a fast client: the kernel would queue without bound; the backlog
    bound hands the connection back to userspace (which waits), and nothing is lost or reordered."""
    async with (
        upstream_server(netns, rate=1_000_000) as up,
        proxy_process(netns, up, "--policy", "connect", *SMALL_BACKLOG) as px,
    ):
        with trio.fail_after(TIMEOUT):
            [sock] = client_sockets(netns, 1)
            await exchange(sock, px.addr, 3, 3_000_000, 10)
            stats = await px.wait_idle()
    assert up.errors == [] and up.results == {3: 3_000_000}
    assert_clean(stats)
    assert stats["kernel"]["throttled"] >= 1, stats
    assert stats["serve"]["bytes_spliced"] > 0, stats


async def test_hand_over_in_the_middle_of_a_write(netns: NetNS) -> None:
    """A restart's hand-over at the hardest moment: the relay (throttled by a 1 MB/s reader) has written
    part of a peeked chunk into the upstream socket and waits for room for the rest.  The connection is
    handed over and resumed in the same process by the successor's code path; every byte arrives once,
    in order, and everything is freed at the end."""
    async with (
        upstream_server(netns, rate=1_000_000) as up,
        proxy_process(netns, up, "--policy", "connect", *SMALL_BACKLOG) as px,
    ):
        with trio.fail_after(TIMEOUT):
            [sock] = client_sockets(netns, 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(exchange, sock, px.addr, 3, 3_000_000, 10)
                reply = await px.command("midwrite")
            stats = await px.wait_idle()
            log = px.stderr()
    assert "spliced connection adopted from pid" in log, log
    assert reply["ok"], reply
    assert 0 < reply["sent"] < reply["held"], reply
    assert up.errors == [] and up.results == {3: 3_000_000}
    assert_clean(stats)
    assert stats["kernel"]["throttled"] >= 1, stats


async def test_half_close_while_the_other_direction_drains(netns: NetNS) -> None:
    """The client half-closes while the kernel is still redirecting the reply into its socket.

    A client that reads the reply more slowly than the upstream sends it keeps the reply's redirected
    skbs waiting in the client socket's psock queue (the send buffer is full).  The client's FIN arrives
    as an empty skb; had the verdict passed it, it would have joined that same queue, and the kernel's
    backlog worker, meeting a 0-byte skb, reports EPIPE and stops transmitting: the rest of the reply
    was lost and the proxy reset the client (the second cause of issue 4; this test failed 2 runs in 6
    with that verdict).
    """
    async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:
        with trio.fail_after(TIMEOUT):
            socks = client_sockets(netns, 8)
            async with trio.open_nursery() as nursery:
                for i, sock in enumerate(socks):
                    # A small receive buffer: the proxy's send buffer towards the client fills up early.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                    nursery.start_soon(
                        lambda s=sock, i=i: exchange(
                            s,
                            px.addr,
                            60 + i,
                            200_000,
                            8_000_000,
                            down_rate=(0, 8e6)[i % 2],
                            eof_delay=0.02 * i,
                        )
                    )
            stats = await px.wait_idle()
    assert up.errors == [] and up.results == {60 + i: 200_000 for i in range(8)}
    assert_clean(stats)
    assert stats["serve"]["bytes_spliced"] > 0, stats


_SLOT_LINE = re.compile(
    r"(client|upstream) mode=(\d+) passed=(\d+) forwarded=(\d+) redirected=(\d+) written=(\d+) "
    r"throttles=(\d+) dropped=(\d+)"
)


def slot_counters(log: str) -> dict[str, dict[str, int]]:
    """The slot counters the relay logs (debug) when it releases a connection, by side."""
    names = ("mode", "passed", "forwarded", "redirected", "written", "throttles", "dropped")
    return {m[1]: dict(zip(names, map(int, m.groups()[1:]), strict=True)) for m in _SLOT_LINE.finditer(log)}


def assert_no_overcount(log: str, totals: dict[str, int]) -> None:
    """No slot's verdict passed or redirected more bytes than its peer ever sent: a retransmission that
    overlaps bytes already received was judged twice (docs/splice.md, "Why no byte is lost, ...")."""
    names = ("mode", "passed", "forwarded", "redirected", "written", "throttles", "dropped")
    lines = list(_SLOT_LINE.finditer(log))
    assert lines, "no slot counters logged (SOCKPOLICY_LOG=DEBUG?)"
    for m in lines:
        counters = dict(zip(names, map(int, m.groups()[1:]), strict=True))
        assert counters["passed"] + counters["redirected"] <= totals[m[1]], (m[1], counters)


@pytest.mark.xfail(
    strict=True,
    reason="re-splicing after a throttle is not forced: holding (commit 529c3c6) made bulk 6-10x slower "
    "here, so it was reverted; see docs/splice.md, Backpressure",
)
async def test_resplice_after_throttles(netns: NetNS) -> None:
    """After a throttle the kernel takes the connection back, even from a sender faster than Python.

    A small backlog bound and an upstream that reads slowly at first force several throttles; then it
    reads as fast as it can.  The relay must catch up with what the kernel passed (it holds what it
    forwarded, unconsumed, so the sender's window closes) and the verdict must splice again: most bytes
    are redirected, and the connection ends spliced, i.e. it was re-spliced after its last throttle.
    The relay that consumes after each forward (the current one) never catches up once the reader is
    fast: most of the stream goes through Python, and this test fails (hence strict xfail).  With
    holding (commit 529c3c6, reverted for throughput) it passed.
    """
    size = 48_000_000
    async with (
        upstream_server(netns, rate=2_000_000, slow_bytes=2_000_000) as up,
        proxy_process(
            netns, up, "--policy", "connect", "--backlog-high", "1048576", "--backlog-low", "262144",
            env={"SOCKPOLICY_LOG": "DEBUG"},
        ) as px,
    ):  # fmt: skip
        with trio.fail_after(TIMEOUT):
            [sock] = client_sockets(netns, 1)
            await exchange(sock, px.addr, 70, size, 10)
            stats = await px.wait_idle()
        log = px.stderr()
    assert up.errors == [] and up.results == {70: size}
    assert_clean(stats)
    client = slot_counters(log)["client"]
    assert client["throttles"] >= 2, client
    assert client["redirected"] + client["passed"] == size + len(b"PRE\n") + HEADER.size, client
    # Mostly in the kernel: userspace relays the first bytes, and after each throttle what was queued
    # until it caught up.  The Python reader is slower than the kernel even when "fast", so throttles
    # go on (7 to 17 per run); with holding: 65 to 86 % redirected; consuming after every forward: 5 to
    # 20 %.
    assert client["redirected"] >= 0.5 * size, client


async def reset_after_sending(sock: trio.socket.SocketType, addr: tuple[str, int], up: Upstream) -> None:
    """Connection 21 announces 10 MB, sends 500 kB (spliced by then), and resets: wait for the upstream to
    see the RST."""
    with sock:
        await sock.connect(addr)
        await sock.send(b"PRE\n" + HEADER.pack(MAGIC, 21, 10_000_000, 0) + pattern(21, 0, 0, 500_000))
        await trio.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    while up.resets < 1:
        await trio.sleep(0.05)


async def test_half_close_and_client_rst(netns: NetNS) -> None:
    async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:
        with trio.fail_after(TIMEOUT):
            # Half-close: covered by exchange() (the client shuts down first, the reply still arrives).
            [a, b] = client_sockets(netns, 2)
            await exchange(a, px.addr, 20, 100_000, 2_000_000)
            # Client RST after spliced traffic: the upstream sees a reset, not a clean end.
            await reset_after_sending(b, px.addr, up)
            stats = await px.wait_idle()
    assert up.results[20] == 100_000 and up.errors == []
    assert_clean(stats)


async def upstream_resets_spliced(
    sock: trio.socket.SocketType, listener: trio.socket.SocketType, addr: tuple[Any, ...]
) -> None:
    """Connect ``sock`` through the proxy at ``addr``, receive 200 kB byte-exact from the upstream
    accepted on ``listener``, then reset the upstream: the client must see ECONNRESET."""
    with sock:
        await sock.connect(addr)
        server, _ = await listener.accept()
        with server:
            payload = pattern(30, 1, 0, 1_000_000)
            await server.send(payload[:200_000])
            got = b""
            while len(got) < 200_000:
                got += await sock.recv(65536)
            assert got == payload[:200_000]
            server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        with pytest.raises(ConnectionResetError):
            while await sock.recv(65536):
                pass


async def test_rst_from_upstream(netns: NetNS) -> None:
    lsock = netns.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    listener = trio.socket.from_stdlib_socket(lsock)
    up = Upstream(listener.getsockname())
    with listener:
        async with proxy_process(netns, up, "--policy", "connect") as px:
            with trio.fail_after(TIMEOUT):
                [sock] = client_sockets(netns, 1)
                await upstream_resets_spliced(sock, listener, px.addr)
                stats = await px.wait_idle()
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 1


async def test_thousand_connections_byte_exact(netns: NetNS) -> None:
    """1000 spliced connections, 1 B to 8 MB each way, seeded sizes and pauses, 64 at a time."""
    rng = random.Random(1000)
    sizes = []
    for i in range(1000):
        if i % 100 == 7:
            sizes.append((rng.randint(1, 8 << 20), rng.randint(1, 8 << 20)))
        else:
            sizes.append((int(2 ** rng.uniform(0, 16)), int(2 ** rng.uniform(0, 16))))
    async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:
        with trio.fail_after(150):
            limit = trio.CapacityLimiter(64)
            socks = client_sockets(netns, 1000)

            async def one(i: int) -> None:
                async with limit:
                    await exchange(socks[i], px.addr, 1000 + i, *sizes[i], rng=random.Random(i))

            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    nursery.start_soon(one, i)
            stats = await px.wait_idle()
    assert up.errors == []
    assert up.results == {1000 + i: sizes[i][0] for i in range(1000)}
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 1000


async def test_many_short_connections_leave_nothing(netns: NetNS) -> None:
    """5000 connections opened and closed: zero map entries, zero slots, no fd left in the proxy."""
    async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:
        with trio.fail_after(150):
            before = await px.command("stats")
            limit = trio.CapacityLimiter(100)

            async def one(sock: trio.socket.SocketType, i: int) -> None:
                async with limit:
                    if i % 2:
                        await exchange(sock, px.addr, 5000 + i, 10, 10)
                    else:
                        with sock:
                            await sock.connect(px.addr)  # connect and close without a byte

            for batch in range(5):
                socks = client_sockets(netns, 1000)
                async with trio.open_nursery() as nursery:
                    for i, sock in enumerate(socks):
                        nursery.start_soon(one, sock, batch * 1000 + i)
            stats = await px.wait_idle(30)
    assert up.errors == []
    assert_clean(stats)
    assert stats["serve"]["accepted"] == 5000
    assert stats["fds"] == before["fds"], (before, stats)


@pytest.mark.parametrize("feature", ["cgroup", "sockops", "sk_skb", "mmap"])
async def test_fallback_when_a_feature_is_missing(netns: NetNS, feature: str) -> None:
    env = {"SOCKPOLICY_SPLICE_DISABLE": feature}
    async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect", env=env) as px:
        assert px.splice_reason is not None and "unavailable" in px.stderr()
        with trio.fail_after(TIMEOUT):
            [sock] = client_sockets(netns, 1)
            await exchange(sock, px.addr, 40, 1_000_000, 1_000_000)
            stats = await px.command("stats")
        assert px.stderr().count("splice unavailable") == 1
    assert up.errors == [] and up.results == {40: 1_000_000}
    assert "splicer" not in stats  # nothing was loaded or left behind


# ---------------------------------------------------------------------------------------------------------
# a retransmission overlapping bytes already received, forced with a hand-made TCP client


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


_SYN, _RST, _PSH, _ACK, _FIN = 0x02, 0x04, 0x08, 0x10, 0x01


def drop_kernel_resets(netns: NetNS) -> None:
    """The raw client's kernel has no socket for its port: keep it from resetting what the proxy sends
    (progs/test_drop_rst.bpf.c on the namespace's ``lo`` egress)."""
    subprocess.run(["tc", "-n", netns.name, "qdisc", "add", "dev", "lo", "clsact"], check=True)
    prog = os.path.join(os.path.dirname(sockpolicy.progs.__file__), "test_drop_rst.bpf.o")
    filt = [
        "tc",
        "-n",
        netns.name,
        "filter",
        "add",
        "dev",
        "lo",
        "egress",
        "bpf",
        "da",
        "obj",
        prog,
        "sec",
        "tc",
    ]
    subprocess.run(filt, check=True)


class _RawTcp:
    """Just enough TCP, over a raw socket on ``lo``, to send segments that real TCP never sends: a
    retransmission that starts inside bytes the receiver already has and ends after them."""

    def __init__(self, sock: socket.socket, port: int, dst: tuple[str, int]) -> None:
        self.sock, self.port, self.dst = sock, port, dst
        self.isn = 1_000_000
        self.rcv_nxt = 0  # next sequence number expected from the proxy
        self.received = bytearray()
        self.fin = False

    def send(self, seq: int, flags: int, payload: bytes = b"") -> None:
        header = struct.pack(
            "!HHIIBBHHH", self.port, self.dst[1], seq & 0xFFFFFFFF, self.rcv_nxt, 5 << 4, flags, 65535, 0, 0
        )
        pseudo = socket.inet_aton("127.0.0.1") + socket.inet_aton(self.dst[0])
        pseudo += struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header) + len(payload))
        csum = _csum(pseudo + header + payload)
        header = header[:16] + struct.pack("!H", csum) + header[18:]
        self.sock.sendto(header + payload, (self.dst[0], 0))

    def data(self, offset: int, payload: bytes, flags: int = _ACK | _PSH) -> None:
        self.send(self.isn + 1 + offset, flags, payload)

    def poll(self, timeout: float) -> tuple[int, int] | None:
        """One segment from the proxy (flags, seq), taking its payload in order; None on timeout."""
        self.sock.settimeout(timeout)
        while True:
            try:
                packet = self.sock.recv(70000)
            except TimeoutError:
                return None
            tcp = packet[(packet[0] & 0x0F) * 4 :]
            sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", tcp)
            if sport != self.dst[1] or dport != self.port:
                continue
            payload = tcp[(off >> 4) * 4 :]
            if flags & _SYN:
                if self.synack_ack is None:  # a retransmitted SYN-ACK must not rewind rcv_nxt
                    self.synack_ack = ack
                    self.rcv_nxt = (seq + 1) & 0xFFFFFFFF
            elif seq == self.rcv_nxt:
                self.received += payload
                self.rcv_nxt = (seq + len(payload) + (flags & _FIN)) & 0xFFFFFFFF
                self.fin = self.fin or bool(flags & _FIN)
            return flags, seq

    def ack_until_fin(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.fin and (left := deadline - time.monotonic()) > 0:
            if self.poll(left) is not None:
                self.send(self.isn + 1 + self.sent, _ACK)
        self.send(self.isn + 1 + self.sent, _ACK)

    sent = 0
    #: what the first SYN-ACK acknowledged (with data in the SYN: whether the server took it)
    synack_ack: int | None = None


@pytest.mark.parametrize(("first", "overlap", "second"), [(1000, 500, 2000), (30000, 10000, 60000)])
async def test_overlapping_retransmission_not_delivered_twice(
    netns: NetNS, first: int, overlap: int, second: int
) -> None:
    """A segment that repeats already-received bytes and carries new ones reaches the verdict whole
    (tcp_data_queue queues it, tcp_read_skb hands it over): only its new bytes may leave.

    A hand-made client (raw socket) sends [0, first), then [overlap, second), then [first, second) again
    (all old: TCP drops it itself), then the rest with a FIN.  The upstream checks every byte; the verdict
    must have trimmed exactly one skb.  Without the trim, the upstream got the overlap twice.  The second
    case overlaps 20000 bytes, more than one bpf_skb_adjust_room call removes (4095).
    """
    port = 41234
    drop_kernel_resets(netns)
    conn_id, size = 7, second + 1000
    stream = b"PRE\n" + HEADER.pack(MAGIC, conn_id, size, 0) + pattern(conn_id, 0, 0, size)
    async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:
        raw = netns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))

        def client() -> None:
            with raw:
                tcp = _RawTcp(raw, port, px.addr)
                tcp.send(tcp.isn, _SYN)
                while (got := tcp.poll(5)) is not None and not got[0] & _SYN:
                    pass
                assert got is not None, "no SYN-ACK"
                tcp.send(tcp.isn + 1, _ACK)
                time.sleep(0.5)  # accepted, upstream connected, splice requested
                for start, end in ((0, first), (overlap, second), (first, second)):
                    tcp.data(start, stream[start:end])
                    time.sleep(0.1)
                tcp.sent = len(stream)
                tcp.data(second, stream[second:], _ACK | _PSH | _FIN)
                tcp.sent += 1
                tcp.ack_until_fin(10)
                assert tcp.fin, "the proxy never closed its side"
                assert bytes(tcp.received) == b"PRE\n", tcp.received

        with trio.fail_after(TIMEOUT):
            try:
                await trio.to_thread.run_sync(client)
            except AssertionError as exc:
                closing = [line for line in px.stderr().splitlines() if "closing" in line]
                raise AssertionError(f"{exc}; proxy: {closing}; upstream: {up.errors}") from None
            stats = await px.wait_idle()
    assert up.errors == [] and up.results == {conn_id: size}, (up.errors, up.results)
    assert_clean(stats)
    kernel = stats["kernel"]
    assert kernel["old_trimmed"] == 1 and kernel["trim_failed"] == 0 and kernel["seq_unknown"] == 0, kernel
