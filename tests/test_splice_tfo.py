"""TCP Fast Open clients through a splicing proxy: the data of the SYN is spliced exactly like the rest.

With TFO the client's first bytes ride in its SYN.  The kernel creates the accepted socket from that SYN
(``tcp_fastopen_create_child``): SOCK_OPS enrols it (``PASSIVE_ESTABLISHED_CB``) while it is still in
SYN_RECV, and only then are the SYN's bytes queued on its receive queue, without a ``data_ready`` call,
so no verdict runs on them at that point.  These tests check that those bytes still reach the upstream
exactly once, in order, and that the slot's verdict counted each received byte once (docs/splice.md,
"TCP Fast Open").

Each test proves that the data really rode in the SYN, or fails.  Kernel clients: their ``TCP_INFO``
must show ``TCPI_OPT_SYN_DATA`` (the server acknowledged the SYN's data with its SYN-ACK) and exactly
the SYN payload sent before anything else, and the namespace's ``TCPFastOpenPassive`` counter must have
grown by one per connection; hand-made clients (raw socket) check that the SYN-ACK acknowledges their
SYN's data.  ``net.ipv4.tcp_fastopen`` is per network namespace and each test sets it in its own: 3
(client and server) with a fixed key, a first connection fetching the cookie; 0x203 for the hand-made
clients (no cookie needed); 0x403 for ``sockpolicy serve``, whose listeners have no ``TCP_FASTOPEN``.
The test proxy's listener has ``TCP_FASTOPEN`` (``--fastopen``).

Helpers (upstream server, proxy process, patterns) come from test_splice.py.
"""

from __future__ import annotations

import functools
import random
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import test_splice_cli as cli
import trio
from _e2e import sockpolicy as run_sockpolicy
from _e2e import stop
from _harness import NetNS
from test_splice import (
    _ACK,
    _FIN,
    _PSH,
    _SYN,
    HEADER,
    MAGIC,
    TIMEOUT,
    ProxyProcess,
    _RawTcp,
    assert_clean,
    drop_kernel_resets,
    pattern,
    proxy_process,
    recv_pattern,
    skip_preamble,
    upstream_server,
)
from test_splice_rules import echo_upstream, pinned_rules, recv_exact, wait_count

from sockpolicy._rules import Rule, RuleSet

pytestmark = pytest.mark.privileged

TCP_FASTOPEN_CONNECT = 30  # linux/tcp.h; not in Python's socket module on every version
TCPI_OPT_SYN_DATA = 0x20
# offsets in struct tcp_info (linux/tcp.h)
_TCPI_OPTIONS = 5
_TCPI_DATA_SEGS_OUT = 156
_TCPI_BYTES_SENT = 200
_TCPI_BYTES_RETRANS = 208
_TCPI_LEN = 216
KEY = "5eed0000-00000000-00000000-0000cafe"

# One line of the relay's debug log per slot at release (_tcp._release_slots).
_SIDE = ("client", "upstream")


def enable_fastopen(netns: NetNS) -> None:
    """TFO client and server (3) with a fixed key, in this namespace only."""
    assert netns.sysctl("net.ipv4.tcp_fastopen", 3) == "3"
    netns.sysctl("net.ipv4.tcp_fastopen_key", KEY)


def netstat(netns: NetNS, name: str) -> int:
    """A ``TcpExt`` counter of the namespace (``/proc/net/netstat`` read from inside it)."""

    def read() -> str:
        with open("/proc/thread-self/net/netstat") as f:
            return f.read()

    lines = [line.split() for line in netns.call(read).splitlines() if line.startswith("TcpExt:")]
    names, values = lines[0], lines[1]
    return int(values[names.index(name)])


def client_stream(conn_id: int, preamble: bytes, up_size: int, down_size: int) -> bytes:
    """Everything the client sends: its preamble, the header, ``up_size`` pattern bytes."""
    return preamble + HEADER.pack(MAGIC, conn_id, up_size, down_size) + pattern(conn_id, 0, 0, up_size)


def open_tfo(
    netns: NetNS, family: int, addr: tuple[Any, ...], syn: bytes, *, in_syn: bool = True
) -> socket.socket:
    """A blocking client socket (created in ``netns``) whose first ``send()`` of ``syn`` opened the
    connection (``TCP_FASTOPEN_CONNECT``: ``connect()`` sends nothing; the send puts the data into the SYN
    when a cookie is cached, else asks for one).  ``in_syn``: the client's TCP_INFO, right after that send
    returned (blocking, so the handshake is over), must show that the whole of ``syn`` rode in the SYN
    and was acknowledged by the SYN-ACK (:func:`assert_rode_in_syn`); else that none did."""

    def go() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            sock.settimeout(10)
            sock.connect(addr)
            sent = sock.send(syn)
            assert sent == len(syn), (sent, len(syn))
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LEN)
            if in_syn:
                assert_rode_in_syn(info, syn)
            else:
                assert not info[_TCPI_OPTIONS] & TCPI_OPT_SYN_DATA, "a cookie was cached already"
            return sock
        except BaseException:
            sock.close()
            raise

    return netns.call(go)


async def tfo_connect(
    netns: NetNS, family: int, addr: tuple[Any, ...], syn: bytes, *, in_syn: bool = True
) -> trio.socket.SocketType:
    """:func:`open_tfo` as a trio socket."""
    sock = await trio.to_thread.run_sync(functools.partial(open_tfo, netns, family, addr, syn, in_syn=in_syn))
    return trio.socket.from_stdlib_socket(sock)


def assert_rode_in_syn(info: bytes, syn: bytes) -> None:
    """``info`` (the client's TCP_INFO right after its first send) says the whole ``syn`` payload went in
    the SYN and was acknowledged by the SYN-ACK: the proxy received it as Fast Open data."""
    options = info[_TCPI_OPTIONS]
    (data_segs_out,) = struct.unpack_from("=I", info, _TCPI_DATA_SEGS_OUT)
    sent, retrans = struct.unpack_from("=QQ", info, _TCPI_BYTES_SENT)
    assert options & TCPI_OPT_SYN_DATA, f"the SYN's data was not accepted (tcpi_options {options:#x})"
    assert (data_segs_out, sent, retrans) == (1, len(syn), 0), (data_segs_out, sent, retrans)


async def cookie_connection(
    netns: NetNS, family: int, addr: tuple[Any, ...], conn_id: int, preamble: bytes = b"PRE\n"
) -> tuple[trio.socket.SocketType, int]:
    """A connection through the proxy whose SYN asks for a cookie (its data follows the handshake), so
    that later SYNs to ``addr`` can carry data.  The cookie comes with the SYN-ACK, before any
    ``accept()``.  Returns the socket, its request sent, for :func:`finish` (10 bytes back, 10 up), and
    the number of bytes the client sent."""
    stream = client_stream(conn_id, preamble, 10, 10)
    return await tfo_connect(netns, family, addr, stream, in_syn=False), len(stream)


async def fetch_cookie(
    netns: NetNS, family: int, addr: tuple[Any, ...], conn_id: int, preamble: bytes = b"PRE\n",
    up_preamble: bytes = b"PRE\n",
) -> int:  # fmt: skip
    """:func:`cookie_connection`, completed (a full small exchange, so the plain path is checked too)."""
    sock, sent = await cookie_connection(netns, family, addr, conn_id, preamble)
    await finish(sock, conn_id, b"", 10, up_preamble)
    return sent


async def finish(
    sock: trio.socket.SocketType,
    conn_id: int,
    rest: bytes,
    down_size: int,
    up_preamble: bytes,
    *,
    rng: random.Random | None = None,
    half_close_first: bool = True,
) -> None:
    """Send ``rest`` (the client's stream after the SYN's part), half-close, read the upstream's preamble
    and ``down_size`` pattern bytes checked, then EOF.  ``half_close_first=False``: read the whole reply
    first, then half-close (the client that waits for an answer to what its SYN carried)."""
    with sock:

        async def upload() -> None:
            view = memoryview(rest)
            while view:
                chunk = rng.choice((1, 7, 1000, 16384, 65536)) if rng else 65536
                view = view[await sock.send(view[:chunk]) :]
                if rng is not None and rng.random() < 0.05:
                    await trio.sleep(rng.random() * 0.01)
            if half_close_first:
                sock.shutdown(socket.SHUT_WR)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            if up_preamble:
                assert await skip_preamble(sock), f"conn {conn_id}: EOF before the upstream's preamble"
            if half_close_first:
                await recv_pattern(sock, conn_id, 1, down_size)
                return
            got = 0
            while got < down_size:
                data = await sock.recv(min(65536, down_size - got))
                assert data, f"conn {conn_id}: EOF after {got} of {down_size} bytes"
                assert data == pattern(conn_id, 1, got, len(data)), f"conn {conn_id}: wrong bytes at {got}"
                got += len(data)
        sock.shutdown(socket.SHUT_WR)
        assert await sock.recv(1) == b"", f"conn {conn_id}: bytes after the end"


_SLOT_LINE = re.compile(
    r"<Connection #\d+ tcp \S+:(\d+) -> .*?: (client|upstream) mode=(\d+) passed=(\d+) forwarded=(\d+) "
    r"redirected=(\d+) written=(\d+) throttles=(\d+) dropped=(\d+) old=(\d+)"
)
_SLOT_NAMES = ("mode", "passed", "forwarded", "redirected", "written", "throttles", "dropped", "old")


def slot_counters(log: str) -> dict[tuple[int, str], dict[str, int]]:
    """The slot counters the relay logs (debug) when it releases a connection, by (client port, side)."""
    return {
        (int(m[1]), m[2]): dict(zip(_SLOT_NAMES, map(int, m.groups()[2:]), strict=True))
        for m in _SLOT_LINE.finditer(log)
    }


def assert_judged_once(px: ProxyProcess, sent: dict[int, int], redirecting: dict[int, str]) -> None:
    """Each client slot's verdict passed or redirected exactly the bytes its client sent, the SYN's
    included (``sent``: client port -> bytes), and for each port of ``redirecting`` the slot of that
    side redirected something: the kernel took that direction over."""
    slots = slot_counters(px.stderr())
    for port, size in sent.items():
        c = slots.get((port, "client"))
        assert c is not None, f"no slot counters logged for client port {port}: {slots}"
        assert c["passed"] + c["redirected"] == size, (port, size, c)
    for port, side in redirecting.items():
        assert slots[port, side]["redirected"] > 0, (port, side, slots[port, side])


def addr_of(family: int, px: ProxyProcess) -> tuple[Any, ...]:
    return ("::1", px.port) if family == socket.AF_INET6 else ("127.0.0.1", px.port)


DEBUG = {"SOCKPOLICY_LOG": "DEBUG"}  # the relay logs each slot's counters at release
FAMILIES = [pytest.param(socket.AF_INET, id="v4"), pytest.param(socket.AF_INET6, id="v6")]


def listen_args(family: int) -> list[str]:
    return ["--fastopen", "64", *(["--listen", "::1"] if family == socket.AF_INET6 else [])]


def preamble_for(policy: str) -> bytes:
    """The client's preamble: ``message`` splices on the client's ``SPLICE`` line (read by the relay)."""
    return b"hello\nSPLICE\n" if policy == "message" else b"PRE\n"


def assert_seq_tracking_clean(stats: dict[str, Any]) -> None:
    """The verdict trusted every skb's control block (the SYN's data included) and saw nothing twice."""
    kernel = stats["kernel"]
    assert kernel["seq_unknown"] == 0 and kernel["trim_failed"] == 0, kernel
    assert kernel["old_dropped"] == 0 and kernel["old_trimmed"] == 0, kernel


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["connect", "message"])
async def test_fastopen_data_then_exchange(netns: NetNS, policy: str, family: int) -> None:
    """(a) The SYN carries the preamble, the header and the first pattern bytes; then 1 MB each way.

    ``connect``: Pass(splice=True) from on_connect, the kernel may take the SYN's bytes itself;
    ``message``: the relay reads and frames them first (lines until ``SPLICE``), then splices.
    """
    enable_fastopen(netns)
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    preamble = preamble_for(policy)
    conn_id, up_size, down_size = 100, 1_000_000, 1_000_000
    stream = client_stream(conn_id, preamble, up_size, down_size)
    syn = stream[:1000]
    async with (
        upstream_server(netns, host) as up,
        proxy_process(netns, up, "--policy", policy, *listen_args(family), env=DEBUG) as px,
    ):
        assert px.splice_reason is None, px.stderr()
        addr = addr_of(family, px)
        with trio.fail_after(TIMEOUT):
            await fetch_cookie(netns, family, addr, 99, preamble)
            before = netstat(netns, "TCPFastOpenPassive")
            sock = await tfo_connect(netns, family, addr, syn)
            port = sock.getsockname()[1]
            await finish(sock, conn_id, stream[len(syn) :], down_size, b"PRE\n")
            stats = await px.wait_idle()
        assert netstat(netns, "TCPFastOpenPassive") == before + 1
        assert_judged_once(px, {port: len(stream)}, {port: "client"})
    assert up.errors == [] and up.results == {99: 10, conn_id: up_size}
    assert_clean(stats)
    assert_seq_tracking_clean(stats)
    assert stats["splicer"]["spliced"] == 2


@pytest.mark.parametrize("timing", ["hold", "switch-pause"])
async def test_fastopen_data_and_streaming_during_the_switch(netns: NetNS, timing: str) -> None:
    """(b) SYN data, then both sides stream at once (random write sizes) while the switch happens.

    ``hold``: the proxy accepts only after the client has queued its SYN data and 300 ms of stream
    behind it (the accepted socket's receive queue starts with the SYN's skb, which no verdict saw);
    ``switch-pause``: the relay is held 300 ms between the splice request and its first ``forwarded``
    store, so the kernel passes (and counts) what arrives meanwhile.  Four connections.
    """
    enable_fastopen(netns)
    args = ["--hold"] if timing == "hold" else ["--switch-pause", "0.3"]
    up_size, down_size = 3_000_000, 3_000_000
    streams = {200 + i: client_stream(200 + i, b"PRE\n", up_size, down_size) for i in range(4)}
    async with (
        upstream_server(netns) as up,
        proxy_process(netns, up, "--policy", "connect", *listen_args(socket.AF_INET), *args, env=DEBUG) as px,
    ):
        addr = addr_of(socket.AF_INET, px)
        with trio.fail_after(TIMEOUT):
            warm_sock, _ = await cookie_connection(netns, socket.AF_INET, addr, 99)
            before = netstat(netns, "TCPFastOpenPassive")
            sent = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish, warm_sock, 99, b"", 10, b"PRE\n")
                for conn_id, stream in streams.items():
                    syn = stream[: 700 + conn_id]
                    sock = await tfo_connect(netns, socket.AF_INET, addr, syn)
                    sent[sock.getsockname()[1]] = len(stream)
                    rest = stream[len(syn) :]
                    rng = random.Random(conn_id)
                    nursery.start_soon(
                        functools.partial(finish, sock, conn_id, rest, down_size, b"PRE\n", rng=rng)
                    )
                if timing == "hold":
                    await trio.sleep(0.3)  # SYN data and stream queued on sockets nobody accepted yet
                    assert (await px.command("go"))["ok"]
            stats = await px.wait_idle()
        assert netstat(netns, "TCPFastOpenPassive") == before + 4
        assert_judged_once(px, sent, dict.fromkeys(sent, "client"))
    assert up.errors == [] and up.results == {99: 10, **{c: up_size for c in streams}}
    assert_clean(stats)
    assert_seq_tracking_clean(stats)
    assert stats["splicer"]["spliced"] == 5


@pytest.mark.parametrize("hold", [False, True], ids=["at-once", "hold"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["connect", "message"])
async def test_fastopen_syn_data_alone_gets_its_answer(
    netns: NetNS, policy: str, family: int, hold: bool
) -> None:
    """(c) Everything the client sends is in its SYN, then it waits for the answer (no later segment
    from the client, so nothing but the relay's first read makes the verdict run on the SYN's bytes).

    The upstream speaks only after it has read the client's whole request (preamble, header, 300 bytes)
    and answers with 200 kB; the client reads all of it before it half-closes.  If the SYN's bytes were
    stuck in the accepted socket's queue, nobody would ever speak: the test times out.  ``hold``: the
    proxy accepts only 300 ms after the handshake (``at-once``: as soon as it can).
    """
    enable_fastopen(netns)
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    preamble = preamble_for(policy)
    conn_id, up_size, down_size = 300, 300, 200_000
    stream = client_stream(conn_id, preamble, up_size, down_size)
    async with (
        upstream_server(netns, host, preamble=b"") as up,
        proxy_process(
            netns, up, "--policy", policy, *listen_args(family), *(["--hold"] if hold else []), env=DEBUG
        ) as px,
    ):
        addr = addr_of(family, px)
        with trio.fail_after(TIMEOUT):
            warm, _ = await cookie_connection(netns, family, addr, 99, preamble)
            with warm:  # closed here too if anything below fails (finish() closes it otherwise)
                if not hold:
                    await finish(warm, 99, b"", 10, b"")
                before = netstat(netns, "TCPFastOpenPassive")
                sock = await tfo_connect(netns, family, addr, stream)
                port = sock.getsockname()[1]
                if hold:
                    await trio.sleep(0.3)
                    assert (await px.command("go"))["ok"]
                    await finish(warm, 99, b"", 10, b"")
            with trio.fail_after(10):
                await finish(sock, conn_id, b"", down_size, b"", half_close_first=False)
            stats = await px.wait_idle()
        assert netstat(netns, "TCPFastOpenPassive") == before + 1
        # The request is all in the SYN: with ``connect`` the kernel takes it (the splice is requested
        # before the relay's first read), with ``message`` the relay reads it; the answer is spliced.
        redirecting = {port: "upstream"}
        assert_judged_once(px, {port: len(stream)}, redirecting)
        if policy == "connect":
            assert slot_counters(px.stderr())[port, "client"]["redirected"] == len(stream)
    assert up.errors == [] and up.results == {99: 10, conn_id: up_size}
    assert_clean(stats)
    assert_seq_tracking_clean(stats)


# ---------------------------------------------------------------------------------------------------------
# accept() before the handshake ends: a hand-made client that withholds its ACK of the SYN-ACK


@pytest.mark.parametrize("policy", ["connect", "message"])
async def test_fastopen_accepted_and_spliced_before_the_handshake_ends(netns: NetNS, policy: str) -> None:
    """The proxy accepts a TFO socket still in SYN_RECV, claims its slot, splices, and the answer to the
    SYN's request reaches the client before the client has acknowledged the SYN-ACK.

    A hand-made client (raw socket; the namespace accepts SYN data without a cookie, 0x200) sends its
    whole request (preamble, header, 300 bytes) in the SYN and withholds its ACK until it has received
    the first bytes of the upstream's 20 kB answer: the upstream speaks only after reading the request,
    so those bytes prove that the SYN's data went through the accepted socket's verdict and the splice
    while the handshake was unfinished.  Then it ACKs, reads the rest and closes with a FIN; the answer
    must be byte-exact, the proxy's FIN must come after its last byte (the drain check calibrated its
    base while the socket was in SYN_RECV), and each byte of the request is judged once.
    """
    drop_kernel_resets(netns)
    assert netns.sysctl("net.ipv4.tcp_fastopen", 0x203) == str(0x203)
    preamble = preamble_for(policy)
    conn_id, up_size, down_size = 400, 300, 20_000
    stream = client_stream(conn_id, preamble, up_size, down_size)
    port = 41235
    async with (
        upstream_server(netns, preamble=b"") as up,
        proxy_process(netns, up, "--policy", policy, "--fastopen", "64", env=DEBUG) as px,
    ):
        before = netstat(netns, "TCPFastOpenPassive")
        raw = netns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))

        def client() -> int:
            with raw:
                tcp = _RawTcp(raw, port, px.addr)
                tcp.send(tcp.isn, _SYN, stream)
                while (got := tcp.poll(5)) is not None and not got[0] & _SYN:
                    pass
                assert got is not None, "no SYN-ACK"
                assert tcp.synack_ack == (tcp.isn + 1 + len(stream)) & 0xFFFFFFFF, (
                    "the SYN's data was not accepted"
                )
                deadline = time.monotonic() + 0.9  # before the SYN-ACK's first retransmission (1 s)
                while not tcp.received and (left := deadline - time.monotonic()) > 0:
                    tcp.poll(left)
                early = len(tcp.received)
                tcp.sent = len(stream)
                tcp.send(tcp.isn + 1 + tcp.sent, _ACK)  # the handshake ends only now
                while len(tcp.received) < down_size:
                    if tcp.poll(5) is None:
                        break
                    tcp.send(tcp.isn + 1 + tcp.sent, _ACK)
                assert bytes(tcp.received) == pattern(conn_id, 1, 0, down_size), (
                    len(tcp.received),
                    down_size,
                )
                tcp.send(tcp.isn + 1 + tcp.sent, _ACK | _FIN)
                tcp.sent += 1
                tcp.ack_until_fin(10)
                assert tcp.fin, "the proxy never closed its side"
                assert bytes(tcp.received) == pattern(conn_id, 1, 0, down_size), "bytes after the answer"
                return early

        with trio.fail_after(TIMEOUT):
            try:
                early = await trio.to_thread.run_sync(client)
            except AssertionError as exc:
                closing = [line for line in px.stderr().splitlines() if "closing" in line]
                raise AssertionError(f"{exc}; proxy: {closing}; upstream: {up.errors}") from None
            stats = await px.wait_idle()
        assert early > 0, "no answer before the client's ACK: the proxy did not serve the SYN_RECV socket"
        assert netstat(netns, "TCPFastOpenPassive") == before + 1
        assert_judged_once(px, {port: len(stream)}, {port: "upstream"})
    assert up.errors == [] and up.results == {conn_id: up_size}, (up.errors, up.results)
    assert_clean(stats)
    assert_seq_tracking_clean(stats)


# ---------------------------------------------------------------------------------------------------------
# sockpolicy serve --splice


def test_serve_splice_fastopen_client(netns: NetNS, tmp_path: Path) -> None:
    """(d) ``sockpolicy serve --splice`` (steered by the dispatcher, echo upstream): a client whose first
    1000 bytes ride in its SYN, then 4 MB each way at once, byte-exact, spliced, nothing relayed in
    userspace.  serve does not set ``TCP_FASTOPEN`` on its listeners: the namespace enables Fast Open
    on every listener instead (``net.ipv4.tcp_fastopen`` bit 0x400, docs/splice.md)."""
    assert netns.sysctl("net.ipv4.tcp_fastopen", 0x403) == str(0x403)
    netns.sysctl("net.ipv4.tcp_fastopen_key", KEY)
    up = cli.EchoUpstream(netns)
    log = tmp_path / "serve.log"
    proc = cli.start(netns, log, *cli.serve_args(up, "--metrics", "127.0.0.1:9464"))
    try:
        # The first connection asks for a cookie (and waits for serve to listen).
        warm = cli.wait_for(
            "serve", lambda: _try(lambda: open_tfo(netns, socket.AF_INET, cli.PROXY, b"x" * 10, in_syn=False))
        )
        with warm:
            assert cli.exchange(warm, b"", end=True) == b"x" * 10
        before = netstat(netns, "TCPFastOpenPassive")
        data = cli.pattern(7)
        with open_tfo(netns, socket.AF_INET, cli.PROXY, data[:1000]) as sock:
            assert cli.exchange(sock, data[1000:], end=True) == data
        assert netstat(netns, "TCPFastOpenPassive") == before + 1
        spliced = cli.wait_for(
            "bytes_spliced", lambda: cli.metric(netns, 9464, "sockpolicy_bytes_spliced_total")
        )
        assert 0 < spliced <= 2 * len(data) + 2 * 10  # and the first connection: 10 bytes each way
    finally:
        code, _ = stop(proc)
        run_sockpolicy(netns, "unload")
        up.close()
    text = log.read_text()
    assert code == 0, text
    assert re.search(r"splice: 2 connections spliced \([1-9]\d* bytes\), 0 relayed in userspace", text), text
    assert "Traceback" not in text


def _try(fn: Any) -> Any:
    """``fn()``, or ``None`` if it raised ``OSError`` (not listening yet)."""
    try:
        return fn()
    except OSError:
        return None


@pytest.mark.parametrize("hold", [False, True], ids=["at-once", "hold"])
async def test_fastopen_retransmission_overlapping_the_syn_data(netns: NetNS, hold: bool) -> None:
    """A segment that repeats the end of the SYN's data and carries new bytes (TCP queues it whole) is
    trimmed by the verdict to its new part: its sequence tracking starts after the SYN's data.

    A hand-made client sends [0, 1000) in its SYN (accepted without a cookie, 0x200), then [500, 3000),
    then the rest with a FIN.  ``hold``: all of it is queued before ``accept()``, so the verdict first
    meets the SYN's skb and the overlapping one together, at the relay's first read.  The upstream must
    get each byte once, and the verdict must have trimmed exactly one skb.
    """
    drop_kernel_resets(netns)
    netns.sysctl("net.ipv4.tcp_fastopen", 0x203)
    conn_id, size = 500, 5000
    stream = client_stream(conn_id, b"PRE\n", size, 0)
    port = 41236
    async with (
        upstream_server(netns) as up,
        proxy_process(
            netns, up, "--policy", "connect", "--fastopen", "64", *(["--hold"] if hold else []), env=DEBUG
        ) as px,
    ):
        raw = netns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
        sent = trio.Event()

        def client() -> None:
            with raw:
                tcp = _RawTcp(raw, port, px.addr)
                tcp.send(tcp.isn, _SYN, stream[:1000])
                while (got := tcp.poll(5)) is not None and not got[0] & _SYN:
                    pass
                assert got is not None, "no SYN-ACK"
                assert tcp.synack_ack == (tcp.isn + 1001) & 0xFFFFFFFF, "the SYN's data was not accepted"
                tcp.send(tcp.isn + 1001, _ACK)
                time.sleep(0.1)
                tcp.data(500, stream[500:3000])
                time.sleep(0.1)
                tcp.sent = len(stream)
                tcp.data(3000, stream[3000:], _ACK | _PSH | _FIN)
                tcp.sent += 1
                trio.from_thread.run_sync(sent.set)
                tcp.ack_until_fin(10)
                assert tcp.fin, "the proxy never closed its side"
                assert bytes(tcp.received) == b"PRE\n", tcp.received

        async def go() -> None:
            await sent.wait()
            await trio.sleep(0.2)
            assert (await px.command("go"))["ok"]

        with trio.fail_after(TIMEOUT):
            try:
                async with trio.open_nursery() as nursery:
                    if hold:
                        nursery.start_soon(go)
                    await trio.to_thread.run_sync(client)
            except* AssertionError as group:
                closing = [line for line in px.stderr().splitlines() if "closing" in line]
                raise AssertionError(f"{group.exceptions}; proxy: {closing}; upstream: {up.errors}") from None
            stats = await px.wait_idle()
        assert_judged_once(px, {port: len(stream)}, {})  # the repeated 500 bytes count in `old` only
        assert slot_counters(px.stderr())[port, "client"]["old"] == 500
    assert up.errors == [] and up.results == {conn_id: size}, (up.errors, up.results)
    assert_clean(stats)
    kernel = stats["kernel"]
    assert kernel["old_trimmed"] == 1 and kernel["trim_failed"] == 0 and kernel["seq_unknown"] == 0, kernel


# ---------------------------------------------------------------------------------------------------------
# kernel rules: the SYN's skb is one message like any other


async def test_fastopen_syn_message_judged_by_kernel_rules(netns: NetNS) -> None:
    """With kernel rules pinned, the SYN's skb is judged like any received skb: a SYN whose data matches
    a Drop rule loses exactly that message (counted in the slot's ``dropped``), one whose data matches
    nothing is relayed, and the rules count every received byte once per receiving socket."""
    enable_fastopen(netns)
    rules = RuleSet((Rule("Drop", name="no-drop", prefix=b"DROP"),))
    dropped, kept = b"DROP in the syn\n", b"kept in the syn\n"
    after = [b"after %d\n" % i for i in range(3)]
    async with echo_upstream(netns) as up:
        with pinned_rules(netns, rules) as enforcer:
            async with proxy_process(netns, up, "--policy", "connect", "--fastopen", "64", env=DEBUG) as px:  # type: ignore[arg-type]
                assert "splice: kernel rules apply" in px.stderr()
                with trio.fail_after(TIMEOUT):
                    sock = await tfo_connect(netns, socket.AF_INET, px.addr, b"hi\n", in_syn=False)
                    with sock:
                        assert await recv_exact(sock, 3) == b"hi\n"
                        sock.shutdown(socket.SHUT_WR)
                        assert await sock.recv(1) == b""
                    sent = {}
                    for syn in (dropped, kept):
                        sock = await tfo_connect(netns, socket.AF_INET, px.addr, syn)
                        sent[sock.getsockname()[1]] = len(syn) + sum(map(len, after))
                        with sock:
                            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                            if syn == dropped:
                                await wait_count(enforcer, "no-drop", 1)
                            else:
                                assert await recv_exact(sock, len(syn)) == syn
                            for line in after:  # one message at a time, each echoed before the next
                                await sock.send(line)
                                assert await recv_exact(sock, len(line)) == line
                            sock.shutdown(socket.SHUT_WR)
                            assert await sock.recv(1) == b"", "bytes after the last echo"
                    stats = await px.wait_idle()
                slots = slot_counters(px.stderr())
            final = enforcer.stats()
    assert_clean(stats)
    assert sorted(up.received) == sorted([b"hi\n", b"".join(after), kept + b"".join(after)])
    dropped_port = next(iter(sent))
    assert slots[dropped_port, "client"]["dropped"] == len(dropped), slots
    for port, size in sent.items():
        c = slots[port, "client"]
        assert c["passed"] + c["redirected"] + c["dropped"] == size, (port, c)
    assert stats["kernel"]["rule_dropped"] == 1, stats["kernel"]
    assert (final["no-drop"].msgs, final["no-drop"].bytes) == (1, len(dropped))
    received = 2 * 3 + sum(sent.values()) + sum(sent.values()) - len(dropped)  # client side + echoes
    assert final["no-drop"].bytes + final.unmatched.bytes == received, final.to_dict()
