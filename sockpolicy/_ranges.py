"""Parsing and checking of port ranges, address prefixes and ``host:port`` endpoints.

Everything that accepts user input (the CLI, TOML policy files, the dispatcher's bindings) goes through
this module, so that every mistake produces the same kind of one-line message that names the bad token
and shows the valid form.  All errors are :class:`ValueError` subclasses: they are user errors, not bugs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import SupportsIndex, TypeAlias, overload

__all__ = [
    "MAX_PORT",
    "MIN_PORT",
    "IPAddress",
    "IPNetwork",
    "InvalidEndpoint",
    "InvalidPrefix",
    "InvalidRange",
    "PortRange",
    "PortRanges",
    "PrefixNotLocal",
    "RouteCheckError",
    "check_local",
    "local_route_command",
    "parse_endpoint",
    "parse_ports",
    "parse_prefix",
]

MIN_PORT = 1
MAX_PORT = 65535

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_RANGE_HINT = f"ports are {MIN_PORT}-{MAX_PORT}, ranges lo-hi, comma separated"
_PREFIX_HINT = "use an address or prefix such as 127.0.0.1, 127.0.0.0/8 or ::1/128"

# ASCII digits only: str.isdigit() and \d also accept e.g. Arabic-Indic digits, which int() would
# happily convert, so "٨٠" would otherwise become port 80.
_TOKEN_RE = re.compile(r"(?P<lo>[0-9]+)(?:-(?P<hi>[0-9]+))?")
# Longer digit strings than this are out of range anyway; refusing them before int() also avoids
# Python's int-from-huge-string limit (ValueError with a multi-line message).
_MAX_DIGITS = 10
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _q(text: str) -> str:
    """Quote user input for an error message.

    :func:`repr` escapes newlines and every other character that :meth:`str.splitlines` would split on,
    which keeps each message on one line whatever the user typed.
    """
    return repr(text)


class InvalidRange(ValueError):
    """A port or port range is malformed or out of range."""


class InvalidPrefix(ValueError):
    """An address prefix is malformed or has host bits set."""


class InvalidEndpoint(ValueError):
    """A ``host:port`` endpoint is malformed."""


class PrefixNotLocal(ValueError):
    """A prefix is not routed to this host, so the kernel would never deliver its traffic to a socket.

    :ivar prefix: the prefix that was checked.
    :ivar address: the first address found not to be local.
    """

    def __init__(self, message: str, prefix: IPNetwork, address: IPAddress) -> None:
        super().__init__(message)
        self.prefix = prefix
        self.address = address


class RouteCheckError(ValueError):
    """The routing table could not be queried (``ip`` missing, unknown network namespace, ...)."""


@dataclass(frozen=True, order=True)
class PortRange:
    """An inclusive range of ports ``lo``-``hi``; a single port has ``lo == hi``.

    Ordering is by ``(lo, hi)``, which is the order :func:`parse_ports` returns ranges in.
    """

    lo: int
    hi: int

    def __post_init__(self) -> None:
        for value in (self.lo, self.hi):
            # bool is an int subclass, and PortRange(True, 5) is certainly a mistake.
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidRange(f"invalid port range {self.lo!r}-{self.hi!r}: ports must be integers")
        if not MIN_PORT <= self.lo <= MAX_PORT or not MIN_PORT <= self.hi <= MAX_PORT:
            bad = self.lo if not MIN_PORT <= self.lo <= MAX_PORT else self.hi
            raise InvalidRange(f"invalid port range '{self}': port {bad} is out of range ({_RANGE_HINT})")
        if self.lo > self.hi:
            raise InvalidRange(
                f"invalid port range '{self}': start {self.lo} is greater than end {self.hi} ({_RANGE_HINT})"
            )

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    @property
    def width(self) -> int:
        """The number of ports in the range."""
        return self.hi - self.lo + 1

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"

    @classmethod
    def parse(cls, token: str) -> PortRange:
        """Parse one ``PORT`` or ``LO-HI`` token (no commas, surrounding whitespace allowed).

        :raises InvalidRange: with a one-line message naming the token.
        """
        text = token.strip()
        if not text:
            raise InvalidRange(f"invalid port range {_q(token)}: empty range ({_RANGE_HINT})")
        m = _TOKEN_RE.fullmatch(text)
        if m is None:
            raise InvalidRange(
                f"invalid port range {_q(text)}: expected PORT or LO-HI with decimal ports ({_RANGE_HINT})"
            )
        bounds = []
        for digits in (m["lo"], m["hi"] or m["lo"]):
            value = int(digits) if len(digits) <= _MAX_DIGITS else MAX_PORT + 1
            if not MIN_PORT <= value <= MAX_PORT:
                shown = digits if len(digits) <= _MAX_DIGITS else digits[:_MAX_DIGITS] + "..."
                raise InvalidRange(
                    f"invalid port range {_q(text)}: port {shown} is out of range ({_RANGE_HINT})"
                )
            bounds.append(value)
        lo, hi = bounds
        if lo > hi:
            raise InvalidRange(
                f"invalid port range {_q(text)}: start {lo} is greater than end {hi} ({_RANGE_HINT})"
            )
        return cls(lo, hi)


class PortRanges(tuple[PortRange, ...]):
    """A sorted tuple of distinct :class:`PortRange` objects, as the user wrote them.

    Ranges are *not* merged: ``80,443`` is two ranges and ``80-90,85-95`` stays two overlapping ranges,
    because a binding is identified by exactly the ranges it was created with.  Use :meth:`merged` for
    the minimal equivalent set.  ``port in ranges`` tests an ``int`` port against all ranges;
    ``PortRange(...) in ranges`` is ordinary tuple membership.
    """

    __slots__ = ()

    def __new__(cls, ranges: Iterable[PortRange] = ()) -> PortRanges:
        items = tuple(ranges)
        for item in items:
            if not isinstance(item, PortRange):
                raise TypeError(f"PortRanges holds PortRange objects, not {type(item).__name__}")
        return super().__new__(cls, sorted(set(items)))

    @classmethod
    def parse(cls, text: str) -> PortRanges:
        """Parse ``80``, ``1-65535``, ``80,443,8000-8999`` (whitespace around commas allowed).

        :raises InvalidRange: with a one-line message naming the first bad token.
        """
        if not text.strip():
            raise InvalidRange(f"invalid port range {_q(text)}: no ports given ({_RANGE_HINT})")
        return cls(PortRange.parse(token) for token in text.split(","))

    @overload
    def __getitem__(self, index: SupportsIndex) -> PortRange: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[PortRange, ...]: ...
    def __getitem__(self, index: SupportsIndex | slice) -> PortRange | tuple[PortRange, ...]:
        return super().__getitem__(index)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, int) and not isinstance(item, bool):
            return any(item in r for r in self)
        return super().__contains__(item)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self)

    def __repr__(self) -> str:
        return f"PortRanges({str(self)!r})"

    @property
    def width(self) -> int:
        """The number of distinct ports covered."""
        return sum(r.width for r in self.merged())

    def merged(self) -> PortRanges:
        """Return the minimal equivalent ranges: overlapping and adjacent ranges are joined."""
        out: list[PortRange] = []
        for r in self:  # already sorted by (lo, hi)
            if out and r.lo <= out[-1].hi + 1:
                if r.hi > out[-1].hi:
                    out[-1] = PortRange(out[-1].lo, r.hi)
            else:
                out.append(r)
        return PortRanges(out)


def parse_ports(text: str) -> PortRanges:
    """Parse a port list such as ``80,443,8000-8999`` into sorted, de-duplicated ranges.

    The result is a :class:`PortRanges`, which is a ``tuple[PortRange, ...]``.

    :raises InvalidRange: ``invalid port range '5-3': start 5 is greater than end 3 (...)``.
    """
    return PortRanges.parse(text)


def parse_prefix(text: str) -> IPNetwork:
    """Parse an IPv4/IPv6 prefix; a bare address means ``/32`` or ``/128``.

    Host bits must be clear (``127.0.0.1/8`` is refused, with ``127.0.0.0/8`` suggested), because a
    silently widened prefix would steer more traffic than the user asked for.

    :raises InvalidPrefix: with a one-line message naming the bad text.
    """
    s = text.strip()
    if not s:
        raise InvalidPrefix(f"invalid prefix {_q(text)}: empty ({_PREFIX_HINT})")
    # ipaddress accepts IPv6 scope ids ("fe80::1%eth0") and netmask notation ("10.0.0.0/255.0.0.0");
    # neither has a meaning for an SK_LOOKUP binding, so only plain digits after the slash are allowed.
    addr_part, slash, length = s.partition("/")
    if "%" in s or (slash and not re.fullmatch(r"[0-9]{1,3}", length)):
        raise InvalidPrefix(f"invalid prefix {_q(s)}: expected ADDRESS or ADDRESS/LENGTH ({_PREFIX_HINT})")
    try:
        return ipaddress.ip_network(s, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(s, strict=False)
            raise InvalidPrefix(f"invalid prefix {_q(s)}: host bits are set; did you mean {fixed}?") from None
        try:
            ipaddress.ip_address(addr_part)
        except ValueError:
            raise InvalidPrefix(
                f"invalid prefix {_q(s)}: {_q(addr_part)} is not an IPv4 or IPv6 address ({_PREFIX_HINT})"
            ) from None
        limit = 32 if ":" not in addr_part else 128
        raise InvalidPrefix(
            f"invalid prefix {_q(s)}: prefix length must be 0-{limit} ({_PREFIX_HINT})"
        ) from None


def parse_endpoint(text: str, *, require_port: bool = True) -> tuple[str, int | None]:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT`` or (with ``require_port=False``) ``HOST`` / ``[IPV6]``.

    HOST is an IP address or a DNS name.  IPv6 addresses must be bracketed even without a port,
    because ``::1:80`` is both a valid address and a plausible typo for ``[::1]:80``.

    :returns: ``(host, port)``; ``port`` is ``None`` when omitted.  IPv6 hosts are returned unbracketed.
    :raises InvalidEndpoint: with a one-line message.
    """
    s = text.strip()
    form = "HOST:PORT or [IPV6]:PORT" if require_port else "HOST, HOST:PORT, [IPV6] or [IPV6]:PORT"
    hint = f"use {form}"

    def bad(why: str) -> InvalidEndpoint:
        return InvalidEndpoint(f"invalid endpoint {_q(s)}: {why} ({hint})")

    if not s:
        raise bad("empty")
    port_text: str | None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise bad("missing ']'")
        host, rest = s[1:end], s[end + 1 :]
        if rest and not rest.startswith(":"):
            raise bad(f"unexpected {_q(rest)} after ']'")
        port_text = rest[1:] if rest else None
        try:
            if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
                raise ValueError
        except ValueError:
            raise bad(f"{_q(host)} inside brackets is not an IPv6 address") from None
    elif s.count(":") > 1:
        # "::1:80" is a valid IPv6 address *and* looks like ::1 port 80; brackets remove the doubt.
        raise bad("IPv6 addresses must be written in brackets, e.g. [::1]:8080")
    else:
        host, colon, rest = s.partition(":")
        port_text = rest if colon else None
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if re.fullmatch(r"[0-9.]+", host) or not _HOSTNAME_RE.fullmatch(host):
                raise bad(f"{_q(host)} is not an IPv4 address or host name") from None
    if "%" in host:
        raise bad("scoped IPv6 addresses are not supported")
    if port_text is None:
        if require_port:
            raise bad("missing port")
        return host, None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not MIN_PORT <= int(port_text) <= MAX_PORT:
        raise bad(f"port {_q(port_text)} is not a number {MIN_PORT}-{MAX_PORT}")
    return host, int(port_text)


def local_route_command(prefix: IPNetwork) -> str:
    """The command that makes ``prefix`` local: ``ip route add local 192.0.2.0/24 dev lo``."""
    family = "-6 " if prefix.version == 6 else ""
    return f"ip {family}route add local {prefix} dev lo"


def _route_type(address: IPAddress, netns: str | None) -> str | None:
    """Ask the kernel which route ``address`` takes; return its type (``"local"``, ...) or ``None``.

    ``None`` means no route at all (``ip`` exits non-zero with "Network is unreachable").  ``ip route
    get`` omits ``type`` for ordinary unicast routes, hence the default.
    """
    # sudo and systemd units often run with a PATH lacking /usr/sbin, where iproute2 installs ip.
    ip = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip") if os.access(p, os.X_OK)), None
    )
    if ip is None:
        raise RouteCheckError(
            "cannot check that prefixes are local: the 'ip' command (iproute2) is not installed"
        )
    argv = [ip]
    if netns is not None:
        argv += ["-n", netns]
    argv += ["-j"]
    if address.version == 6:
        argv += ["-6"]
    argv += ["route", "get", str(address)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RouteCheckError(
            f"cannot check that prefixes are local: running {' '.join(argv)} failed: {exc}"
        ) from None
    if proc.returncode != 0:
        err = " ".join(proc.stderr.split())
        if netns is not None and ("netns" in err.lower() or "namespace" in err.lower()):
            raise RouteCheckError(f"network namespace {netns!r} does not exist: {err}")
        return None
    try:
        routes = json.loads(proc.stdout or "[]")
        return str(routes[0].get("type", "unicast")) if routes else None
    except (ValueError, LookupError, AttributeError, TypeError):
        raise RouteCheckError(
            f"cannot check that prefixes are local: unexpected output from {' '.join(argv)}"
        ) from None


def check_local(prefix: IPNetwork, *, netns: str | None = None) -> None:
    """Check that the kernel delivers traffic for ``prefix`` to this host.

    SK_LOOKUP only runs for packets the routing decision already deemed local, so binding a prefix that
    is routed elsewhere silently does nothing.  This tests the first and the last address of the prefix
    with ``ip -j route get`` (in namespace ``netns`` with ``ip -n NETNS`` when given).  It does not
    find a more specific non-local route in the middle of the prefix.

    An IPv4 prefix's network and broadcast addresses may carry ``broadcast`` routes (the kernel adds
    ``broadcast 127.255.255.255``); for those the neighbouring address is tested instead.

    :raises PrefixNotLocal: naming the address and the ``ip route add local ... dev lo`` that fixes it.
    :raises RouteCheckError: if the routing table cannot be queried.
    """
    size = prefix.num_addresses
    probes: list[tuple[IPAddress, IPAddress | None]] = [
        (prefix[0], prefix[1] if size > 2 else None),
        (prefix[-1], prefix[-2] if size > 2 else None),
    ]
    seen: set[IPAddress] = set()
    for address, fallback in probes:
        if address in seen:
            continue
        seen.add(address)
        kind = _route_type(address, netns)
        if kind == "broadcast" and prefix.version == 4 and fallback is not None:
            address, kind = fallback, _route_type(fallback, netns)
        if kind != "local":
            where = f" in network namespace {netns!r}" if netns else ""
            routed = "has no route" if kind is None else f"is routed as {kind}, not local"
            raise PrefixNotLocal(
                f"prefix {prefix} is not local{where}: {address} {routed}; "
                f"make it local with: {local_route_command(prefix)}",
                prefix,
                address,
            )
