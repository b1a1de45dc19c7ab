"""Verdicts: what a policy callback returns to tell the proxy what to do.

Verdicts are small immutable values.  The proxy checks the type of every value a callback returns;
anything that is not one of the classes below is a programming error and closes that connection
(logged on the ``sockpolicy.proxy`` logger), never the server.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Close", "Drop", "Pass", "Redirect", "Rewrite", "Splice", "Verdict", "verdict_kind"]


@dataclass(frozen=True, slots=True)
class Pass:
    """Let the connection or message through to the upstream chosen by :func:`serve`.

    :param splice: from ``on_connect`` (TCP): hand the connection to the kernel once it is set up; no
        ``on_message`` callback runs for it (see :class:`Splice` and docs/splice.md).  From
        ``on_message``: the same as :class:`Splice`.  Where splicing is unavailable the connection is
        relayed in userspace, uninspected.  Ignored for UDP.
    """

    splice: bool = False


@dataclass(frozen=True, slots=True)
class Splice:
    """From ``on_message`` (TCP): forward this message, then stop inspecting the connection and hand both
    directions to the kernel (SOCKHASH + SK_SKB redirect), socket to socket.

    Bytes already read are forwarded first, so nothing is lost or reordered.  Where splicing is not
    available (no :class:`~sockpolicy.proxy.Splicer`, a kernel without the features, the echo upstream,
    several upstreams) the rest of the connection is relayed in userspace without callbacks, and the
    reason is logged once.  From ``on_connect`` it means ``Pass(splice=True)``; for UDP it means ``Pass()``.
    """

    @property
    def splice(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Drop:
    """Refuse.

    From ``on_connect``: a TCP client is reset (RST), a UDP flow's datagrams are silently discarded
    until the flow expires.  From ``on_message``: this one message is discarded and never reaches the
    other side; the connection stays open.
    """


@dataclass(frozen=True, slots=True)
class Redirect:
    """Send to ``addr`` instead of the configured upstream.

    From ``on_connect``: ``addr`` becomes the connection's upstream.  From ``on_message`` (client to
    upstream only): this one message goes to ``addr``; the proxy opens (or reuses) a connection to it
    and relays its replies back to the client.

    :param addr: ``(host, port)`` of the other upstream.
    :param splice: from ``on_connect``: splice the connection to ``addr`` in the kernel (as
        :class:`Pass` ``(splice=True)``).  Ignored from ``on_message`` and for UDP.
    """

    addr: tuple[str, int]
    splice: bool = False

    def __post_init__(self) -> None:
        host, port = self.addr  # a wrong shape raises ValueError/TypeError here, at construction
        if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"Redirect addr must be (host: str, port: 1-65535), got {self.addr!r}")


@dataclass(frozen=True, slots=True)
class Rewrite:
    """From ``on_message`` only: forward ``data`` instead of the message's bytes."""

    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes | bytearray | memoryview):
            raise TypeError(f"Rewrite data must be bytes, got {type(self.data).__name__}")
        object.__setattr__(self, "data", bytes(self.data))


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection (both sides, with FIN).  The current message is not forwarded."""


Verdict = Pass | Drop | Redirect | Rewrite | Close | Splice
_VERDICT_TYPES = (Pass, Drop, Redirect, Rewrite, Close, Splice)


def verdict_kind(verdict: Verdict) -> str:
    """Lower-case kind name used as the key of :attr:`ServeStats.verdicts` (``"pass"``, ...)."""
    return type(verdict).__name__.lower()


def check_verdict(value: object, where: str) -> Verdict:
    """Return ``value`` if it is a verdict, else raise :exc:`TypeError` naming the callback ``where``."""
    if isinstance(value, _VERDICT_TYPES):
        return value
    raise TypeError(f"{where} returned {value!r}; expected Pass, Drop, Redirect, Rewrite, Close or Splice")
