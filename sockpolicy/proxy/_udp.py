"""UDP: one unconnected socket receives datagrams for any address/port; flows reply from the original dst.

How a datagram travels
----------------------
1. It arrives on a served (unconnected) socket; ``recvmsg`` returns the client address and, thanks to
   ``IP_RECVORIGDSTADDR``/``IPV6_RECVORIGDSTADDR``, the address the client sent it to.
2. ``(client, original_dst)`` names a *flow*.  A new flow runs ``on_connect`` once; its datagrams wait
   in a small queue meanwhile (overflow is dropped, as UDP may).
3. The flow binds a *reply socket* to the original destination (``IP_FREEBIND`` since with SK_LOOKUP
   it need not be a local address; ``SO_REUSEADDR`` because a served socket may hold that very
   address) and connects it to the client, so replies leave from the address the client talked to.
   A connected socket matching the 4-tuple wins the kernel's lookup -- even before SK_LOOKUP runs --
   so the client's later datagrams arrive on the reply socket, which is therefore read as well.
4. Each upstream gets one connected UDP socket per flow; replies come back through the flow.
5. A flow with no datagram in either direction for ``udp_flow_timeout`` seconds is closed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import struct
from typing import Any

import trio

from ._connection import Connection, Direction, Message, normalize_addr
from ._context import RECV_SIZE, Context, log
from ._policy import _MessageRule, run_callback
from ._verdicts import Close, Drop, Pass, Redirect, Rewrite, Verdict

__all__ = ["UdpServer", "parse_orig_dst", "prepare_udp_socket"]

SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)  # also the cmsg type IP_ORIGDSTADDR
IPV6_RECVORIGDSTADDR = 74  # also the cmsg type IPV6_ORIGDSTADDR; not exported by the socket module
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78
_ANC_SIZE = socket.CMSG_SPACE(28) * 2  # room for a sockaddr_in6 (and a sockaddr_in on dual-stack)
_FLOW_QUEUE = 256

Addr = tuple[str, int]


def prepare_udp_socket(sock: socket.socket) -> None:
    """Enable original-destination ancillary data and address sharing on a served UDP socket.

    :raises OSError: if the kernel refuses ``IP(V6)_RECVORIGDSTADDR`` on the socket's own family.
    """
    # The flows' reply sockets bind the same address; SO_REUSEADDR must be set on both sockets.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        # Dual-stack sockets report IPv4 datagrams with the IPv4 cmsg; v6-only ones refuse, harmlessly.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
    else:
        sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)


def parse_orig_dst(ancdata: list[tuple[int, int, bytes]]) -> Addr | None:
    """Extract the original destination from ``recvmsg`` ancillary data (``None`` if absent)."""
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            # struct sockaddr_in: family (host order), port (network order), 4-byte address
            port = struct.unpack_from("!H", data, 2)[0]
            return str(ipaddress.IPv4Address(data[4:8])), port
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            # struct sockaddr_in6: family, port, flowinfo, 16-byte address, scope id
            port = struct.unpack_from("!H", data, 2)[0]
            return normalize_addr((str(ipaddress.IPv6Address(data[8:24])), port))
    return None


class _Leg:
    """A flow's upstream: a connected UDP socket, or the echo service (a queue)."""

    def __init__(self, addr: Addr | None) -> None:
        self.addr = addr
        self.sock: trio.socket.SocketType | None = None
        self._send, self._recv = trio.open_memory_channel[bytes](_FLOW_QUEUE)

    async def open(self) -> None:
        if self.addr is None:
            return
        host, port = self.addr
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        self.sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        await self.sock.connect(sockaddr)

    async def send(self, data: bytes) -> None:
        if self.sock is None:
            with contextlib.suppress(trio.WouldBlock):  # echo queue full: drop, as UDP would
                self._send.send_nowait(data)
        else:
            await self.sock.send(data)

    async def receive(self) -> bytes:
        if self.sock is None:
            return await self._recv.receive()
        while True:
            try:
                return await self.sock.recv(RECV_SIZE)
            except ConnectionRefusedError:
                # ICMP port unreachable from the upstream; UDP carries on, the client may retry.
                log.debug("upstream %s refused a datagram", self.addr)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self._send.close()
        self._recv.close()


class _Flow:
    """One ``(client, original_dst)`` flow.  Owns its reply and upstream sockets."""

    def __init__(self, server: UdpServer, client: Addr, raw_client: Any, dst: Addr, via: Any) -> None:
        self.server = server
        self.ctx = server.ctx
        self.key = (client, dst)
        self.raw_client = raw_client  # as the served socket reported it, for the sendto fallback
        self.via = via  # the served socket the flow started on
        self.conn = Connection("udp", client, dst, self.ctx.label)
        self.inbox_send, self.inbox = trio.open_memory_channel[bytes](_FLOW_QUEUE)
        self.scope = trio.CancelScope()
        self.discard = False  # on_connect said Drop: swallow datagrams until the flow expires
        self.reply_sock: trio.socket.SocketType | None = None
        self.legs: dict[Addr | None, _Leg] = {}
        self.primary: _Leg | None = None
        self.up_rule: _MessageRule | None = None
        self.down_rule: _MessageRule | None = None
        self.index = {Direction.TO_UPSTREAM: 0, Direction.TO_CLIENT: 0}
        self.nursery: trio.Nursery | None = None
        self.touch()

    def touch(self) -> None:
        timeout = self.ctx.udp_flow_timeout
        self.scope.deadline = trio.current_time() + timeout if timeout > 0 else math.inf

    def deliver(self, data: bytes) -> None:
        """Queue a datagram from the client (called by the socket readers; never blocks)."""
        self.touch()
        self.ctx.stats.bytes_from_client += len(data)
        if self.discard:
            return
        try:
            self.inbox_send.send_nowait(data)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.ctx.stats.datagrams_dropped += 1

    async def run(self) -> None:
        stats = self.ctx.stats
        stats.connections_accepted += 1
        stats.connections_active += 1
        stats.conn_opened(self.conn)  # ops: close summary / periodic log line
        try:
            with self.scope:
                await self._run()
            if self.scope.cancelled_caught:
                log.info("%r: flow idle for %gs, closing", self.conn, self.ctx.udp_flow_timeout)
        except Exception as exc:
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # report the real error, not the nursery's wrapper
            stats.errors += 1
            log.warning("%r: closing flow: %s: %s", self.conn, type(exc).__name__, exc, exc_info=True)
        finally:
            stats.conn_closed(self.conn)  # ops: close summary
            # Forget the flow first, synchronously, so no reader queues into a closed inbox.
            if self.server.flows.get(self.key) is self:
                del self.server.flows[self.key]
            self.inbox_send.close()
            self.inbox.close()
            if self.reply_sock is not None:
                self.reply_sock.close()
            for leg in self.legs.values():
                leg.close()
            stats.connections_active -= 1
            stats.connections_closed += 1

    async def _callback(self, fn: Any, args: tuple[Any, ...], what: str) -> Verdict:
        ctx = self.ctx
        verdict, timed_out = await run_callback(
            fn, args, ctx.inspect_timeout, ctx.inspect_default, self.conn, what
        )
        if timed_out:
            ctx.stats.inspect_timeouts += 1
        ctx.stats.count_verdict(verdict)
        ctx.stats.count_callback(fn, verdict)  # ops: per-callback verdict metrics
        return verdict

    async def _run(self) -> None:
        ctx, conn = self.ctx, self.conn
        rule = ctx.policy._connect_rule(conn)
        verdict: Verdict = Pass()
        if rule is not None:
            verdict = await self._callback(rule.fn, (conn,), "on_connect")
        else:
            ctx.stats.count_verdict(verdict)
        if isinstance(verdict, Drop):
            log.info("%r: on_connect verdict Drop; discarding the flow's datagrams", conn)
            self.discard = True
            while True:  # live on (and keep discarding) until the idle deadline ends the flow
                await self.inbox.receive()
        if isinstance(verdict, Close):
            log.info("%r: on_connect verdict Close; forgetting the flow", conn)
            return
        if isinstance(verdict, Rewrite):
            raise TypeError("on_connect returned Rewrite, which only applies to messages")
        if verdict.splice:
            log.debug("%r: splice=True is reserved for kernel splicing; ignored", conn)
        target = verdict.addr if isinstance(verdict, Redirect) else ctx.upstream_for(conn.original_dst)
        self.up_rule = ctx.policy._message_rule(conn, Direction.TO_UPSTREAM)
        self.down_rule = ctx.policy._message_rule(conn, Direction.TO_CLIENT)
        await self._open_reply_socket()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if self.reply_sock is not None:
                nursery.start_soon(self.server.read_socket, self.reply_sock, self.conn.original_dst)
            self.primary = await self._leg_for(target)
            conn.upstream = target
            async for data in self.inbox:
                await self._datagram_up(data)

    async def _open_reply_socket(self) -> None:
        host, port = self.conn.original_dst
        v6 = ":" in host
        sock = trio.socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.via.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if v6:
                sock.setsockopt(SOL_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(SOL_IP, IP_FREEBIND, 1)
            await sock.bind((host, port))
            await sock.connect(self.conn.client)
        except OSError as exc:
            sock.close()
            # Still usable, but replies leave from the served socket's own address.
            log.warning(
                "%r: cannot bind reply socket to %s:%d (%s); replying via the served socket",
                self.conn,
                host,
                port,
                exc,
            )
            return
        self.reply_sock = sock

    async def _leg_for(self, addr: Addr | None) -> _Leg:
        leg = self.legs.get(addr)
        if leg is None:
            leg = _Leg(addr)
            self.legs[addr] = leg
            await leg.open()
            assert self.nursery is not None
            self.nursery.start_soon(self._pump_leg, leg)
        return leg

    def _message(self, data: bytes, direction: Direction) -> Message:
        index = self.index[direction]
        self.index[direction] = index + 1
        return Message(data, direction, index, self.conn)

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.ctx.max_message_size:
            raise ValueError(
                f"datagram of {len(data)} bytes exceeds max_message_size {self.ctx.max_message_size}"
            )

    async def _datagram_up(self, data: bytes) -> None:
        assert self.primary is not None
        stats = self.ctx.stats
        if self.up_rule is None:
            verdict: Verdict = Pass()
        else:
            self._check_size(data)
            msg = self._message(data, Direction.TO_UPSTREAM)
            verdict = await self._callback(self.up_rule.fn, (self.conn, msg), "on_message")
        if isinstance(verdict, Drop):
            return
        if isinstance(verdict, Close):
            log.info("%r: on_message verdict Close; closing the flow", self.conn)
            self.scope.cancel()
            return
        leg = self.primary
        if isinstance(verdict, Rewrite):
            data = verdict.data
        elif isinstance(verdict, Redirect):
            leg = await self._leg_for(verdict.addr)
        await leg.send(data)
        stats.bytes_to_upstream += len(data)

    async def _pump_leg(self, leg: _Leg) -> None:
        stats = self.ctx.stats
        while True:
            try:
                data = await leg.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            self.touch()
            stats.bytes_from_upstream += len(data)
            if self.down_rule is not None:
                self._check_size(data)
                msg = self._message(data, Direction.TO_CLIENT)
                verdict = await self._callback(self.down_rule.fn, (self.conn, msg), "on_message")
                if isinstance(verdict, Drop):
                    continue
                if isinstance(verdict, Close):
                    log.info("%r: on_message verdict Close; closing the flow", self.conn)
                    self.scope.cancel()
                    return
                if isinstance(verdict, Redirect):
                    raise TypeError("on_message returned Redirect for a datagram to the client")
                if isinstance(verdict, Rewrite):
                    data = verdict.data
            await self._send_client(data)

    async def _send_client(self, data: bytes) -> None:
        try:
            if self.reply_sock is not None:
                await self.reply_sock.send(data)
            else:
                await self.via.sendto(data, self.raw_client)
        except ConnectionRefusedError:
            log.debug("%r: client refused a datagram", self.conn)  # ICMP from the client; carry on
            return
        self.ctx.stats.bytes_to_client += len(data)


class UdpServer:
    """Owns the flow table of one :func:`serve` call; flows run in ``nursery``."""

    def __init__(self, ctx: Context, nursery: trio.Nursery) -> None:
        self.ctx = ctx
        self.nursery = nursery
        self.flows: dict[tuple[Addr, Addr], _Flow] = {}

    async def read_socket(self, sock: trio.socket.SocketType, fixed_dst: Addr | None = None) -> None:
        """Read datagrams from a served socket (or a flow's reply socket) and route them to flows.

        ``fixed_dst`` is the reply socket's bound address, used when no ancillary data is present.
        """
        local = fixed_dst or normalize_addr(sock.getsockname())
        while True:
            try:
                data, ancdata, flags, raw_client = await sock.recvmsg(RECV_SIZE, _ANC_SIZE)
            except (ConnectionRefusedError, ConnectionResetError):
                continue  # a stale ICMP error for an earlier send; nothing to do with the next datagram
            if flags & socket.MSG_TRUNC:
                self.ctx.stats.datagrams_dropped += 1
                log.warning("dropping a truncated datagram from %s", raw_client)
                continue
            dst = parse_orig_dst(ancdata) or local
            self.dispatch(data, raw_client, dst, sock)

    def dispatch(self, data: bytes, raw_client: Any, dst: Addr, via: trio.socket.SocketType) -> None:
        client = normalize_addr(raw_client)
        flow = self.flows.get((client, dst))
        if flow is None:
            flow = _Flow(self, client, raw_client, dst, via)
            self.flows[flow.key] = flow
            self.nursery.start_soon(flow.run)
        flow.deliver(data)
