"""One proxied TCP connection: the on_connect verdict, the relay, message verdicts, half-close, RST.

Splicing (docs/splice.md): once a verdict asks for it, both directions are handed to the kernel.  The
relay keeps running but, from then on, forwards without inspection and tells the kernel after every
write how many bytes it has forwarded (``SpliceSocket.set_forwarded``); the kernel starts redirecting
when that equals what it passed.  What is left in Python: EOF (forwarded to the peer once every
redirected byte reached the peer's write queue), RST, the idle timeout and cleanup.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from ._connection import Connection, Direction, Message, normalize_addr
from ._context import RECV_SIZE, Context, callback_name, log
from ._framers import Framer, FramingError, RawFramer
from ._policy import _MessageRule, run_callback, settle_result
from ._splice import AdoptedPair, SpliceSocket, SpliceUnavailable, bytes_received, queued_total
from ._streams import EchoStream, SockStream, abort_socket
from ._verdicts import Close, Drop, Pass, Redirect, Rewrite, Splice, Verdict, verdict_kind

__all__ = ["handle_tcp", "run_adopted_splice"]

Stream = SockStream | EchoStream

#: Receive buffer (SO_RCVBUF) of both sockets while a splice is pending.
SWITCH_RCVBUF = 32768
SO_RCVBUFFORCE = 33


def _overcount(slot: SpliceSocket, sock: trio.socket.SocketType) -> str | None:
    """Why ``slot``'s verdict cannot have seen each received byte exactly once, or ``None``.

    Every byte the verdict passed, redirected, dropped or diverted was received by TCP first, so their
    sum never exceeds ``tcpi_bytes_received`` (counters are read first: TCP's count only grows in
    between).  More means the verdict handled some bytes twice: a retransmission overlapping bytes
    already received, which the verdict normally trims (``old`` in splice.bpf.c) and flags as
    ``broken`` when it cannot.
    """
    c = slot.conn
    if c.broken:
        return f"the kernel could not trim a retransmission ({c.old} old bytes)"
    seen = c.passed + c.redirected + c.dropped + c.diverted
    received = bytes_received(sock)
    if seen > received:
        return f"the verdict handled {seen - received} bytes more than TCP received"
    return None


@functools.cache
def _full_rcvbuf() -> int:
    """The largest receive buffer TCP autotuning would grow to (tcp_rmem max)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_rmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 6 << 20


#: Tests only: awaited by each direction's pump once, after a splice request and before it first tells the
#: kernel what it has forwarded -- a window in which the kernel is PENDING and userspace lags behind.
SPLICE_SWITCH_HOOK: Callable[[], Awaitable[None]] | None = None


_KINDS = {kind: verdict_kind(kind.__new__(kind)) for kind in (Pass, Drop, Redirect, Rewrite, Close, Splice)}


def _kind(verdict: Verdict) -> str:
    """:func:`verdict_kind`, without building the string for the built-in classes."""
    return _KINDS.get(type(verdict)) or verdict_kind(verdict)


def _raw_limit(framer: Framer | None) -> int:
    """For a plain :class:`RawFramer`: its ``max_size`` (a chunk up to it is one message); else 0."""
    return framer.limit if type(framer) is RawFramer else 0


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
        self.next_up = 0  # Message.index of the next message to upstream
        self.next_down = 0  # ... and to the client
        self.client_lock = trio.Lock()  # several legs may write to the client; keep messages whole
        self.scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.end: _End | None = None
        # -- splicing --
        self.raw = False  # a splice was asked for: no more framing or callbacks, whatever the kernel does
        self.splicing = False  # ... and the kernel takes over (both slots are in MODE_PENDING or later)
        self.client_slot: SpliceSocket | None = None
        self.upstream_slot: SpliceSocket | None = None
        self.claim_failure = "splicing is not enabled (serve(splice=...))"
        self.read = {Direction.TO_UPSTREAM: 0, Direction.TO_CLIENT: 0}  # bytes received, per direction
        self.wake: dict[Direction, trio.CancelScope] = {}  # a pump's receive, cancelled to flush a framer
        self.hooked: set[Direction] = set()  # directions that ran SPLICE_SWITCH_HOOK
        self.restored: set[Direction] = set()  # directions whose receive buffer is full-size again
        self.unconsumed = {
            Direction.TO_UPSTREAM: 0,
            Direction.TO_CLIENT: 0,
        }  # peeked, still queued (written to the peer or not: see sent)
        #: of the peeked chunk at the head of the queue, the bytes already written to the peer
        self.sent = {Direction.TO_UPSTREAM: 0, Direction.TO_CLIENT: 0}
        self.pumps = 0  # pumps running
        self.watchdog = trio.CancelScope()
        # -- idle timeout: one watcher task per connection; the relay only stamps the time of activity --
        self.idle_timeout = ctx.idle_timeout if ctx.idle_timeout > 0 else 0.0
        self.last_active = 0.0
        self.idle_scope = trio.CancelScope()
        self.names: dict[Callable[..., Any], str] = {}  # callback -> its metrics name (callback_name)
        self.now = trio.lowlevel.current_clock().current_time  # trio.current_time, one call less
        self.pending: tuple[Any, float] | None = None  # see _verdict_now
        #: why the last :meth:`hand_over` kept the connection here (restart logs)
        self.kept_because = ""

    # -- lifecycle ---------------------------------------------------------------------------------

    #: whether this process accepted the connection (not so for one adopted in a restart)
    accepted = True

    async def run(self) -> None:
        stats = self.ctx.stats
        if self.accepted:
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
                    if self.splicing:
                        nursery.start_soon(self._splice_watchdog)
                    if self.idle_timeout:
                        nursery.start_soon(self._idle_watchdog)
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
            self._release_slots()
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
        self._claim_slots()
        if verdict.splice:
            self._request_splice("on_connect")

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
        if self.idle_timeout:
            self.last_active = trio.current_time()

    async def _idle_watchdog(self) -> None:
        """End the relay (``self.scope`` cancelled) once nothing moved for ``idle_timeout``."""
        timeout = self.idle_timeout
        with self.idle_scope:
            while True:
                deadline = self.last_active + timeout
                if trio.current_time() >= deadline:
                    self.scope.cancel()
                    return
                await trio.sleep_until(deadline)

    async def _guard(self, pump: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a pump; turn whatever ends it abnormally into a session end (never a server crash)."""
        self.pumps += 1
        try:
            await pump(*args)
            self.pumps -= 1
            if not self.pumps:
                self.watchdog.cancel()  # nothing left to watch: let the session end
                self.idle_scope.cancel()
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

    def _verdict_now(self, fn: Callable[..., Any], msg: Message) -> Verdict | None:
        """Call an on_message callback (as :meth:`_callback`); its verdict, counted, if a plain function
        returned a built-in one in time.  Else ``None``: :meth:`_verdict_later` settles what it returned
        (awaitable, overrun, not a verdict, a subclass).

        The same semantics as :func:`run_callback`: an overrun is measured on trio's clock and replaces
        the verdict by ``inspect_default``; an awaitable result runs under ``inspect_timeout``.
        """
        now = self.now
        started = now()
        result = fn(self.conn, msg)
        kind = _KINDS.get(type(result))
        if kind is None or now() - started > self.ctx.inspect_timeout:
            self.pending = (result, started)
            return None
        self._count(fn, kind)
        return result

    async def _verdict_later(self, fn: Callable[..., Any]) -> Verdict:
        ctx = self.ctx
        (result, started), self.pending = self.pending, None
        verdict, timed_out = await settle_result(
            result, fn, started, ctx.inspect_timeout, ctx.inspect_default, self.conn, "on_message"
        )
        if timed_out:
            ctx.stats.inspect_timeouts += 1
        self._count(fn, _kind(verdict))
        return verdict

    def _count(self, fn: Callable[..., Any], kind: str) -> None:
        """``stats.count_callback`` and ``stats.count_verdict``, with the callback's name looked up once."""
        stats = self.ctx.stats
        name = self.names.get(fn)
        if name is None:
            name = self.names[fn] = callback_name(fn)
        stats.callback_verdicts[name, kind] += 1  # ops: per-callback verdict metrics
        stats.verdicts[kind] += 1

    # -- client -> upstream ------------------------------------------------------------------------

    async def _pump_client(self) -> None:
        stats = self.ctx.stats
        up = Direction.TO_UPSTREAM
        assert self.primary is not None
        client = self.client
        wake = self._needs_wake(up)
        while True:
            if self.raw:
                await self._flush_raw(up)
            if wake or self.splicing:
                data = await self._receive(client, up)
                if data is None:
                    continue  # woken to flush the framer after a splice request
            else:
                data = await client.receive(RECV_SIZE)
            if not data:
                break
            if self.idle_timeout:
                self._touch()
            size = len(data)
            stats.bytes_from_client += size
            self.read[up] += size
            framer = self.up_framer
            if framer is None or self.raw:
                await self._send_up(self.primary, data)
            elif size <= _raw_limit(framer):
                await self._message_up(data)  # RawFramer: the chunk is the message
            else:
                for msg in _frame(framer, data):
                    if self.raw:  # a Splice verdict earlier in this chunk: the rest goes uninspected
                        await self._send_up(self.primary, msg)
                    else:
                        await self._message_up(msg)
            if self.raw:
                await self._flush_raw(up)
        framer, self.up_framer = self.up_framer, None
        if framer is not None and (rest := framer.eof()):
            if self.raw:
                await self._send_up(self.primary, rest)
            else:
                await self._message_up(rest)  # a trailing partial message is still inspected
        if self.splicing and self.upstream_slot is not None:
            self._verify_slots()
            # The FIN is not carried across a redirect: send it once the kernel's bytes are all queued.
            await self._wait_drained(self.upstream_slot, self.client_slot, self.primary.stream)
        # Half-close: tell every upstream, keep relaying what they still send back.
        for leg in self.legs.values():
            leg.stream.send_eof()

    async def _send_up(self, leg: _Leg, data: bytes) -> None:
        slot = self.upstream_slot if leg is self.primary else None
        stream = leg.stream
        if slot is not None and self.splicing:
            # After a throttle the kernel may still be delivering redirected bytes: queue ours behind them.
            await self._wait_drained(slot, self.client_slot, stream)
            await self._write_spliced(Direction.TO_UPSTREAM, stream, slot, data)
        else:
            sent = stream.send_now(data)  # usually all of it, without awaiting
            if sent < len(data):
                await stream.send_all(memoryview(data)[sent:])
            if slot is not None:
                slot.written += len(data)  # the verdict's backlog arithmetic counts every byte we queue
        self.ctx.stats.bytes_to_upstream += len(data)

    async def _write_spliced(
        self, direction: Direction, stream: Stream, slot: SpliceSocket, data: bytes
    ) -> None:
        """Write ``data`` into a spliced socket, accounting each byte as it leaves (``sent``, ``written``).

        Only non-blocking sends, which never yield, and waits, which move nothing: at every point where
        this can be suspended, ``sent`` says exactly how much of the chunk the peer has, so a restart can
        hand the connection over in the middle of the write (:meth:`hand_over`).
        """
        assert isinstance(stream, SockStream)
        view = memoryview(data)
        while view:
            # A hand-over while we were suspended cancelled us: the successor owns the sockets now.
            await trio.lowlevel.checkpoint_if_cancelled()
            count = stream.send_now(view)
            if count:
                self.sent[direction] += count
                slot.written += count  # the verdict's backlog arithmetic counts every byte we queue
                view = view[count:]
            else:
                await trio.lowlevel.wait_writable(stream.sock)

    async def _message_up(self, data: bytes) -> None:
        assert self.up_rule is not None and self.primary is not None
        index = self.next_up
        self.next_up = index + 1
        msg = Message(data, Direction.TO_UPSTREAM, index, self.conn)
        fn = self.up_rule.fn
        verdict = self._verdict_now(fn, msg)
        if verdict is None:
            verdict = await self._verdict_later(fn)
        if type(verdict) is Pass and not verdict.splice:
            await self._send_up(self.primary, data)
        elif isinstance(verdict, Splice | Pass):
            if verdict.splice:
                self._request_splice(f"on_message (message {msg.index} to upstream)")
            await self._send_up(self.primary, data)
        elif isinstance(verdict, Rewrite):
            await self._send_up(self.primary, verdict.data)
        elif isinstance(verdict, Redirect):
            await self._send_up(await self._leg_for(verdict.addr), data)
        elif isinstance(verdict, Close):
            raise _End(f"on_message verdict Close (message {msg.index} to upstream)", reset=False)
        # Drop: nothing leaves.

    # -- upstream -> client ------------------------------------------------------------------------

    async def _pump_leg(self, leg: _Leg) -> None:
        stats = self.ctx.stats
        down = Direction.TO_CLIENT
        primary = leg is self.primary  # only the primary leg can be spliced
        stream = leg.stream
        wake = primary and self._needs_wake(down)
        while True:
            if primary and self.raw:
                await self._flush_raw(down)
            if primary and (wake or self.splicing):
                data = await self._receive(stream, down)
                if data is None:
                    continue
            else:
                data = await stream.receive(RECV_SIZE)
            if not data:
                break
            if self.idle_timeout:
                self._touch()
            size = len(data)
            stats.bytes_from_upstream += size
            if primary:
                self.read[down] += size
            framer = leg.framer
            if framer is None or self.raw:
                await self._send_client(data)
            elif size <= _raw_limit(framer):
                await self._message_down(data)  # RawFramer: the chunk is the message
            else:
                for msg in _frame(framer, data):
                    if self.raw:
                        await self._send_client(msg)
                    else:
                        await self._message_down(msg)
            if primary and self.raw:
                await self._flush_raw(down)
        framer, leg.framer = leg.framer, None
        if framer is not None and (rest := framer.eof()):
            if self.raw:
                await self._send_client(rest)
            else:
                await self._message_down(rest)
        if primary and self.splicing and self.client_slot is not None:
            self._verify_slots()
            await self._wait_drained(self.client_slot, self.upstream_slot, self.client)
        leg.eof = True
        # The client's write side closes once no upstream can send anything more.
        if all(other.eof for other in self.legs.values()):
            self.client.send_eof()

    async def _send_client(self, data: bytes) -> None:
        slot = self.client_slot
        lock = self.client_lock
        if lock.locked() or (self.splicing and slot is not None):
            async with lock:
                if slot is not None and self.splicing:
                    await self._wait_drained(slot, self.upstream_slot, self.client)
                    await self._write_spliced(Direction.TO_CLIENT, self.client, slot, data)
                else:
                    await self.client.send_all(data)
                    if slot is not None:
                        slot.written += len(data)
        else:
            # Nobody is writing to the client: what the socket takes now cannot interleave with another
            # leg's message (no await); only a remainder has to wait, holding the lock.
            sent = self.client.send_now(data)
            if sent < len(data):
                async with lock:
                    await self.client.send_all(memoryview(data)[sent:])
            if slot is not None:
                slot.written += len(data)
        self.ctx.stats.bytes_to_client += len(data)

    async def _message_down(self, data: bytes) -> None:
        assert self.down_rule is not None
        index = self.next_down
        self.next_down = index + 1
        msg = Message(data, Direction.TO_CLIENT, index, self.conn)
        fn = self.down_rule.fn
        verdict = self._verdict_now(fn, msg)
        if verdict is None:
            verdict = await self._verdict_later(fn)
        if type(verdict) is Pass and not verdict.splice:
            await self._send_client(data)
        elif isinstance(verdict, Splice | Pass):
            if verdict.splice:
                self._request_splice(f"on_message (message {msg.index} to client)")
            await self._send_client(data)
        elif isinstance(verdict, Rewrite):
            await self._send_client(verdict.data)
        elif isinstance(verdict, Redirect):
            raise _End("on_message returned Redirect for a message to the client", reset=True, error=True)
        elif isinstance(verdict, Close):
            raise _End(f"on_message verdict Close (message {msg.index} to client)", reset=False)

    # -- splicing ----------------------------------------------------------------------------------

    def _claim_slots(self) -> None:
        """Reserve both sockets' kernel slots before anything is written to either (base calibration)."""
        splicer = self.ctx.splicer
        if splicer is None:
            return
        assert self.primary is not None
        if not isinstance(self.primary.stream, SockStream):
            self.claim_failure = "the echo upstream has no socket to splice to"
            return
        try:
            self.client_slot = splicer.claim(self.client.sock)
            self.upstream_slot = splicer.claim(self.primary.stream.sock)
        except SpliceUnavailable as exc:
            self.claim_failure = str(exc)
            self._release_slots()
        else:
            splicer.sessions.add(self)  # restart: hand_over() may pass the connection to the successor

    def _release_slots(self) -> None:
        splicer = self.ctx.splicer
        for slot in (self.client_slot, self.upstream_slot):
            if slot is not None and slot._conn is not None:
                c = slot.conn
                log.debug(
                    "%r: %s mode=%d passed=%d forwarded=%d redirected=%d written=%d throttles=%d dropped=%d"
                    " old=%d broken=%d",
                    self.conn, "client" if slot is self.client_slot else "upstream", c.mode, c.passed,
                    c.forwarded, c.redirected, c.written, c.throttles, c.dropped, c.old, c.broken,
                )  # fmt: skip
                if self.splicing:
                    spliced = slot.redirected
                    self.ctx.stats.bytes_spliced += spliced
                    splicer.stats.bytes_spliced += spliced
                slot.release()

    def _request_splice(self, origin: str) -> None:
        """Stop inspecting; hand both directions to the kernel if it can take them (else relay raw)."""
        if self.raw:
            return
        self.raw = True
        splicer = self.ctx.splicer
        reason = None
        if self.client_slot is None or self.upstream_slot is None:
            reason = self.claim_failure
        elif len(self.legs) > 1:
            reason = "the connection has several upstreams (on_message Redirect)"
        if reason is not None:
            if splicer is not None:
                splicer.stats.fallbacks += 1
            level = log.debug if splicer is None else log.info
            level("%r: splice requested by %s stays in userspace: %s", self.conn, origin, reason)
            self._wake_pumps()
            return
        assert self.client_slot is not None and self.upstream_slot is not None
        self.splicing = True
        splicer.stats.spliced += 1
        # Until each pump has stored `forwarded` after flushing, the stale value (0, or less than what was
        # passed) keeps the kernel passing: requesting before flushing is safe.
        for stream in (self.client, self.primary.stream):
            # A small receive buffer closes the TCP window soon, so that userspace catches up with what
            # the kernel passed while no new skb can arrive (see _receive); restored after the switch.
            assert isinstance(stream, SockStream)
            with contextlib.suppress(OSError):
                stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SWITCH_RCVBUF)
        self.client_slot.request(self.upstream_slot)
        self.upstream_slot.request(self.client_slot)
        log.debug("%r: spliced by %s", self.conn, origin)
        if self.nursery is not None:
            self.nursery.start_soon(self._splice_watchdog)
        self._wake_pumps()

    def _wake_pumps(self) -> None:
        # A pump blocked in receive() may hold a framer's partial message: wake it to forward that now.
        for scope in self.wake.values():
            scope.cancel()

    def _needs_wake(self, direction: Direction) -> bool:
        """Whether a splice request must interrupt this direction's receive: the kernel may take over
        (both slots claimed), or the framer may hold the start of a message that must be flushed."""
        if self.client_slot is not None and self.upstream_slot is not None:
            return True
        assert self.primary is not None
        framer = self.up_framer if direction is Direction.TO_UPSTREAM else self.primary.framer
        return framer is not None and type(framer) is not RawFramer

    async def _receive(self, stream: Stream, direction: Direction) -> bytes | None:
        """``stream.receive``; ``None`` if a splice request woke us (trio cancels before the syscall
        returns data, so nothing is lost)."""
        if self.splicing and isinstance(stream, SockStream):
            # Peek, forward, publish `forwarded`, only then consume.  Unconsumed bytes keep the receive
            # buffer full, so a fast sender soon finds the TCP window closed and stops: userspace then
            # catches up with everything the kernel passed (forwarded == passed) while no new skb can
            # arrive, and the next one is redirected.  With plain reads a sender faster than Python
            # would keep userspace one skb behind forever and the switch would never happen.
            sock = stream.sock
            size = max(RECV_SIZE, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
            data = await sock.recv(size, socket.MSG_PEEK)
            if not data:
                await self._confirm_eof(sock, direction)
                data = await sock.recv(size, socket.MSG_PEEK)
            # trio yields once more after a successful recv: a hand-over in that step cancelled us, and
            # nothing of this chunk may be acted on here any more.
            await trio.lowlevel.checkpoint_if_cancelled()
            self.unconsumed[direction] = len(data)
            self.sent[direction] = 0
            return data
        if self.raw:
            return await stream.receive(RECV_SIZE)  # nothing left to flush, ever
        scope = self.wake[direction] = trio.CancelScope()
        with scope:
            return await stream.receive(RECV_SIZE)
        return None

    async def _confirm_eof(self, sock: trio.socket.SocketType, direction: Direction) -> None:
        """Return once an EOF read from a spliced ``sock`` is real: every byte the kernel passed was read.

        The kernel reports EOF as soon as its FIN was processed and the psock's receive list is empty,
        but passed skbs can still wait in the psock's backlog queue, behind skbs the peer redirected into
        this socket (the queue is shared).  They arrive once the backlog worker gets to them; a read that
        then finds data returns it to the caller instead.  No progress for ``idle_timeout`` resets.
        """
        source = self.client_slot if direction is Direction.TO_UPSTREAM else self.upstream_slot
        if source is None:
            return
        read = self.read[direction]

        def confirmed() -> bool:
            if source.passed <= read:
                return True
            try:
                return bool(sock._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))  # type: ignore[attr-defined]
            except BlockingIOError:
                return False

        await self._poll(confirmed, None, "passed bytes never reached the receive queue after EOF")

    async def _poll(
        self, done: Callable[[], bool], progress: Callable[[], object] | None, stalled: str
    ) -> None:
        """Wait until ``done()``, checking every 0.5 ms at first, backing off to 5 ms (what the kernel does
        meanwhile does not wake us).  A change of ``progress()`` pushes the idle deadline; no change for
        ``idle_timeout`` raises :class:`_End` (``stalled``), resetting both sides."""
        delay = 0.0005
        last: object = None
        since = trio.current_time()
        limit = self.ctx.idle_timeout if self.ctx.idle_timeout > 0 else math.inf
        while not done():
            now = trio.current_time()
            mark = progress() if progress is not None else None
            if mark != last:
                last, since = mark, now
                self._touch()
            elif now - since > limit:
                raise _End(stalled, reset=True, error=True)
            await trio.sleep(delay)
            delay = min(delay * 2, 0.005)

    async def _flush_raw(self, direction: Direction) -> None:
        """After a splice request: forward a framer's buffered bytes, then publish what was forwarded."""
        if not self.raw:
            return
        if direction is Direction.TO_UPSTREAM:
            framer, self.up_framer = self.up_framer, None
            if framer is not None and (rest := framer.eof()):
                assert self.primary is not None
                await self._send_up(self.primary, rest)
            source = self.client_slot
        else:
            assert self.primary is not None
            framer, self.primary.framer = self.primary.framer, None
            if framer is not None and (rest := framer.eof()):
                await self._send_client(rest)
            source = self.upstream_slot
        if self.splicing and source is not None:
            if SPLICE_SWITCH_HOOK is not None and direction not in self.hooked:
                self.hooked.add(direction)
                await SPLICE_SWITCH_HOOK()  # meanwhile the kernel passes (and counts) what arrives
            # Everything read in this direction has been written to the peer: the kernel may switch.
            await trio.lowlevel.checkpoint_if_cancelled()  # unless handed over: the slot is not ours then
            source.set_forwarded(self.read[direction])
            self.sent[direction] = 0
            await self._consume(direction)

    async def _consume(self, direction: Direction) -> None:
        """Drop the bytes :meth:`_receive` peeked and the relay forwarded (they are at the queue's head)."""
        assert self.primary is not None
        stream = self.client if direction is Direction.TO_UPSTREAM else self.primary.stream
        assert isinstance(stream, SockStream)
        # recv_now never yields: `unconsumed` is exact whenever hand_over() can look at it.
        while self.unconsumed[direction]:
            data = stream.recv_now(min(self.unconsumed[direction], 1 << 22))
            if data is None:
                await trio.lowlevel.wait_readable(stream.sock)
                continue
            if not data:
                raise _End("peeked bytes vanished from the receive queue", reset=True, error=True)
            self.unconsumed[direction] -= len(data)
        # Yield once per chunk, as a read through trio would: the other direction's pump gets its turn.
        # Nothing is held at this point (forwarded == read, nothing unconsumed), so a hand-over may run.
        await trio.lowlevel.checkpoint()
        source = self.client_slot if direction is Direction.TO_UPSTREAM else self.upstream_slot
        if source is not None and source.passed == self.read[direction] and direction not in self.restored:
            # Caught up: the next skb is redirected.  Give the socket its full receive buffer back (the
            # window now bounds only what a throttled connection holds in userspace's queue).
            self.restored.add(direction)
            with contextlib.suppress(OSError):
                stream.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _full_rcvbuf() // 2)

    async def _wait_drained(self, sink: SpliceSocket, source: SpliceSocket | None, stream: Stream) -> None:
        """Wait until every byte redirected into ``sink``'s socket (and all we wrote) is in its queue.

        Needed before we write into a spliced socket ourselves (after a throttle) and before its FIN.
        Progress (the queue growing) pushes the idle timeout; no progress for ``idle_timeout`` resets.
        """
        assert isinstance(stream, SockStream)
        sock = stream.sock
        await self._poll(
            lambda: sink.drained_into(source, sock),
            lambda: queued_total(sock),
            "spliced bytes did not drain into the peer socket",
        )

    def _verify_slots(self) -> None:
        """Production check that no byte was handled twice by the verdict (see :func:`_overcount`).

        :raises _End: resetting both sides, rather than let a duplicated byte through unnoticed.
        """
        assert self.primary is not None
        pairs = (
            (self.client_slot, self.client, "client"),
            (self.upstream_slot, self.primary.stream, "upstream"),
        )
        for slot, stream, name in pairs:
            if slot is None or slot._conn is None or not isinstance(stream, SockStream):
                continue
            try:
                why = _overcount(slot, stream.sock)
            except OSError:
                continue  # the socket is gone: its pump reports that
            if why is not None:
                raise _End(f"spliced {name} stream corrupt: {why}", reset=True, error=True)

    async def _splice_watchdog(self) -> None:
        """The relay sees no spliced byte: push the idle deadline while the kernel's counters move."""
        timeout = self.ctx.idle_timeout
        if timeout <= 0:
            return
        with self.watchdog:
            await self._watch(timeout)

    async def _watch(self, timeout: float) -> None:
        interval = min(max(timeout / 4, 0.01), 10.0)
        last = None
        while True:
            await trio.sleep(interval)
            slots = [slot for slot in (self.client_slot, self.upstream_slot) if slot is not None]
            if any(slot._conn is None for slot in slots):
                return
            try:
                self._verify_slots()
            except _End as end:
                self._finish(end)
                return
            now = tuple(slot.redirected for slot in slots)
            if now != last:
                last = now
                self._touch()

    # -- restart ------------------------------------------------------------------------------------

    def hand_over(self) -> tuple[int, int, SpliceSocket, SpliceSocket] | None:
        """Stop serving this spliced connection here and give it to the successor (restart).

        Called in the trio thread between task steps, so every pump is suspended at an ``await``: in its
        peek (nothing held), waiting for the peer socket to drain or to take more of a chunk (a throttle:
        a slow reader), consuming forwarded bytes, or after its direction's EOF.  At each of those points
        the state of a direction is exact: ``forwarded`` bytes were written to the peer, and everything
        after them is still queued on the source socket, where the successor peeks it again, except the
        head of a chunk that is already written (``sent``) or forwarded and not consumed yet
        (``unconsumed``).  Those bytes are consumed here, without waiting (they are queued: we peeked
        them), and ``forwarded`` moves past them.  The successor's relay then starts at ``read =
        forwarded`` like this one would have; what the kernel passes meanwhile (a throttle, a FIN, an
        RST) stays queued for it.  Cancelling the session afterwards stops each pump at its next
        ``await``, which acts on nothing (:meth:`_receive`, :meth:`_write_spliced`).

        Not handed over (``None``, the reason in :attr:`kept_because`; it keeps running here, the caller
        retries): a session that is ending, not spliced (or not yet through its switch), or with more
        than one upstream.

        :returns: duplicates of the client and upstream socket fds (the caller sends them and closes them)
            and the two slots, which stay claimed here so that this process never frees them.
        """
        primary = self.primary
        client_slot, upstream_slot = self.client_slot, self.upstream_slot
        if self.end is not None or not self.pumps:
            self.kept_because = "ending"
            return None
        if (
            not self.splicing
            or len(self.legs) != 1
            or primary is None
            or not isinstance(primary.stream, SockStream)
            or client_slot is None
            or upstream_slot is None
        ):
            self.kept_because = "not spliced"
            return None
        directions = (
            (Direction.TO_UPSTREAM, client_slot, self.client),
            (Direction.TO_CLIENT, upstream_slot, primary.stream),
        )
        plan: list[tuple[SpliceSocket, SockStream, int, int]] = []
        for direction, source, stream in directions:
            c = source.conn
            read, held, sent = self.read[direction], self.unconsumed[direction], self.sent[direction]
            if direction not in self.restored:
                self.kept_because = f"{direction.name.lower()}: still switching to the kernel"
                return None
            if c.forwarded == read:
                done, forwarded = held, read  # forwarded: only its consumption is left
            elif c.forwarded + held == read and sent <= held:
                done = sent  # peeked; this much of it is written to the peer
                forwarded = c.forwarded + done
            else:  # not a state a pump waits in: never seen, but then do not guess
                self.kept_because = (
                    f"{direction.name.lower()}: read={read} forwarded={c.forwarded} held={held} sent={sent}"
                )
                return None
            plan.append((source, stream, done, forwarded))
        log.debug(
            "%r: handed over holding to_client=%d (%d written) to_upstream=%d (%d written)",
            self.conn,
            self.unconsumed[Direction.TO_CLIENT],
            self.sent[Direction.TO_CLIENT],
            self.unconsumed[Direction.TO_UPSTREAM],
            self.sent[Direction.TO_UPSTREAM],
        )
        for source, stream, done, forwarded in plan:
            while done:
                try:
                    data = stream.recv_now(min(done, 1 << 22))
                except OSError:
                    data = None
                if not data:
                    # Peeked bytes cannot vanish; if they did, the stream is corrupt in any process.
                    self._finish(_End("peeked bytes vanished at the hand-over", reset=True, error=True))
                    return None
                done -= len(data)
            source.set_forwarded(forwarded)
        fds = (os.dup(self.client.sock.fileno()), os.dup(primary.stream.sock.fileno()))
        # Out of _release_slots' reach: the successor frees them.  Our close() of the sockets only drops this
        # process's fds (the duplicates keep them open): no FIN, no RST.
        self.client_slot = self.upstream_slot = None
        self._finish(_End("spliced connection handed over to the successor", reset=False))
        return fds[0], fds[1], client_slot, upstream_slot


# -- restart: spliced connections move to the successor (docs/operations.md) ----------------------------


class _AdoptedSession(_TcpSession):
    """A spliced connection received in a restart: no on_connect, no upstream to open."""

    accepted = False

    async def _setup(self) -> None:
        pass


async def run_adopted_splice(ctx: Context, pair: AdoptedPair) -> None:
    """Serve a spliced connection handed over by the predecessor (restart) until it ends.

    The relay resumes in the state the predecessor left it in (:meth:`_TcpSession.hand_over`): raw,
    splicing, both switches done (``read = forwarded`` per direction, receive buffers already restored),
    so it only does what it does for any spliced connection: EOF and RST propagation, the throttle
    case, the idle timeout and releasing the slots.
    """
    client = trio.socket.from_stdlib_socket(pair.client)
    upstream = trio.socket.from_stdlib_socket(pair.upstream)
    try:
        if pair.addresses is not None:
            peer, local, remote = (normalize_addr(tuple(addr)) for addr in pair.addresses)
        else:
            peer, local = normalize_addr(client.getpeername()), normalize_addr(client.getsockname())
            remote = normalize_addr(upstream.getpeername())
        conn = Connection("tcp", peer, local, ctx.label)
        conn.upstream = remote
    except (OSError, TypeError, ValueError) as exc:  # reset meanwhile: what an RST means, on both sides
        log.info(
            "spliced connection adopted from pid %d: already gone (%s); resetting both sides", pair.pid, exc
        )
        abort_socket(client)
        abort_socket(upstream)
        pair.client_slot.release()
        pair.upstream_slot.release()
        return
    session = _AdoptedSession(ctx, conn, SockStream(client))
    leg = _Leg(conn.upstream, SockStream(upstream), None)
    session.legs[conn.upstream] = session.primary = leg
    session.raw = session.splicing = True
    session.client_slot, session.upstream_slot = pair.client_slot, pair.upstream_slot
    session.read = {
        Direction.TO_UPSTREAM: pair.client_slot.conn.forwarded,
        Direction.TO_CLIENT: pair.upstream_slot.conn.forwarded,
    }
    session.hooked = {Direction.TO_UPSTREAM, Direction.TO_CLIENT}
    session.restored = {Direction.TO_UPSTREAM, Direction.TO_CLIENT}
    if ctx.splicer is not None:
        ctx.splicer.sessions.add(session)  # a later restart may hand it on again
    log.info("%r: spliced connection adopted from pid %d", conn, pair.pid)
    await session.run()
