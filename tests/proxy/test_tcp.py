"""TCP proxying: connect verdicts, message verdicts byte-exact, half-close, resets, timeouts."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from functools import partial

import pytest
import trio

from sockpolicy.proxy import (
    Close,
    Connection,
    Direction,
    Drop,
    HttpHeadFramer,
    LengthPrefixFramer,
    LineFramer,
    Message,
    Pass,
    Policy,
    Redirect,
    Rewrite,
    serve,
)

from .conftest import (
    TIMEOUT,
    V4,
    V6,
    connect,
    expect_closed,
    recv_all,
    recv_exactly,
    running_proxy,
    sendall,
    tcp_listener,
    upstream_server,
)


@pytest.mark.parametrize("host", [V4, V6])
async def test_echo_default(policy: Policy, host: str) -> None:
    seen: list[Connection] = []
    policy.on_connect()(lambda conn: seen.append(conn) or Pass())
    async with running_proxy(policy, tcp=(host,), label="lbl") as proxy:
        with trio.fail_after(TIMEOUT):
            sock = await connect(proxy.addr)
            payload = bytes(range(256)) * 1000
            await sendall(sock, payload)
            assert await recv_exactly(sock, len(payload)) == payload
            sock.shutdown(socket.SHUT_WR)
            assert await recv_all(sock) == b""
            sock.close()
    [conn] = seen
    assert conn.proto == "tcp"
    assert conn.original_dst == proxy.addr
    assert conn.client[0] == host
    assert conn.label == "lbl"
    assert conn.upstream is None


async def test_pass_to_upstream(policy: Policy) -> None:
    async with upstream_server() as up, running_proxy(policy, upstream=up.addr) as proxy:
        sock = await connect(proxy.addr)
        await sendall(sock, b"hello world")
        assert await recv_exactly(sock, 11) == b"HELLO WORLD"
        sock.shutdown(socket.SHUT_WR)
        assert await recv_all(sock) == b""
        sock.close()
        with trio.fail_after(TIMEOUT):
            await up.done.wait()
        assert up.data == b"hello world"
        stats = proxy.handle.stats
        assert stats.bytes_from_client == stats.bytes_to_upstream == 11
        assert stats.verdicts["pass"] == 1


async def test_upstream_same_port_as_original_dst(policy: Policy) -> None:
    # upstream=(host, None) means "the port the client dialled".  Put the upstream on 127.0.0.1:P
    # and the proxy's listener on [::1]:P, so only a correct port choice reaches the upstream.
    async with upstream_server() as up:
        port = up.addr[1]
        lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        lsock.bind((V6, port))
        lsock.listen(8)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(serve, policy, tcp_sockets=[lsock], upstream=(V4, None)))
                sock = await connect((V6, port))
                with sock:
                    await sendall(sock, b"abc")
                    assert await recv_exactly(sock, 3) == b"ABC"
                nursery.cancel_scope.cancel()
        finally:
            lsock.close()
        assert up.data == b"abc"


async def test_drop_on_connect_resets(policy: Policy) -> None:
    policy.on_connect()(lambda conn: Drop())
    async with upstream_server() as up, running_proxy(policy, upstream=up.addr) as proxy:
        sock = await connect(proxy.addr)
        await expect_closed(sock, reset=True)
        sock.close()
        assert up.accepted == 0
        assert proxy.handle.stats.verdicts["drop"] == 1


async def test_close_on_connect_fin(policy: Policy) -> None:
    policy.on_connect()(lambda conn: Close())
    async with running_proxy(policy) as proxy:
        sock = await connect(proxy.addr)
        await expect_closed(sock, reset=False)
        sock.close()


async def test_redirect_on_connect_with_filters(policy: Policy) -> None:
    async with upstream_server(lambda d: b"A:" + d) as a, upstream_server(lambda d: b"B:" + d) as b:
        # First matching rule wins; the port filter matches the ORIGINAL destination port.
        policy.on_connect(ports="1-65535", addrs="10.0.0.0/8")(lambda c: Drop())  # never matches
        policy.on_connect(addrs="127.0.0.0/8", proto="tcp")(lambda c: Redirect(b.addr))
        policy.on_connect()(lambda c: Drop())
        async with running_proxy(policy, upstream=a.addr) as proxy:
            sock = await connect(proxy.addr)
            await sendall(sock, b"x")
            assert await recv_exactly(sock, 3) == b"B:x"
            sock.close()
        assert a.accepted == 0


async def test_async_connect_callback(policy: Policy) -> None:
    @policy.on_connect()
    async def slow_but_ok(conn: Connection) -> Pass:
        await trio.sleep(0.01)
        conn.state["seen"] = True
        return Pass()

    async with running_proxy(policy) as proxy:
        sock = await connect(proxy.addr)
        await sendall(sock, b"ping")
        assert await recv_exactly(sock, 4) == b"ping"
        sock.close()


def _line_policy(
    policy: Policy, decide, direction: Direction | None = Direction.TO_UPSTREAM
) -> list[Message]:
    seen: list[Message] = []

    @policy.on_message(framer=LineFramer(), direction=direction)
    def cb(conn: Connection, msg: Message):
        seen.append(msg)
        return decide(msg)

    return seen


async def _exchange(proxy_addr, chunks: list[bytes]) -> bytes:
    """Send chunks, half-close, return everything received until EOF."""
    sock = await connect(proxy_addr)
    with sock:
        for chunk in chunks:
            await sendall(sock, chunk)
            await trio.sleep(0)
        sock.shutdown(socket.SHUT_WR)
        return await recv_all(sock)


async def test_message_drop_byte_exact(policy: Policy) -> None:
    seen = _line_policy(policy, lambda m: Drop() if b"secret" in m.data else Pass())
    async with upstream_server(reply=None) as up, running_proxy(policy, upstream=up.addr) as proxy:
        # Messages split across writes, and several in one write.
        chunks = [b"one\nsec", b"ret two\nth", b"r", b"ee\nfour\nsecret\nfive"]
        assert await _exchange(proxy.addr, chunks) == b""
        with trio.fail_after(TIMEOUT):
            await up.done.wait()
        assert up.data == b"one\nthree\nfour\nfive"
        assert up.eof == [True]
    assert [m.data for m in seen] == [b"one\n", b"secret two\n", b"three\n", b"four\n", b"secret\n", b"five"]
    assert [m.index for m in seen] == [0, 1, 2, 3, 4, 5]
    assert all(m.direction is Direction.TO_UPSTREAM for m in seen)


async def test_message_rewrite_both_directions(policy: Policy) -> None:
    @policy.on_message(framer=LineFramer())
    def cb(conn: Connection, msg: Message):
        if msg.direction is Direction.TO_UPSTREAM:
            return Rewrite(msg.data.replace(b"cat", b"dog"))
        return Rewrite(b"<" + msg.data.rstrip(b"\n") + b">\n")

    async with upstream_server() as up, running_proxy(policy, upstream=up.addr) as proxy:
        got = await _exchange(proxy.addr, [b"a cat\nno", b" cat here\n"])
        assert up.data == b"a dog\nno dog here\n"
        assert got == b"<A DOG>\n<NO DOG HERE>\n"


async def test_message_redirect_one_message(policy: Policy) -> None:
    async with (
        upstream_server(lambda d: b"main:" + d) as main,
        upstream_server(lambda d: b"other:" + d) as other,
    ):
        _line_policy(policy, lambda m: Redirect(other.addr) if m.data.startswith(b"to-other") else Pass())
        async with running_proxy(policy, upstream=main.addr) as proxy:
            sock = await connect(proxy.addr)
            with sock:
                await sendall(sock, b"first\n")
                assert await recv_exactly(sock, 11) == b"main:first\n"
                await sendall(sock, b"to-other\n")
                assert await recv_exactly(sock, 15) == b"other:to-other\n"
                await sendall(sock, b"last\n")
                assert await recv_exactly(sock, 10) == b"main:last\n"
                sock.shutdown(socket.SHUT_WR)
                assert await recv_all(sock) == b""
        assert main.data == b"first\nlast\n"
        assert other.data == b"to-other\n"
        assert main.eof == [True] and other.eof == [True]


async def test_message_close(policy: Policy) -> None:
    _line_policy(policy, lambda m: Close() if m.data == b"quit\n" else Pass())
    async with upstream_server() as up, running_proxy(policy, upstream=up.addr) as proxy:
        sock = await connect(proxy.addr)
        with sock:
            await sendall(sock, b"hi\n")
            assert await recv_exactly(sock, 3) == b"HI\n"
            await sendall(sock, b"quit\nnever\n")
            await expect_closed(sock)
        with trio.fail_after(TIMEOUT):
            await up.done.wait()
        assert up.data == b"hi\n"


async def test_to_client_drop_and_direction_filter(policy: Policy) -> None:
    seen = _line_policy(policy, lambda m: Drop() if b"HIDE" in m.data else Pass(), Direction.TO_CLIENT)
    async with upstream_server() as up, running_proxy(policy, upstream=up.addr) as proxy:
        got = await _exchange(proxy.addr, [b"show\nhide\nshow again\n"])
        assert got == b"SHOW\nSHOW AGAIN\n"
        assert up.data == b"show\nhide\nshow again\n"
    assert all(m.direction is Direction.TO_CLIENT for m in seen)


async def test_message_too_large_closes_with_log(policy: Policy, caplog: pytest.LogCaptureFixture) -> None:
    _line_policy(policy, lambda m: Pass())
    async with (
        upstream_server(reply=None) as up,
        running_proxy(policy, upstream=up.addr, max_message_size=16) as p,
    ):
        sock = await connect(p.addr)
        with sock:
            await sendall(sock, b"short\n" + b"x" * 17)
            await expect_closed(sock, reset=True)
        with trio.fail_after(TIMEOUT):
            await up.done.wait()
        assert up.data == b"short\n"
    assert any("MessageTooLarge" in r.getMessage() for r in caplog.records if r.name == "sockpolicy.proxy")


async def test_raising_callback_closes_only_its_connection(
    policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    @policy.on_message(framer=LineFramer(), direction=Direction.TO_UPSTREAM)
    def cb(conn: Connection, msg: Message):
        if msg.data == b"boom\n":
            raise RuntimeError("callback exploded")
        return Pass()

    async with upstream_server() as up, running_proxy(policy, upstream=up.addr) as proxy:
        good = await connect(proxy.addr)
        bad = await connect(proxy.addr)
        with good, bad:
            await sendall(good, b"a\n")
            assert await recv_exactly(good, 2) == b"A\n"
            await sendall(bad, b"boom\n")
            await expect_closed(bad, reset=True)
            await sendall(good, b"b\n")
            assert await recv_exactly(good, 2) == b"B\n"
        assert proxy.handle.stats.errors == 1
    assert any(
        "callback exploded" in r.getMessage() or (r.exc_info and "exploded" in str(r.exc_info[1]))
        for r in caplog.records
        if r.name == "sockpolicy.proxy"
    )


async def test_non_verdict_return_closes(policy: Policy) -> None:
    policy.on_connect()(lambda conn: None)
    async with running_proxy(policy) as proxy:
        sock = await connect(proxy.addr)
        await expect_closed(sock, reset=True)
        sock.close()


async def test_inspect_timeout_applies_default(policy: Policy, caplog: pytest.LogCaptureFixture) -> None:
    @policy.on_message(framer=LineFramer(), direction=Direction.TO_UPSTREAM)
    async def cb(conn: Connection, msg: Message):
        if msg.data.startswith(b"slow"):
            await trio.sleep(10)
        return Pass()

    async with upstream_server(reply=None) as up:
        async with running_proxy(policy, upstream=up.addr, inspect_timeout=0.05) as proxy:
            assert await _exchange(proxy.addr, [b"a\nslow\nb\n"]) == b""
            assert proxy.handle.stats.inspect_timeouts == 1
        assert up.data == b"a\nb\n"  # default Drop() dropped only the slow message
        async with running_proxy(
            policy, upstream=up.addr, inspect_timeout=0.05, inspect_default=Pass()
        ) as proxy:
            await _exchange(proxy.addr, [b"slow2\n"])
        with trio.fail_after(TIMEOUT):
            while up.data != b"a\nb\nslow2\n":
                await trio.sleep(0.01)
    assert any("timed out" in r.getMessage() for r in caplog.records)


async def test_sync_callback_overrun_applies_default(policy: Policy) -> None:
    @policy.on_connect()
    def slow(conn: Connection) -> Pass:
        time.sleep(0.1)  # blocks the loop; cannot be interrupted, but its verdict is replaced
        return Pass()

    async with running_proxy(policy, inspect_timeout=0.02) as proxy:
        sock = await connect(proxy.addr)
        await expect_closed(sock, reset=True)  # inspect_default Drop()
        sock.close()
        assert proxy.handle.stats.inspect_timeouts == 1
        assert proxy.handle.stats.verdicts == {"drop": 1}


async def test_connect_refused_resets_client_quickly(policy: Policy) -> None:
    dead = tcp_listener()
    addr = dead.getsockname()
    dead.close()  # nothing listens there any more: connection refused
    async with running_proxy(policy, upstream=addr) as proxy:
        with trio.fail_after(1):
            sock = await connect(proxy.addr)
            await expect_closed(sock, reset=True)
            sock.close()
        assert proxy.handle.stats.errors == 1


async def test_connect_timeout(policy: Policy) -> None:
    # A listener that never accepts, with its tiny backlog already full: SYNs go unanswered.
    full = tcp_listener(backlog=0)
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(full.getsockname())
            fillers.append(s)
        async with running_proxy(policy, upstream=full.getsockname(), connect_timeout=0.2) as proxy:
            with trio.fail_after(2):
                t0 = trio.current_time()
                sock = await connect(proxy.addr)
                await expect_closed(sock, reset=True)
                sock.close()
                assert trio.current_time() - t0 >= 0.15
    finally:
        for s in fillers:
            s.close()
        full.close()


async def test_half_close_client_first(policy: Policy) -> None:
    async def trailer(sock) -> None:
        await sendall(sock, b"BYE")

    async with upstream_server(on_eof=trailer) as up, running_proxy(policy, upstream=up.addr) as proxy:
        # Client shuts down its write side and still receives the full reply, trailer included.
        assert await _exchange(proxy.addr, [b"abc", b"def"]) == b"ABCDEFBYE"
        assert up.eof == [True]


async def test_half_close_upstream_first(policy: Policy) -> None:
    # Upstream sends a greeting and closes its write side; the client can still send.
    lsock = trio.socket.from_stdlib_socket(tcp_listener())
    got = bytearray()

    async def server() -> None:
        sock, _ = await lsock.accept()
        with sock:
            await sendall(sock, b"greeting")
            sock.shutdown(socket.SHUT_WR)
            while data := await sock.recv(100):
                got.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        async with running_proxy(policy, upstream=lsock.getsockname()) as proxy:
            sock = await connect(proxy.addr)
            with sock:
                assert await recv_all(sock) == b"greeting"  # EOF relayed
                await sendall(sock, b"still talking")
                sock.shutdown(socket.SHUT_WR)
                with trio.fail_after(TIMEOUT):
                    while bytes(got) != b"still talking":
                        await trio.sleep(0.01)
    lsock.close()


async def test_upstream_rst_becomes_client_rst(policy: Policy) -> None:
    lsock = trio.socket.from_stdlib_socket(tcp_listener())

    async def server() -> None:
        sock, _ = await lsock.accept()
        assert await sock.recv(100) == b"trigger"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        async with running_proxy(policy, upstream=lsock.getsockname()) as proxy:
            sock = await connect(proxy.addr)
            with sock:
                await sendall(sock, b"trigger")
                await expect_closed(sock, reset=True)
    lsock.close()


async def test_idle_timeout(policy: Policy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sockpolicy.proxy")
    async with running_proxy(policy, idle_timeout=0.2) as proxy:
        sock = await connect(proxy.addr)
        with sock:
            await sendall(sock, b"x")
            assert await recv_exactly(sock, 1) == b"x"
            await expect_closed(sock)
        assert proxy.handle.stats.connections_closed == 1
    assert any("idle" in r.getMessage() for r in caplog.records)


async def test_graceful_drain(policy: Policy) -> None:
    async with running_proxy(policy) as proxy:
        early = await connect(proxy.addr)
        await sendall(early, b"a")
        assert await recv_exactly(early, 1) == b"a"
        proxy.handle.stop(grace=5)
        await trio.sleep(0.05)
        # The live connection keeps working during the drain ...
        await sendall(early, b"b")
        assert await recv_exactly(early, 1) == b"b"
        # ... while a new one is not served (it sits in the backlog; nobody accepts it).
        late = await connect(proxy.addr)
        with trio.move_on_after(0.2):
            await sendall(late, b"z")
            await late.recv(1)
            raise AssertionError("a connection was served after stop()")
        assert not proxy.handle.finished
        early.shutdown(socket.SHUT_WR)
        assert await recv_all(early) == b""
        early.close()
        late.close()
        with trio.fail_after(TIMEOUT):
            await proxy.handle._done.wait()
        assert proxy.handle.stats.connections_active == 0


async def test_drain_deadline_cancels(policy: Policy) -> None:
    async with running_proxy(policy) as proxy:
        sock = await connect(proxy.addr)
        with sock:
            await sendall(sock, b"a")
            assert await recv_exactly(sock, 1) == b"a"
            with trio.fail_after(2):
                await proxy.handle.aclose(grace=0.1)
            await expect_closed(sock)


async def test_http_framer_end_to_end(policy: Policy) -> None:
    seen: list[tuple[Direction, bytes]] = []

    @policy.on_message(framer=HttpHeadFramer())
    def cb(conn: Connection, msg: Message):
        seen.append((msg.direction, msg.data))
        if msg.direction is Direction.TO_UPSTREAM and msg.data.startswith(b"GET"):
            return Rewrite(msg.data.replace(b"Host: a", b"Host: b"))
        return Pass()

    responses = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"  # answers HEAD: no body
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )

    async def reply(sock) -> None:
        await sendall(sock, responses)

    requests = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    async with (
        upstream_server(reply=None, on_eof=reply) as up,
        running_proxy(policy, upstream=up.addr) as proxy,
    ):
        # Requests in 3-byte writes: framing must not depend on how the bytes arrive.
        got = await _exchange(proxy.addr, [requests[i : i + 3] for i in range(0, len(requests), 3)])
        assert got == responses
        assert up.data == requests.replace(b"GET /x HTTP/1.1\r\nHost: a", b"GET /x HTTP/1.1\r\nHost: b")
    assert seen == [
        (Direction.TO_UPSTREAM, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"),
        (Direction.TO_UPSTREAM, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"),
        (Direction.TO_CLIENT, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        (Direction.TO_CLIENT, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        (Direction.TO_CLIENT, b"3\r\nabc\r\n"),
        (Direction.TO_CLIENT, b"0\r\n\r\n"),
    ]


async def test_length_prefix_framer_end_to_end(policy: Policy) -> None:
    frames = [len(p).to_bytes(2, "big") + p for p in (b"keep", b"DROPME", b"", b"x" * 300)]
    policy.on_message(framer=LengthPrefixFramer(), direction=Direction.TO_UPSTREAM)(
        lambda c, m: Drop() if b"DROPME" in m.data else Pass()
    )
    async with upstream_server(reply=None) as up, running_proxy(policy, upstream=up.addr) as proxy:
        data = b"".join(frames)
        await _exchange(proxy.addr, [data[i : i + 1] for i in range(len(data))])
        with trio.fail_after(TIMEOUT):
            await up.done.wait()
        assert up.data == frames[0] + frames[2] + frames[3]
