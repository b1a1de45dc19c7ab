"""Tiny matcher for policy callback filters: destination ports, destination prefixes, protocol.

Deliberately independent of :mod:`sockpolicy._ranges` (owned elsewhere) so the proxy stays usable on
its own.  Every parse error is a :exc:`ValueError` with a one-line message.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["AddrsSpec", "Matcher", "PortsSpec", "parse_addrs", "parse_ports", "parse_proto"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortsSpec = int | str | Iterable[int | tuple[int, int]]
AddrsSpec = str | Network | Iterable[str | Network]


def _port(value: object, spec: object) -> int:
    # bool is an int subclass; True as "port 1" is almost certainly a bug in the caller.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"invalid port {value!r} in {spec!r}: expected an integer 1-65535")
    if not 1 <= value <= 65535:
        raise ValueError(f"invalid port {value} in {spec!r}: ports must be 1-65535")
    return value


def _range(lo: object, hi: object, spec: object) -> tuple[int, int]:
    a, b = _port(lo, spec), _port(hi, spec)
    if a > b:
        raise ValueError(f"invalid port range {a}-{b} in {spec!r}: start is above end")
    return a, b


def parse_ports(spec: PortsSpec) -> tuple[tuple[int, int], ...]:
    """Parse a ports filter into sorted, merged inclusive ``(lo, hi)`` ranges.

    Accepts an int, a string such as ``"80,443,8000-8999"``, or an iterable of ints and
    ``(lo, hi)`` tuples.

    :raises ValueError: on an empty spec, a port outside 1-65535, or a malformed item.
    """
    ranges: list[tuple[int, int]] = []
    if isinstance(spec, str):
        for item in spec.split(","):
            item = item.strip()
            if not item:
                raise ValueError(f"invalid ports {spec!r}: empty item")
            lo, sep, hi = item.partition("-")
            try:
                a = int(lo.strip(), 10)
                b = int(hi.strip(), 10) if sep else a
            except ValueError:
                raise ValueError(f"invalid ports {spec!r}: {item!r} is not a port or lo-hi range") from None
            ranges.append(_range(a, b, spec))
    elif isinstance(spec, int):
        p = _port(spec, spec)
        ranges.append((p, p))
    else:
        try:
            items = list(spec)
        except TypeError:
            raise ValueError(f"invalid ports {spec!r}: expected int, str or iterable") from None
        for item in items:
            if isinstance(item, tuple):
                if len(item) != 2:
                    raise ValueError(f"invalid port range {item!r}: expected (lo, hi)")
                ranges.append(_range(item[0], item[1], spec))
            else:
                p = _port(item, spec)
                ranges.append((p, p))
    if not ranges:
        raise ValueError(f"invalid ports {spec!r}: no ports given")
    ranges.sort()
    merged = [ranges[0]]
    for lo, hi in ranges[1:]:
        plo, phi = merged[-1]
        if lo <= phi + 1:
            merged[-1] = (plo, max(phi, hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def _network(item: object, spec: object) -> Network:
    if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return item
    if isinstance(item, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return ipaddress.ip_network(item)
    if not isinstance(item, str):
        raise ValueError(f"invalid address prefix {item!r} in {spec!r}: expected a string or network")
    try:
        # strict=False: "10.1.2.3/8" means 10.0.0.0/8, as in iptables/ip route.
        return ipaddress.ip_network(item.strip(), strict=False)
    except ValueError:
        raise ValueError(f"invalid address prefix {item!r}: expected e.g. 127.0.0.0/8 or ::1/128") from None


def parse_addrs(spec: AddrsSpec) -> tuple[Network, ...]:
    """Parse an address filter: a prefix string (comma-separated allowed), a network, or an iterable.

    :raises ValueError: on an empty spec or a malformed prefix.
    """
    if isinstance(spec, str):
        items: list[object] = [s for s in spec.split(",")]
    elif isinstance(spec, ipaddress.IPv4Network | ipaddress.IPv6Network):
        items = [spec]
    else:
        try:
            items = list(spec)
        except TypeError:
            raise ValueError(f"invalid addrs {spec!r}: expected str, network or iterable") from None
    nets = tuple(_network(i, spec) for i in items)
    if not nets:
        raise ValueError(f"invalid addrs {spec!r}: no prefixes given")
    return nets


def parse_proto(proto: str | None) -> str | None:
    """Validate a protocol filter (``None``, ``"tcp"`` or ``"udp"``, case-insensitive)."""
    if proto is None:
        return None
    if not isinstance(proto, str) or proto.lower() not in ("tcp", "udp"):
        raise ValueError(f"invalid proto {proto!r}: expected 'tcp', 'udp' or None")
    return proto.lower()


@dataclass(frozen=True, slots=True)
class Matcher:
    """A parsed filter; ``None`` fields match everything."""

    ports: tuple[tuple[int, int], ...] | None = None
    addrs: tuple[Network, ...] | None = None
    proto: str | None = None

    @classmethod
    def build(
        cls, ports: PortsSpec | None = None, addrs: AddrsSpec | None = None, proto: str | None = None
    ) -> Matcher:
        """Parse the user-facing filter arguments.  :raises ValueError: on bad input."""
        return cls(
            ports=None if ports is None else parse_ports(ports),
            addrs=None if addrs is None else parse_addrs(addrs),
            proto=parse_proto(proto),
        )

    def matches(self, proto: str, dst: tuple[str, int]) -> bool:
        """Whether a connection of ``proto`` to original destination ``dst`` matches."""
        if self.proto is not None and proto != self.proto:
            return False
        host, port = dst
        if self.ports is not None and not any(lo <= port <= hi for lo, hi in self.ports):
            return False
        if self.addrs is not None:
            try:
                ip = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                return False
            # Comparing an IPv4 address with an IPv6 network is simply "no match" (version check).
            if not any(ip.version == net.version and ip in net for net in self.addrs):
                return False
        return True
