"""UDP: echo from the original destination, per-flow upstream association, verdicts, idle expiry."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from sockpolicy.proxy import Connection, Direction, Drop, Message, Pass, Policy, Redirect, Rewrite
from sockpolicy.proxy._udp import parse_orig_dst

from .conftest import TIMEOUT, V4, V6, running_proxy


def udp_client(host: str = V4) -> trio.socket.SocketType:
    return trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)


async def recvfrom(sock: trio.socket.SocketType, timeout: float = TIMEOUT) -> tuple[bytes, tuple[str, int]]:
    with trio.fail_after(timeout):
        data, addr = await sock.recvfrom(65536)
    return data, addr[:2]


async def no_datagram(sock: trio.socket.SocketType, wait: float = 0.2) -> None:
    with trio.move_on_after(wait):
        data = await sock.recv(65536)
        raise AssertionError(f"unexpected datagram {data!r}")


@dataclass
class UdpUpstream:
    addr: tuple[str, int]
    received: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)


@asynccontextmanager
async def udp_upstream(prefix: bytes = b"", host: str = V4) -> AsyncIterator[UdpUpstream]:
    """Replies prefix + upper-cased datagram to its sender; records (data, sender)."""
    sock = udp_client(host)
    await sock.bind((host, 0))
    up = UdpUpstream(sock.getsockname()[:2])

    async def loop() -> None:
        while True:
            data, addr = await sock.recvfrom(65536)
            up.received.append((data, addr[:2]))
            await sock.sendto(prefix + data.upper(), addr)

    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop)
            yield up
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("host", [V4, V6])
async def test_echo_from_original_dst(policy: Policy, host: str, caplog: pytest.LogCaptureFixture) -> None:
    flows: list[Connection] = []
    policy.on_connect()(lambda c: flows.append(c) or Pass())
    async with running_proxy(policy, tcp=(), udp=(host,)) as proxy:
        with udp_client(host) as client:
            for payload in (b"one", b"two", b"x" * 2000):
                await client.sendto(payload, proxy.addr)
                assert await recvfrom(client) == (payload, proxy.addr)
    [conn] = flows  # on_connect once per flow
    assert conn.proto == "udp"
    assert conn.original_dst == proxy.addr
    assert conn.client[0] == host
    assert proxy.handle.stats.bytes_to_client == 3 + 3 + 2000
    # Replies left from the per-flow reply socket, not from the served socket's fallback path.
    assert not [r for r in caplog.records if "reply socket" in r.getMessage()]


async def test_pass_to_upstream_per_flow_association(policy: Policy) -> None:
    async with udp_upstream() as up, running_proxy(policy, tcp=(), udp=(V4,), upstream=up.addr) as proxy:
        with udp_client() as a, udp_client() as b:
            await a.sendto(b"a1", proxy.addr)
            assert await recvfrom(a) == (b"A1", proxy.addr)
            await b.sendto(b"b1", proxy.addr)
            assert await recvfrom(b) == (b"B1", proxy.addr)
            await a.sendto(b"a2", proxy.addr)
            assert await recvfrom(a) == (b"A2", proxy.addr)
        data = [d for d, _ in up.received]
        assert data == [b"a1", b"b1", b"a2"]
        src = {d: s for d, s in up.received}
        # One upstream socket per flow: a's datagrams share a source, b's differs.
        assert src[b"a1"] == src[b"a2"] != src[b"b1"]
        assert proxy.handle.stats.connections_accepted == 2


async def test_flow_idle_expiry(policy: Policy) -> None:
    flows: list[Connection] = []
    policy.on_connect()(lambda c: flows.append(c) or Pass())
    async with (
        udp_upstream() as up,
        running_proxy(policy, tcp=(), udp=(V4,), upstream=up.addr, udp_flow_timeout=0.2) as proxy,
    ):
        with udp_client() as client:
            await client.sendto(b"first", proxy.addr)
            assert await recvfrom(client) == (b"FIRST", proxy.addr)
            with trio.fail_after(TIMEOUT):
                while proxy.handle.stats.connections_closed < 1:
                    await trio.sleep(0.05)
            await client.sendto(b"second", proxy.addr)
            assert await recvfrom(client) == (b"SECOND", proxy.addr)
        assert len(flows) == 2 and flows[0].id != flows[1].id
        assert up.received[0][1] != up.received[1][1]  # a fresh upstream socket for the new flow


async def test_drop_on_connect(policy: Policy) -> None:
    policy.on_connect()(lambda c: Drop())
    async with udp_upstream() as up, running_proxy(policy, tcp=(), udp=(V4,), upstream=up.addr) as proxy:
        with udp_client() as client:
            await client.sendto(b"nope", proxy.addr)
            await client.sendto(b"nope again", proxy.addr)
            await no_datagram(client)
        assert up.received == []
        assert proxy.handle.stats.verdicts["drop"] == 1  # once per flow, not per datagram


async def test_message_verdicts(policy: Policy) -> None:
    async with (
        udp_upstream() as main,
        udp_upstream(prefix=b"other:") as other,
    ):
        seen: list[Message] = []

        @policy.on_message(proto="udp", direction=Direction.TO_UPSTREAM)
        def cb(conn: Connection, msg: Message):
            seen.append(msg)
            if msg.data == b"drop":
                return Drop()
            if msg.data == b"rewrite":
                return Rewrite(b"rewritten")
            if msg.data == b"redirect":
                return Redirect(other.addr)
            return Pass()

        async with running_proxy(policy, tcp=(), udp=(V4,), upstream=main.addr) as proxy:
            with udp_client() as client:
                await client.sendto(b"drop", proxy.addr)
                await client.sendto(b"rewrite", proxy.addr)
                assert await recvfrom(client) == (b"REWRITTEN", proxy.addr)
                await client.sendto(b"redirect", proxy.addr)
                assert await recvfrom(client) == (b"other:REDIRECT", proxy.addr)
                await client.sendto(b"plain", proxy.addr)
                assert await recvfrom(client) == (b"PLAIN", proxy.addr)
        assert [d for d, _ in main.received] == [b"rewritten", b"plain"]
        assert [d for d, _ in other.received] == [b"redirect"]
        assert [m.index for m in seen] == [0, 1, 2, 3]


async def test_to_client_rewrite(policy: Policy) -> None:
    policy.on_message(direction=Direction.TO_CLIENT)(lambda c, m: Rewrite(m.data[::-1]))
    async with running_proxy(policy, tcp=(), udp=(V4,)) as proxy:
        with udp_client() as client:
            await client.sendto(b"abc", proxy.addr)
            assert await recvfrom(client) == (b"cba", proxy.addr)


async def test_raising_callback_ends_only_its_flow(policy: Policy) -> None:
    @policy.on_message(direction=Direction.TO_UPSTREAM)
    def cb(conn: Connection, msg: Message):
        if msg.data == b"boom":
            raise RuntimeError("exploded")
        return Pass()

    async with running_proxy(policy, tcp=(), udp=(V4,)) as proxy:
        with udp_client() as good, udp_client() as bad:
            await good.sendto(b"g1", proxy.addr)
            assert await recvfrom(good) == (b"g1", proxy.addr)
            await bad.sendto(b"boom", proxy.addr)
            with trio.fail_after(TIMEOUT):
                while proxy.handle.stats.errors < 1:
                    await trio.sleep(0.01)
            await good.sendto(b"g2", proxy.addr)
            assert await recvfrom(good) == (b"g2", proxy.addr)
            # The failed flow is forgotten; the next datagram starts a new, working one.
            await bad.sendto(b"fine", proxy.addr)
            assert await recvfrom(bad) == (b"fine", proxy.addr)


def test_parse_orig_dst() -> None:
    sin = (
        struct.pack("=H", socket.AF_INET) + struct.pack("!H", 5353) + socket.inet_aton("127.0.0.9") + bytes(8)
    )
    assert parse_orig_dst([(socket.SOL_IP, 20, sin)]) == ("127.0.0.9", 5353)
    sin6 = (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", 853, 0)
        + socket.inet_pton(socket.AF_INET6, "::1")
        + struct.pack("=I", 0)
    )
    assert parse_orig_dst([(socket.IPPROTO_IPV6, 74, sin6)]) == ("::1", 853)
    mapped = sin6[:8] + socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1") + sin6[24:]
    assert parse_orig_dst([(socket.IPPROTO_IPV6, 74, mapped)]) == ("127.0.0.1", 853)
    assert parse_orig_dst([]) is None
