"""The objects handed to policy callbacks: :class:`Connection`, :class:`Message`, :class:`Direction`."""

from __future__ import annotations

import enum
import ipaddress
import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Connection", "Direction", "Message", "normalize_addr"]

# One process-wide counter so ids are unique across every serve() call in the process.
_ids = itertools.count(1)


class Direction(enum.Enum):
    """Which way a message travels."""

    TO_UPSTREAM = "to_upstream"
    TO_CLIENT = "to_client"


def normalize_addr(addr: tuple[Any, ...]) -> tuple[str, int]:
    """Reduce a socket address to ``(host, port)``.

    IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``, seen on dual-stack sockets) become plain IPv4
    so that policies written for ``127.0.0.0/8`` match whatever socket family carried the traffic.
    """
    host, port = addr[0], addr[1]
    if ":" in host:
        host = host.split("%", 1)[0] if "%" in host else host
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            host = str(mapped)
    return host, int(port)


@dataclass(eq=False)
class Connection:
    """One proxied TCP connection or UDP flow.

    :ivar id: unique per process.
    :ivar proto: ``"tcp"`` or ``"udp"``.
    :ivar client: ``(host, port)`` of the client.
    :ivar original_dst: ``(host, port)`` the client addressed.  TCP: ``getsockname()`` of the accepted
        socket (with SK_LOOKUP steering this is the address the client dialled, not the listener's).
        UDP: from the ``IP_ORIGDSTADDR``/``IPV6_ORIGDSTADDR`` ancillary data of the first datagram.
    :ivar label: the ``label`` given to :func:`serve`, if any.
    :ivar upstream: ``(host, port)`` once chosen, ``None`` before that and for the echo service.
    :ivar state: free for user callbacks; the proxy never touches it.
    """

    proto: Literal["tcp", "udp"]
    client: tuple[str, int]
    original_dst: tuple[str, int]
    label: str | None = None
    upstream: tuple[str, int] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    id: int = field(default_factory=lambda: next(_ids))

    def __repr__(self) -> str:
        return (
            f"<Connection #{self.id} {self.proto} {_fmt(self.client)} -> {_fmt(self.original_dst)}"
            f" label={self.label!r} upstream={_fmt(self.upstream) if self.upstream else None}>"
        )


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, eq=False)
class Message:
    """One framed message.

    :ivar data: the message bytes.
    :ivar direction: :attr:`Direction.TO_UPSTREAM` (from the client) or :attr:`Direction.TO_CLIENT`.
    :ivar index: 0-based counter of messages in this direction on this connection.
    :ivar connection: the :class:`Connection` it belongs to.
    """

    data: bytes
    direction: Direction
    index: int
    connection: Connection
