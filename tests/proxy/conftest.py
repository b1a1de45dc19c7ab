"""Helpers for the proxy tests: loopback listeners, tiny upstream servers, raw trio clients.

Everything binds to 127.0.0.1 or ::1 only, port 0.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from sockpolicy.proxy import Policy, ServeHandle, serve

V4 = "127.0.0.1"
V6 = "::1"
TIMEOUT = 5.0


def tcp_listener(host: str = V4, backlog: int = 64) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock


def udp_socket(host: str = V4) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


@dataclass
class Proxy:
    handle: ServeHandle
    tcp: list[tuple[str, int]] = field(default_factory=list)
    udp: list[tuple[str, int]] = field(default_factory=list)

    @property
    def addr(self) -> tuple[str, int]:
        return (self.tcp or self.udp)[0]


@asynccontextmanager
async def running_proxy(
    policy: Policy, *, tcp: tuple[str, ...] = (V4,), udp: tuple[str, ...] = (), **kwargs: Any
) -> AsyncIterator[Proxy]:
    """Serve ``policy`` on fresh loopback sockets; cancel and close everything on exit."""
    tsocks = [tcp_listener(h) for h in tcp]
    usocks = [udp_socket(h) for h in udp]
    try:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                lambda task_status: serve(
                    policy, tcp_sockets=tsocks, udp_sockets=usocks, task_status=task_status, **kwargs
                )
            )
            yield Proxy(handle, [s.getsockname()[:2] for s in tsocks], [s.getsockname()[:2] for s in usocks])
            nursery.cancel_scope.cancel()
    finally:
        for s in tsocks + usocks:
            s.close()


@dataclass
class Upstream:
    """A loopback TCP server recording, per connection, every byte it received."""

    addr: tuple[str, int]
    received: list[bytearray] = field(default_factory=list)
    eof: list[bool] = field(default_factory=list)
    accepted: int = 0
    connected: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def data(self) -> bytes:
        return b"".join(bytes(b) for b in self.received)


Reply = Callable[[bytes], bytes]


@asynccontextmanager
async def upstream_server(
    reply: Reply | None = bytes.upper,
    *,
    host: str = V4,
    on_eof: Callable[[trio.socket.SocketType], Awaitable[None]] | None = None,
) -> AsyncIterator[Upstream]:
    """Start an upstream: sends ``reply(chunk)`` for each chunk received (None: silent).

    At client EOF it calls ``on_eof(sock)`` if given (e.g. send a trailer), then closes.
    """
    lsock = trio.socket.from_stdlib_socket(tcp_listener(host))
    up = Upstream(lsock.getsockname()[:2])

    async def handle(sock: trio.socket.SocketType) -> None:
        with sock:
            buf = bytearray()
            up.received.append(buf)
            up.eof.append(False)
            i = len(up.eof) - 1
            up.connected.set()
            try:
                while True:
                    data = await sock.recv(65536)
                    if not data:
                        up.eof[i] = True
                        if on_eof is not None:
                            await on_eof(sock)
                        break
                    buf += data
                    if reply is not None and (out := reply(data)):
                        await sendall(sock, out)
            except OSError:
                pass
            finally:
                up.done.set()

    async with trio.open_nursery() as nursery:

        async def accept_loop() -> None:
            while True:
                sock, _ = await lsock.accept()
                up.accepted += 1
                nursery.start_soon(handle, sock)

        nursery.start_soon(accept_loop)
        try:
            yield up
        finally:
            nursery.cancel_scope.cancel()
            lsock.close()


async def connect(addr: tuple[str, int]) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(addr)
    return sock


async def sendall(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray()
    with trio.fail_after(TIMEOUT):
        while len(buf) < n:
            data = await sock.recv(n - len(buf))
            if not data:
                raise AssertionError(f"EOF after {bytes(buf)!r}, wanted {n} bytes")
            buf += data
    return bytes(buf)


async def recv_all(sock: trio.socket.SocketType) -> bytes:
    """Read until EOF (a reset raises ConnectionResetError)."""
    buf = bytearray()
    with trio.fail_after(TIMEOUT):
        while data := await sock.recv(65536):
            buf += data
    return bytes(buf)


async def expect_closed(sock: trio.socket.SocketType, *, reset: bool | None = None) -> None:
    """Assert the peer closed: EOF (``reset=False``), RST (``reset=True``) or either (``None``)."""
    with trio.fail_after(TIMEOUT):
        try:
            data = await sock.recv(65536)
        except ConnectionResetError:
            assert reset is not False, "expected a clean EOF, got a reset"
            return
    assert data == b"", f"expected the connection to be closed, got {data!r}"
    assert reset is not True, "expected a reset, got a clean EOF"


@pytest.fixture
def policy() -> Policy:
    return Policy()
