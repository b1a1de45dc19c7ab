"""One proxied TCP connection: the on_connect verdict, the relay, message verdicts, half-close, RST."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from ._connection import Connection, Direction, Message, normalize_addr
from ._context import RECV_SIZE, Context, log
from ._framers import Framer, FramingError
from ._policy import _MessageRule, run_callback
from ._streams import EchoStream, SockStream
from ._verdicts import Close, Drop, Pass, Redirect, Rewrite, Verdict

__all__ = ["handle_tcp"]

Stream = SockStream | EchoStream


class _Leg:
    """One upstream of a connection (the primary one, or one opened by an on_message Redirect)."""

    def __init__(self, addr: tuple[str, int] | None, stream: Stream, framer: Framer | None) -> None:
        self.addr = addr  # None: the echo service
        self.stream = stream
        self.framer = framer  # frames upstream -> client bytes of THIS leg (each leg is its own stream)
        self.eof = False


class _End(Exception):
    """Internal: stop the session; ``reset`` chooses RST over FIN towards both peers."""

    def __init__(self, reason: str, reset: bool, error: bool = False) -> None:
        super().__init__(reason)
        self.reset = reset
        self.error = error


def _frame(framer: Framer, data: bytes) -> Iterator[bytes]:
    """Yield the messages of ``data``; on a framing error, first those completed before it."""
    try:
        messages = framer.feed(data)
    except FramingError as exc:
        # Messages before the bad one are valid and get their verdicts; then the error closes.
        yield from exc.messages
        raise
    yield from messages


async def handle_tcp(ctx: Context, sock: trio.socket.SocketType, peer: tuple[object, ...]) -> None:
    """Serve one accepted connection; owns ``sock`` and closes it before returning.

    Never raises for anything the peers or the policy callbacks do; only cancellation propagates.
    """
    try:
        conn = Connection("tcp", normalize_addr(peer), normalize_addr(sock.getsockname()), ctx.label)
    except OSError:  # the client already reset before we looked at it
        sock.close()
        return
    await _TcpSession(ctx, conn, SockStream(sock)).run()


class _TcpSession:
    def __init__(self, ctx: Context, conn: Connection, client: SockStream) -> None:
        self.ctx = ctx
        self.conn = conn
        self.client = client
        self.legs: dict[tuple[str, int] | None, _Leg] = {}
        self.primary: _Leg | None = None
        self.up_rule: _MessageRule | None = None
        self.down_rule: _MessageRule | None = None
        self.up_framer: Framer | None = None
        self.index = {Direction.TO_UPSTREAM: 0, Direction.TO_CLIENT: 0}
        self.client_lock = trio.Lock()  # several legs may write to the client; keep messages whole
        self.scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.end: _End | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self) -> None:
        stats = self.ctx.stats
        stats.connections_accepted += 1
        stats.connections_active += 1
        stats.conn_opened(self.conn, self.client.sock)  # ops: close summary / periodic log line
        reset = True  # until we know better, a failure leaves the client with an RST
        try:
            await self._setup()
            with self.scope:
                self._touch()
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._guard, self._pump_client)
                    for leg in list(self.legs.values()):
                        nursery.start_soon(self._guard, self._pump_leg, leg)
            if self.end is not None:
                reset = self.end.reset
                level = log.warning if self.end.error else log.info
                level("%r: closing: %s", self.conn, self.end)
                if self.end.error:
                    stats.errors += 1
            elif self.scope.cancelled_caught:
                reset = False
                log.info("%r: closing: idle for %gs", self.conn, self.ctx.idle_timeout)
            else:
                reset = False
                log.debug("%r: finished", self.conn)
        except _End as end:  # raised by _setup: refused before any relaying
            self.end = end  # ops: the close summary names the reason
            reset = end.reset
            if end.error:
                stats.errors += 1
            (log.warning if end.error else log.info)("%r: closing: %s", self.conn, end)
        finally:
            # Cancellation (server shutdown) also lands here: always release every socket.
            stats.conn_closed(self.conn, self.end, reset)  # ops: before close, TCP_INFO still readable
            self.client.close(reset=reset)
            for leg in self.legs.values():
                leg.stream.close(reset=reset)
            stats.connections_active -= 1
            stats.connections_closed += 1

    async def _setup(self) -> None:
        """on_connect verdict, framers, primary upstream.  :raises _End: to refuse the connection."""
        ctx, conn = self.ctx, self.conn
        rule = ctx.policy._connect_rule(conn)
        verdict: Verdict = Pass()
        if rule is not None:
            try:
                verdict = await self._callback(rule.fn, (conn,), "on_connect")
            except Exception as exc:
                log.exception("%r: on_connect callback failed", conn)
                raise _End(f"{type(exc).__name__}: {exc}", reset=True, error=True) from None
        ctx.stats.count_verdict(verdict)
        if isinstance(verdict, Drop):
            raise _End("on_connect verdict Drop", reset=True)
        if isinstance(verdict, Close):
            raise _End("on_connect verdict Close", reset=False)
        if isinstance(verdict, Rewrite):
            raise _End("on_connect returned Rewrite, which only applies to messages", True, error=True)
        if verdict.splice:
            log.debug("%r: splice=True is reserved for kernel splicing; ignored", conn)
        target = verdict.addr if isinstance(verdict, Redirect) else ctx.upstream_for(conn.original_dst)

        self.up_rule = ctx.policy._message_rule(conn, Direction.TO_UPSTREAM)
        self.down_rule = ctx.policy._message_rule(conn, Direction.TO_CLIENT)
        down_framer: Framer | None = None
        if self.up_rule is not None and self.up_rule is self.down_rule:
            # One callback sees both directions: let the framer link its halves (HTTP HEAD etc.).
            up, down = self.up_rule.framer.pair()
            self.up_framer, down_framer = ctx.fill_max(up), ctx.fill_max(down)
        else:
            if self.up_rule is not None:
                self.up_framer = ctx.new_framer(self.up_rule.framer)
            if self.down_rule is not None:
                down_framer = ctx.new_framer(self.down_rule.framer)
        self.primary = await self._open_leg(target, down_framer)
        conn.upstream = target

    async def _open_leg(self, addr: tuple[str, int] | None, framer: Framer | None) -> _Leg:
        """Connect to ``addr`` (``None``: echo).  :raises _End: on failure or connect_timeout."""
        if addr is None:
            leg = _Leg(None, EchoStream(), framer)
        else:
            try:
                with trio.fail_after(self.ctx.connect_timeout):
                    stream = await trio.open_tcp_stream(*addr)
            except trio.TooSlowError as exc:
                self.ctx.stats.upstream_failed(exc)  # ops: metrics counter
                raise _End(f"upstream {addr} connect timed out", reset=True, error=True) from None
            except OSError as exc:
                self.ctx.stats.upstream_failed(exc)  # ops: metrics counter
                raise _End(f"upstream {addr} connect failed: {exc}", reset=True, error=True) from None
            leg = _Leg(addr, SockStream(stream.socket), framer)
        self.legs[addr] = leg
        return leg

    async def _leg_for(self, addr: tuple[str, int]) -> _Leg:
        """The leg for an on_message Redirect target, opened (and its reader started) on first use."""
        leg = self.legs.get(addr)
        if leg is None:
            framer = self.ctx.new_framer(self.down_rule.framer) if self.down_rule is not None else None
            leg = await self._open_leg(addr, framer)
            assert self.nursery is not None
            self.nursery.start_soon(self._guard, self._pump_leg, leg)
        return leg

    def _touch(self) -> None:
        # Idle timeout = a deadline on the whole relay, pushed forward by every byte either way.
        timeout = self.ctx.idle_timeout
        self.scope.deadline = trio.current_time() + timeout if timeout > 0 else math.inf

    async def _guard(self, pump: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a pump; turn whatever ends it abnormally into a session end (never a server crash)."""
        try:
            await pump(*args)
        except _End as end:
            self._finish(end)
        except (ConnectionResetError, BrokenPipeError) as exc:
            self._finish(_End(f"peer reset ({exc.strerror or exc})", reset=True))
        except FramingError as exc:
            self._finish(_End(f"{type(exc).__name__}: {exc}", reset=True, error=True))
        except OSError as exc:
            self._finish(_End(f"I/O error: {exc}", reset=True, error=True))
        except Exception as exc:
            log.exception("%r: callback or relay error", self.conn)
            self._finish(_End(f"{type(exc).__name__}: {exc}", reset=True, error=True))

    def _finish(self, end: _End) -> None:
        if self.end is None:  # the first reason wins; later ones are consequences
            self.end = end
        self.scope.cancel()

    async def _callback(self, fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> Verdict:
        ctx = self.ctx
        verdict, timed_out = await run_callback(
            fn,
            args,
            ctx.inspect_timeout,
            ctx.inspect_default,
            self.conn,
            what,
        )
        if timed_out:
            ctx.stats.inspect_timeouts += 1
        ctx.stats.count_callback(fn, verdict)  # ops: per-callback verdict metrics
        return verdict

    # -- client -> upstream ------------------------------------------------------------------------

    async def _pump_client(self) -> None:
        stats = self.ctx.stats
        framer = self.up_framer
        while True:
            data = await self.client.receive(RECV_SIZE)
            if not data:
                break
            self._touch()
            stats.bytes_from_client += len(data)
            if framer is None:
                assert self.primary is not None
                await self._send_up(self.primary, data)
            else:
                for msg in _frame(framer, data):
                    await self._message_up(msg)
        if framer is not None and (rest := framer.eof()):
            await self._message_up(rest)  # a trailing partial message is still inspected
        # Half-close: tell every upstream, keep relaying what they still send back.
        for leg in self.legs.values():
            leg.stream.send_eof()

    async def _send_up(self, leg: _Leg, data: bytes) -> None:
        await leg.stream.send_all(data)
        self.ctx.stats.bytes_to_upstream += len(data)

    async def _message_up(self, data: bytes) -> None:
        assert self.up_rule is not None and self.primary is not None
        msg = self._message(data, Direction.TO_UPSTREAM)
        verdict = await self._callback(self.up_rule.fn, (self.conn, msg), "on_message")
        self.ctx.stats.count_verdict(verdict)
        if isinstance(verdict, Pass):
            if verdict.splice:
                log.debug("%r: splice=True is reserved for kernel splicing; ignored", self.conn)
            await self._send_up(self.primary, data)
        elif isinstance(verdict, Rewrite):
            await self._send_up(self.primary, verdict.data)
        elif isinstance(verdict, Redirect):
            await self._send_up(await self._leg_for(verdict.addr), data)
        elif isinstance(verdict, Close):
            raise _End(f"on_message verdict Close (message {msg.index} to upstream)", reset=False)
        # Drop: nothing leaves.

    def _message(self, data: bytes, direction: Direction) -> Message:
        index = self.index[direction]
        self.index[direction] = index + 1
        return Message(data, direction, index, self.conn)

    # -- upstream -> client ------------------------------------------------------------------------

    async def _pump_leg(self, leg: _Leg) -> None:
        stats = self.ctx.stats
        while True:
            data = await leg.stream.receive(RECV_SIZE)
            if not data:
                break
            self._touch()
            stats.bytes_from_upstream += len(data)
            if leg.framer is None:
                await self._send_client(data)
            else:
                for msg in _frame(leg.framer, data):
                    await self._message_down(msg)
        if leg.framer is not None and (rest := leg.framer.eof()):
            await self._message_down(rest)
        leg.eof = True
        # The client's write side closes once no upstream can send anything more.
        if all(other.eof for other in self.legs.values()):
            self.client.send_eof()

    async def _send_client(self, data: bytes) -> None:
        async with self.client_lock:
            await self.client.send_all(data)
        self.ctx.stats.bytes_to_client += len(data)

    async def _message_down(self, data: bytes) -> None:
        assert self.down_rule is not None
        msg = self._message(data, Direction.TO_CLIENT)
        verdict = await self._callback(self.down_rule.fn, (self.conn, msg), "on_message")
        self.ctx.stats.count_verdict(verdict)
        if isinstance(verdict, Pass):
            if verdict.splice:
                log.debug("%r: splice=True is reserved for kernel splicing; ignored", self.conn)
            await self._send_client(data)
        elif isinstance(verdict, Rewrite):
            await self._send_client(verdict.data)
        elif isinstance(verdict, Redirect):
            raise _End("on_message returned Redirect for a message to the client", reset=True, error=True)
        elif isinstance(verdict, Close):
            raise _End(f"on_message verdict Close (message {msg.index} to client)", reset=False)
