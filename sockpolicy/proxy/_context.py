"""Per-server configuration and counters shared by the TCP and UDP halves of :func:`serve`."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from ._framers import Framer
from ._policy import Policy
from ._verdicts import Verdict, verdict_kind

__all__ = ["ServeStats"]

log = logging.getLogger("sockpolicy.proxy")

#: recv() size for TCP relaying and UDP upstream sockets.
RECV_SIZE = 65536


@dataclass
class ServeStats:
    """Plain counters of one :func:`serve` call (read them via :attr:`ServeHandle.stats`).

    A "connection" is a TCP connection or a UDP flow.  Byte counters count payload bytes:
    ``bytes_from_client``/``bytes_from_upstream`` as received, ``bytes_to_upstream``/``bytes_to_client``
    as forwarded after verdicts (so drops and rewrites show up as a difference).
    """

    connections_accepted: int = 0
    connections_active: int = 0
    connections_closed: int = 0
    #: verdicts applied, by kind: ``"pass"``, ``"drop"``, ``"redirect"``, ``"rewrite"``, ``"close"``.
    verdicts: collections.Counter[str] = field(default_factory=collections.Counter)
    #: connections closed because of a callback error, an oversized/malformed message or I/O error.
    errors: int = 0
    #: callbacks that overran ``inspect_timeout`` (``inspect_default`` applied instead).
    inspect_timeouts: int = 0
    bytes_from_client: int = 0
    bytes_to_upstream: int = 0
    bytes_from_upstream: int = 0
    bytes_to_client: int = 0
    #: UDP datagrams discarded because a flow's queue was full or they were truncated.
    datagrams_dropped: int = 0

    def count_verdict(self, verdict: Verdict) -> None:
        self.verdicts[verdict_kind(verdict)] += 1


@dataclass
class Context:
    """Everything a connection handler needs; built once per :func:`serve` call."""

    policy: Policy
    upstream: tuple[str, int | None] | None
    label: str | None
    inspect_timeout: float
    inspect_default: Verdict
    connect_timeout: float
    idle_timeout: float
    udp_flow_timeout: float
    max_message_size: int
    stats: ServeStats

    def upstream_for(self, original_dst: tuple[str, int]) -> tuple[str, int] | None:
        """The configured upstream for a connection (``None``: the built-in echo service)."""
        if self.upstream is None:
            return None
        host, port = self.upstream
        return host, port if port is not None else original_dst[1]

    def new_framer(self, template: Framer) -> Framer:
        return self.fill_max(template.clone())

    def fill_max(self, framer: Framer) -> Framer:
        # max_size=None on a template means "whatever serve() was given".
        if framer.max_size is None:
            framer.max_size = self.max_message_size
        return framer
