"""Minimal byte-stream endpoints for the TCP relay: a real socket and the built-in echo service.

We use raw trio sockets rather than :class:`trio.SocketStream` because the relay must see the real
:exc:`OSError` (``ECONNRESET`` is turned into an RST towards the other side) and must be able to
close with ``SO_LINGER`` 0.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import trio

__all__ = ["EchoStream", "SockStream", "abort_socket"]

_LINGER_RST = struct.pack("ii", 1, 0)


def abort_socket(sock: trio.socket.SocketType | socket.socket) -> None:
    """Close ``sock`` with an RST (``SO_LINGER`` on, timeout 0); never raises."""
    with contextlib.suppress(OSError):  # already dead: close() below is all we can do
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class SockStream:
    """A connected TCP socket.  Owns the socket: :meth:`close` closes it.

    The relay's hot path: reads and writes go straight to the (non-blocking) socket and only wait for
    readiness when the kernel says ``EAGAIN``; a successful call does not yield to the trio scheduler,
    so :meth:`receive` yields itself every few reads that did not have to wait.  :meth:`receive` is
    cancellation-safe: once it has read bytes it returns them, whatever was cancelled meanwhile.
    """

    #: Reads in a row that did not wait before :meth:`receive` yields anyway (fairness, cancellation).
    YIELD_EVERY = 4

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        raw = getattr(sock, "_sock", None)  # the stdlib socket under trio's wrapper
        self._raw: socket.socket | None = raw if isinstance(raw, socket.socket) else None
        self._fd = sock.fileno()
        self._more = False  # the last read filled half its buffer: more is probably queued, try first
        self._unyielded = 0
        # Messages are forwarded one by one right after their verdict; Nagle would delay them.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def receive(self, max_bytes: int) -> bytes:
        """Read up to ``max_bytes``; ``b""`` at EOF.  :raises OSError: e.g. ConnectionResetError."""
        raw = self._raw
        if raw is None:
            return await self.sock.recv(max_bytes)
        if self._more:
            # Streaming: the data is most likely there already; a read costs less than a wait.
            try:
                data = raw.recv(max_bytes)
            except BlockingIOError:
                pass
            else:
                self._more = len(data) >= max_bytes >> 1
                self._unyielded += 1
                if self._unyielded >= self.YIELD_EVERY:
                    self._unyielded = 0
                    # Shielded: the bytes are already out of the socket, so a cancellation here (the
                    # relay's wake scope, see _tcp._receive) would lose them.  It takes effect at the
                    # next wait instead.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        # Request/response: nothing is queued yet; wait first rather than read EAGAIN.
        self._unyielded = 0
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                data = raw.recv(max_bytes)
            except BlockingIOError:
                continue
            self._more = len(data) >= max_bytes >> 1
            return data

    def send_now(self, data: bytes | memoryview) -> int:
        """Write what the socket takes without waiting; return how many bytes that was (0: buffer full).

        :raises OSError: e.g. BrokenPipeError, ConnectionResetError.
        """
        if self._raw is None:
            return 0
        try:
            return self._raw.send(data)
        except BlockingIOError:
            return 0

    def recv_now(self, max_bytes: int) -> bytes | None:
        """Read what is queued, up to ``max_bytes``, without waiting and without yielding; ``None`` if
        nothing is (``b""`` at EOF).  :raises OSError: e.g. ConnectionResetError."""
        assert self._raw is not None, "trio's socket wrapper always has the stdlib socket"
        try:
            return self._raw.recv(max_bytes, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    async def send_all(self, data: bytes | memoryview) -> None:
        """Write all of ``data``.  :raises OSError: e.g. BrokenPipeError, ConnectionResetError."""
        sent = self.send_now(data)
        if sent == len(data):
            return
        with memoryview(data) as view:
            view = view[sent:]
            while view:
                sent = await self.sock.send(view)
                view = view[sent:]

    def send_eof(self) -> None:
        """Half-close: ``shutdown(SHUT_WR)``.  Errors (peer already gone) are ignored."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self, reset: bool = False) -> None:
        """Close; with ``reset`` the peer gets an RST instead of a FIN."""
        if reset:
            abort_socket(self.sock)
        else:
            self.sock.close()


class EchoStream:
    """The built-in echo service seen as an upstream: what is sent comes back, EOF included.

    A small bounded channel gives the same back-pressure a real echo server would.
    """

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[bytes](16)

    async def receive(self, max_bytes: int) -> bytes:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return b""

    def send_now(self, data: bytes | memoryview) -> int:
        return 0  # everything goes through the channel (send_all)

    async def send_all(self, data: bytes | memoryview) -> None:
        if data:
            await self._send.send(bytes(data))

    def send_eof(self) -> None:
        self._send.close()

    def close(self, reset: bool = False) -> None:
        self._send.close()
        self._recv.close()
