"""Per-message policy in the kernel: rule sets, their compilation into BPF maps, and the enforcer.

A :class:`RuleSet` is an ordered list of :class:`Rule` objects (first match wins) plus a default verdict
and an optional :class:`Framing`.  It is written in TOML (:meth:`RuleSet.from_toml`) or built in Python,
checked completely before anything touches the kernel, and compiled into the maps of
``progs/rules.bpf.c``:

- sent messages (every ``sendmsg``) of sockets enrolled in the ``policy`` SOCKHASH are judged by an
  SK_MSG program;
- received byte streams of sockets enrolled in the ``framed`` SOCKHASH are split into length-prefixed
  messages by an SK_SKB stream parser and each message is judged by an SK_SKB verdict program.

Both SOCKHASHes are keyed by the socket cookie (``SO_COOKIE``, a u64 that is unique for the life of the
kernel).  Sockets enter them from Python (:meth:`Enforcer.enrol`) or, for every TCP connection of a
cgroup v2, from a SOCK_OPS program at connection establishment (:meth:`Enforcer.attach_cgroup`).  A socket
leaves every map by itself when it is closed; the programs keep no other per-socket state.

Verdicts use the names of the proxy's callback verdicts (``Pass``, ``Drop``, ``Redirect``): a
:class:`Rule` accepts :class:`~sockpolicy.proxy.Pass`, :class:`~sockpolicy.proxy.Drop` and
:class:`~sockpolicy.proxy.Redirect` objects, and refuses ``Rewrite`` and ``Close`` with the reason.

Rule sets are replaced atomically (:meth:`Enforcer.replace`): the maps hold a ring of
:data:`N_SLOTS` rule tables; a new set is written into a free slot and activated with one 4-byte store,
and a retired slot is only read or reused after an RCU grace period, so every message is judged by, and
counted in, exactly one complete generation.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import threading
import tomllib
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from sockpolicy import _errors
from sockpolicy._objects import AttachType, Link, Map, ObjectSpec
from sockpolicy._ranges import InvalidRange, PortRange, PortRanges

__all__ = [
    "MAX_RULES",
    "N_SLOTS",
    "PREFIX_MAX",
    "Enforcer",
    "Framing",
    "GenerationStats",
    "Rule",
    "RuleError",
    "RuleSet",
    "RuleStats",
    "label_id",
    "socket_cookie",
]

#: rules per rule set (the SK_MSG program's loop bound)
MAX_RULES = 64
#: rule tables in the kernel ring (generations alive at once, before a grace period is needed)
N_SLOTS = 8
#: longest payload prefix a rule can match
PREFIX_MAX = 64
#: port ranges per rule and direction
MAX_RANGES = 4
#: largest frame the stream parser accepts by default (header included)
DEFAULT_MAX_FRAME = 1 << 20
#: the largest offset of the length field in a frame
MAX_FRAME_OFFSET = 4096

SO_COOKIE = 57
DEFAULT_ROOT = "/sys/fs/bpf/sockpolicy"
VERDICTS = ("Pass", "Drop", "Redirect")
DIRECTIONS = ("send", "receive", "both")

_ACT = {"Pass": 0, "Drop": 1, "Redirect": 2}
_F_INGRESS, _F_SEND, _F_RECEIVE = 1, 2, 4
_DIR_FLAGS = {"send": _F_SEND, "receive": _F_RECEIVE, "both": _F_SEND | _F_RECEIVE}
_U32_MAX = 0xFFFFFFFF

# struct rule in rules.bpf.c: 4+4 port ranges, 10 u32, prefix[64], mask[64].
_RULE_FORMAT = struct.Struct("<" + "HH" * MAX_RANGES * 2 + "10I" + f"{PREFIX_MAX}s{PREFIX_MAX}s")
# struct slot_meta: nrules, max_prefix, default_action, frame_size, frame_offset, frame_adjust,
# frame_max, state, gen.
_SLOT_FORMAT = struct.Struct("<8IQ")
_CONFIG_FORMAT = struct.Struct("<II")
_COUNTER_FORMAT = struct.Struct("<QQ")
_SOURCE_MAX = 65532
_SLOT_STRIDE = MAX_RULES + 1
_STATE_FREE, _STATE_ACTIVE, _STATE_RETIRED = 0, 1, 2
_ENROL_POLICY, _ENROL_FRAMED = 1, 2


class RuleError(ValueError):
    """A rule set is malformed, or cannot be expressed in the kernel.  The message is one line."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------------------
# rules


def _port_ranges(value: Any, what: str) -> PortRanges | None:
    if value is None:
        return None
    if isinstance(value, PortRanges):
        ranges = value
    elif isinstance(value, PortRange):
        ranges = PortRanges([value])
    elif isinstance(value, int) and not isinstance(value, bool):
        ranges = PortRanges([PortRange(value, value)])
    elif isinstance(value, str):
        ranges = PortRanges.parse(value)
    elif isinstance(value, Iterable):
        items = []
        for item in value:
            if isinstance(item, PortRange):
                items.append(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                items.append(PortRange(item, item))
            elif isinstance(item, str):
                items.extend(PortRanges.parse(item))
            else:
                raise RuleError(f"{what}: expected ports such as '80,443,8000-8999', got {item!r}")
        ranges = PortRanges(items)
    else:
        raise RuleError(f"{what}: expected ports such as '80,443,8000-8999', got {value!r}")
    return ranges.merged()


def _verdict_name(verdict: Any) -> tuple[str, str | None]:
    """Normalise a verdict (a name or a proxy verdict object) to (name, redirect label or None)."""
    if isinstance(verdict, str):
        for name in (*VERDICTS, "Rewrite", "Close"):
            if verdict.lower() == name.lower():
                return name, None
        raise RuleError(f"unknown verdict {verdict!r}: use Pass, Drop or Redirect")
    kind = type(verdict).__name__
    if kind in ("Pass", "Drop"):
        return kind, None
    if kind == "Redirect":
        addr = getattr(verdict, "addr", None)
        if isinstance(addr, tuple) and len(addr) == 2:
            return kind, format_label(addr)
        raise RuleError(f"Redirect verdict {verdict!r} has no (host, port) address to use as a label")
    if kind in ("Rewrite", "Close"):
        return kind, None
    raise RuleError(f"unknown verdict {verdict!r}: use Pass, Drop or Redirect")


def format_label(addr: tuple[str, int] | str) -> str:
    """The label of a redirect target given as ``(host, port)``: ``host:port`` (``[v6]:port``).

    IP addresses are written canonically, so that one address spelt two ways gives one label, and a
    v4-mapped IPv6 address (the peer of a dual-stack socket) as plain IPv4, as the proxy reports it
    (``normalize_addr``): a ``Redirect(("127.0.0.1", port))`` must find that socket too.
    """
    if isinstance(addr, str):
        return addr
    host, port = addr
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.version == 6:
            return f"[{ip}]:{port}"
        return f"{ip}:{port}"
    return f"{host}:{port}"


def label_id(label: str) -> int:
    """The u32 key of a label in the ``targets`` SOCKHASH: CRC-32 of its UTF-8 name (stable across runs)."""
    return zlib.crc32(label.encode())


_UNEXPRESSIBLE = {
    "Rewrite": "the kernel programs only pass, drop or redirect whole messages and never change bytes; "
    "keep this decision in a Python on_message callback",
    "Close": "the kernel programs cannot close a connection; keep this decision in a Python callback",
}


@dataclass(frozen=True)
class Rule:
    """One rule: a match and a verdict.  Every match field left at its default matches everything.

    :param verdict: ``"Pass"``, ``"Drop"`` or ``"Redirect"``, or a proxy verdict object
        (:class:`~sockpolicy.proxy.Pass`, ``Drop``, ``Redirect((host, port))``; the address of a
        ``Redirect`` becomes the label ``host:port``).
    :param to: the label of the socket a ``Redirect`` goes to (see :meth:`Enforcer.label`).
    :param ingress: ``Redirect`` onto the target socket's receive queue (its reader gets the message)
        instead of sending it out of the target socket.
    :param local_ports: local port ranges (``"6379"``, ``"8000-8999,9443"``); at most 4 after merging.
    :param remote_ports: remote port ranges, likewise.
    :param prefix: bytes the message must start with (at most :data:`PREFIX_MAX`).
    :param mask: per-byte mask for ``prefix`` (same length); a 0 bit is "don't care".
    :param min_len: smallest message length, in bytes.
    :param max_len: largest message length (``None``: no limit).
    :param apply_bytes: apply the verdict to the next N bytes only, then judge again (sent messages).
    :param cork_bytes: hold sent data until N bytes are buffered, then judge them as one message.
    :param on: ``"send"`` (SK_MSG), ``"receive"`` (framed SK_SKB) or ``"both"``.
    :raises RuleError: a field is invalid or cannot be expressed in the kernel.
    """

    verdict: Any = "Pass"
    name: str = ""
    to: str | None = None
    ingress: bool = False
    local_ports: Any = None
    remote_ports: Any = None
    prefix: bytes = b""
    mask: bytes | None = None
    min_len: int = 0
    max_len: int | None = None
    apply_bytes: int = 0
    cork_bytes: int = 0
    on: str = "both"

    def __post_init__(self) -> None:
        name = self.name or "(unnamed)"
        where = f"rule {name!r}"
        verdict, addr_label = _verdict_name(self.verdict)
        if verdict in _UNEXPRESSIBLE:
            raise RuleError(
                f"{where}: verdict {verdict} cannot be expressed in the kernel: {_UNEXPRESSIBLE[verdict]}"
            )
        to = self.to if self.to is not None else addr_label
        if self.to is not None and addr_label is not None and self.to != addr_label:
            raise RuleError(f"{where}: both a Redirect address and to={self.to!r} given")
        if verdict == "Redirect":
            if not to or not isinstance(to, str):
                raise RuleError(f'{where}: Redirect needs a target label: to = "NAME"')
        elif to is not None:
            raise RuleError(f"{where}: 'to' only goes with verdict Redirect, not {verdict}")
        elif self.ingress:
            raise RuleError(f"{where}: 'ingress' only goes with verdict Redirect, not {verdict}")
        if self.on not in DIRECTIONS:
            raise RuleError(f"{where}: on = {self.on!r}: use 'send', 'receive' or 'both'")
        try:
            lports = _port_ranges(self.local_ports, f"{where}: local_ports")
            rports = _port_ranges(self.remote_ports, f"{where}: remote_ports")
        except InvalidRange as exc:
            raise RuleError(f"{where}: {exc}") from None
        for label, ranges in (("local", lports), ("remote", rports)):
            if ranges is not None and len(ranges) > MAX_RANGES:
                raise RuleError(
                    f"{where}: {len(ranges)} {label} port ranges; the kernel matches at most {MAX_RANGES} "
                    "per rule (split it into several rules)"
                )
        prefix = self.prefix.encode() if isinstance(self.prefix, str) else bytes(self.prefix)
        if len(prefix) > PREFIX_MAX:
            raise RuleError(
                f"{where}: prefix is {len(prefix)} bytes; the kernel matches at most {PREFIX_MAX} bytes"
            )
        if self.mask is None:
            mask = b"\xff" * len(prefix)
        else:
            mask = bytes(self.mask)
            if len(mask) != len(prefix):
                raise RuleError(f"{where}: mask is {len(mask)} bytes but prefix is {len(prefix)}")
        for label, value in (
            ("min_len", self.min_len),
            ("apply_bytes", self.apply_bytes),
            ("cork_bytes", self.cork_bytes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32_MAX:
                raise RuleError(f"{where}: {label} = {value!r}: expected an integer 0-{_U32_MAX}")
        max_len = _U32_MAX if self.max_len is None else self.max_len
        if not isinstance(max_len, int) or isinstance(max_len, bool) or not 0 <= max_len <= _U32_MAX:
            raise RuleError(f"{where}: max_len = {self.max_len!r}: expected an integer 0-{_U32_MAX}")
        if self.min_len > max_len:
            raise RuleError(f"{where}: min_len {self.min_len} is greater than max_len {max_len}")
        if (self.apply_bytes or self.cork_bytes) and self.on == "receive":
            raise RuleError(
                f"{where}: apply_bytes/cork_bytes act on sent data (SK_MSG); they mean nothing for "
                "received frames (on = 'receive')"
            )
        if self.apply_bytes and self.cork_bytes:
            raise RuleError(f"{where}: use apply_bytes or cork_bytes, not both")
        # Store the normalised forms.
        object.__setattr__(self, "verdict", verdict)
        object.__setattr__(self, "to", to)
        object.__setattr__(self, "local_ports", lports)
        object.__setattr__(self, "remote_ports", rports)
        object.__setattr__(self, "prefix", bytes(p & m for p, m in zip(prefix, mask, strict=True)))
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "max_len", None if max_len == _U32_MAX else max_len)

    # -- matching ------------------------------------------------------------------------------------------

    @property
    def effective_min_len(self) -> int:
        """The shortest message that can match: a prefix needs at least its own length."""
        return max(self.min_len, len(self.prefix))

    @property
    def effective_max_len(self) -> int:
        return _U32_MAX if self.max_len is None else self.max_len

    def directions(self) -> set[str]:
        return {"send", "receive"} if self.on == "both" else {self.on}

    def matches(
        self, data: bytes, *, local_port: int = 0, remote_port: int = 0, direction: str = "send"
    ) -> bool:
        """Whether this rule matches a message, exactly as the kernel decides it.

        :param data: the whole message (only its length and first :data:`PREFIX_MAX` bytes matter).
        """
        if direction not in self.directions():
            return False
        if not self.effective_min_len <= len(data) <= self.effective_max_len:
            return False
        if self.local_ports is not None and local_port not in self.local_ports:
            return False
        if self.remote_ports is not None and remote_port not in self.remote_ports:
            return False
        assert self.mask is not None
        return all((b & m) == p for b, m, p in zip(data, self.mask, self.prefix, strict=False))

    def covers(self, other: Rule) -> bool:
        """Whether every message ``other`` matches is also matched by this rule."""
        if not other.directions() <= self.directions():
            return False
        if not (
            self.effective_min_len <= other.effective_min_len
            and other.effective_max_len <= self.effective_max_len
        ):
            return False
        for mine, theirs in ((self.local_ports, other.local_ports), (self.remote_ports, other.remote_ports)):
            if mine is None:
                continue
            if theirs is None:
                return False
            if not all(any(m.lo <= t.lo and t.hi <= m.hi for m in mine) for t in theirs):
                return False
        assert self.mask is not None and other.mask is not None
        for i in range(len(self.prefix)):
            m = self.mask[i]
            om = other.mask[i] if i < len(other.mask) else 0
            op = other.prefix[i] if i < len(other.prefix) else 0
            if m & ~om:  # we test bits the other leaves free
                return False
            if (op & m) != self.prefix[i]:
                return False
        return True

    def can_match(self) -> bool:
        return self.effective_min_len <= self.effective_max_len

    # -- presentation --------------------------------------------------------------------------------------

    def describe(self) -> str:
        """A short one-line summary of the match and verdict."""
        parts = []
        if self.on != "both":
            parts.append(f"on={self.on}")
        if self.local_ports is not None:
            parts.append(f"lport={self.local_ports}")
        if self.remote_ports is not None:
            parts.append(f"rport={self.remote_ports}")
        if self.prefix:
            assert self.mask is not None
            shown = self.prefix.hex() if not _printable(self.prefix) else repr(self.prefix)[1:]
            parts.append(f"prefix={shown}")
            if any(m != 0xFF for m in self.mask):
                parts.append(f"mask={self.mask.hex()}")
        if self.min_len:
            parts.append(f"len>={self.min_len}")
        if self.max_len is not None:
            parts.append(f"len<={self.max_len}")
        if self.apply_bytes:
            parts.append(f"apply={self.apply_bytes}")
        if self.cork_bytes:
            parts.append(f"cork={self.cork_bytes}")
        verdict = self.verdict
        if verdict == "Redirect":
            verdict += f"({self.to}{', ingress' if self.ingress else ''})"
        return f"{' '.join(parts) or 'any'} -> {verdict}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (the same field names as the TOML format)."""
        doc: dict[str, Any] = {"name": self.name, "verdict": self.verdict}
        if self.to is not None:
            doc["to"] = self.to
        if self.ingress:
            doc["ingress"] = True
        if self.local_ports is not None:
            doc["local_ports"] = str(self.local_ports)
        if self.remote_ports is not None:
            doc["remote_ports"] = str(self.remote_ports)
        if self.prefix:
            assert self.mask is not None
            doc["prefix_hex"] = self.prefix.hex()
            doc["mask_hex"] = self.mask.hex()
        if self.min_len:
            doc["min_len"] = self.min_len
        if self.max_len is not None:
            doc["max_len"] = self.max_len
        if self.apply_bytes:
            doc["apply_bytes"] = self.apply_bytes
        if self.cork_bytes:
            doc["cork_bytes"] = self.cork_bytes
        if self.on != "both":
            doc["on"] = self.on
        return doc

    def encode(self) -> bytes:
        """The ``struct rule`` the BPF programs read."""
        ports: list[int] = []
        for ranges in (self.local_ports, self.remote_ports):
            items = list(ranges or ())
            for i in range(MAX_RANGES):
                ports += [items[i].lo, items[i].hi] if i < len(items) else [0, 0]
        flags = _DIR_FLAGS[self.on] | (_F_INGRESS if self.ingress else 0)
        return _RULE_FORMAT.pack(
            *ports,
            len(self.local_ports or ()),
            len(self.remote_ports or ()),
            self.min_len,
            self.effective_max_len,
            len(self.prefix),
            _ACT[self.verdict],
            flags,
            label_id(self.to) if self.to else 0,
            self.apply_bytes,
            self.cork_bytes,
            self.prefix,
            self.mask,
        )


def _printable(data: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in data)


@dataclass(frozen=True)
class Framing:
    """How received streams are split into messages: a big-endian length field.

    A frame is ``offset`` bytes, the ``size``-byte length field, then ``length`` more bytes (or, with
    ``includes_header``, ``length`` is the size of the whole frame).

    :raises RuleError: a field is out of range.
    """

    size: int = 4
    offset: int = 0
    includes_header: bool = False
    max_frame: int = DEFAULT_MAX_FRAME

    def __post_init__(self) -> None:
        if self.size not in (2, 4):
            raise RuleError(f"framing: length must be 'u16' or 'u32' (2 or 4 bytes), not {self.size!r}")
        if not isinstance(self.offset, int) or not 0 <= self.offset <= MAX_FRAME_OFFSET:
            raise RuleError(f"framing: offset {self.offset!r} must be 0-{MAX_FRAME_OFFSET}")
        if not isinstance(self.max_frame, int) or not self.offset + self.size < self.max_frame <= _U32_MAX:
            raise RuleError(
                f"framing: max_frame {self.max_frame!r} must exceed the header and fit in 32 bits"
            )

    @property
    def header(self) -> int:
        return self.offset + self.size

    def frame(self, payload: bytes, before: bytes = b"") -> bytes:
        """Build one frame: ``before`` (exactly ``offset`` bytes), the length, ``payload``."""
        if len(before) != self.offset:
            raise ValueError(f"framing needs exactly {self.offset} bytes before the length")
        length = len(payload) + (self.header if self.includes_header else 0)
        return before + length.to_bytes(self.size, "big") + payload

    def to_dict(self) -> dict[str, Any]:
        return {
            "length": f"u{self.size * 8}",
            "offset": self.offset,
            "includes_header": self.includes_header,
            "max_frame": self.max_frame,
        }


_RULE_FIELDS = {
    "name", "verdict", "to", "ingress", "local_ports", "remote_ports", "prefix", "prefix_hex", "mask_hex",
    "min_len", "max_len", "apply_bytes", "cork_bytes", "on",
}  # fmt: skip
_TOP_FIELDS = {"default", "framing", "rule"}
_FRAMING_FIELDS = {"length", "offset", "includes_header", "max_frame"}


def _check_type(where: str, key: str, value: Any, kind: type | tuple[type, ...], shown: str) -> None:
    if not isinstance(value, kind) or (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise RuleError(f"{where}: {key} = {value!r}: expected {shown}")


def _hex(where: str, key: str, text: Any) -> bytes:
    _check_type(where, key, text, str, "a hex string")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise RuleError(f"{where}: {key} = {text!r} is not valid hex") from None


def _rule_from_table(index: int, table: Any) -> Rule:
    where = f"rule {index + 1}"
    if not isinstance(table, dict):
        raise RuleError(f"{where}: expected a table ([[rule]]), got {type(table).__name__}")
    if "name" in table:
        _check_type(where, "name", table["name"], str, "a string")
        where = f"rule {table['name']!r}"
    unknown = sorted(set(table) - _RULE_FIELDS)
    if unknown:
        raise RuleError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_RULE_FIELDS))})")
    kw: dict[str, Any] = {"name": table.get("name", f"rule-{index + 1}")}
    if "verdict" not in table:
        raise RuleError(f"{where}: missing verdict (Pass, Drop or Redirect)")
    _check_type(where, "verdict", table["verdict"], str, "Pass, Drop or Redirect")
    kw["verdict"] = table["verdict"]
    for key, kind, shown in (
        ("to", str, "a label string"),
        ("ingress", bool, "true or false"),
        ("on", str, "'send', 'receive' or 'both'"),
        ("min_len", int, "an integer"),
        ("max_len", int, "an integer"),
        ("apply_bytes", int, "an integer"),
        ("cork_bytes", int, "an integer"),
    ):
        if key in table:
            _check_type(where, key, table[key], kind, shown)
            kw[key] = table[key]
    for key in ("local_ports", "remote_ports"):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, str | int | list):
                raise RuleError(f'{where}: {key} = {value!r}: expected ports such as "80,443,8000-8999"')
            kw[key] = value
    if "prefix" in table and "prefix_hex" in table:
        raise RuleError(f"{where}: give prefix or prefix_hex, not both")
    if "prefix" in table:
        _check_type(where, "prefix", table["prefix"], str, "a string (or use prefix_hex)")
        kw["prefix"] = table["prefix"].encode()
    elif "prefix_hex" in table:
        kw["prefix"] = _hex(where, "prefix_hex", table["prefix_hex"])
    if "mask_hex" in table:
        kw["mask"] = _hex(where, "mask_hex", table["mask_hex"])
    try:
        return Rule(**kw)
    except RuleError as exc:
        text = str(exc)
        raise RuleError(text if text.startswith("rule ") else f"{where}: {text}") from None


def _framing_from_table(table: Any) -> Framing:
    if not isinstance(table, dict):
        raise RuleError("framing: expected a table ([framing])")
    unknown = sorted(set(table) - _FRAMING_FIELDS)
    if unknown:
        raise RuleError(
            f"framing: unknown field {unknown[0]!r} (known: {', '.join(sorted(_FRAMING_FIELDS))})"
        )
    length = table.get("length", "u32")
    if length not in ("u16", "u32"):
        raise RuleError(f"framing: length = {length!r}: use 'u16' or 'u32' (big-endian)")
    for key, kind, shown in (
        ("offset", int, "an integer"),
        ("max_frame", int, "an integer"),
        ("includes_header", bool, "true or false"),
    ):
        if key in table:
            _check_type("framing", key, table[key], kind, shown)
    return Framing(
        size=2 if length == "u16" else 4,
        offset=table.get("offset", 0),
        includes_header=table.get("includes_header", False),
        max_frame=table.get("max_frame", DEFAULT_MAX_FRAME),
    )


@dataclass(frozen=True)
class RuleSet:
    """An ordered rule list (first match wins), the verdict when none matches, and optional framing.

    :raises RuleError: more than :data:`MAX_RULES` rules, duplicate names, a rule that can never match
        (including one fully shadowed by an earlier rule), or two labels with the same id.
    """

    rules: tuple[Rule, ...] = ()
    default: str = "Pass"
    framing: Framing | None = None

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        if len(rules) > MAX_RULES:
            raise RuleError(f"{len(rules)} rules; the kernel evaluates at most {MAX_RULES}")
        named = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise RuleError(f"rule {i + 1}: expected a Rule, got {type(rule).__name__}")
            named.append(rule if rule.name else _replace(rule, name=f"rule-{i + 1}"))
        seen: dict[str, int] = {}
        for i, rule in enumerate(named):
            if rule.name in seen:
                raise RuleError(
                    f"rule {rule.name!r}: duplicate name (rules {seen[rule.name] + 1} and {i + 1})"
                )
            seen[rule.name] = i
            if not rule.can_match():
                raise RuleError(
                    f"rule {rule.name!r} can never match: its prefix needs {rule.effective_min_len} bytes "
                    f"but max_len is {rule.max_len}"
                )
            for earlier in named[:i]:
                if earlier.covers(rule):
                    raise RuleError(
                        f"rule {rule.name!r} can never match: earlier rule {earlier.name!r} matches every "
                        "message it matches (first match wins; reorder or narrow the rules)"
                    )
        default, _ = _verdict_name(self.default)
        if default not in ("Pass", "Drop"):
            raise RuleError(f"default = {self.default!r}: the default verdict must be Pass or Drop")
        ids: dict[int, str] = {}
        for label in {r.to for r in named if r.to}:
            other = ids.setdefault(label_id(label), label)
            if other != label:
                raise RuleError(f"labels {other!r} and {label!r} have the same id; rename one of them")
        if self.framing is not None and not isinstance(self.framing, Framing):
            raise RuleError("framing must be a Framing")
        object.__setattr__(self, "rules", tuple(named))
        object.__setattr__(self, "default", default)

    # -- input ---------------------------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, text: str, *, source: str = "rules") -> Self:
        """Parse a TOML rule set (see ``docs/rules.md``).

        :raises RuleError: malformed TOML, unknown fields, or an invalid rule; one line naming ``source``.
        """
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RuleError(f"{source}: invalid TOML: {_one_line(str(exc))}") from None
        try:
            return cls.from_dict(doc)
        except RuleError as exc:
            raise RuleError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        """Read :meth:`from_toml` from a file.  :raises RuleError: also when the file cannot be read."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise RuleError(f"cannot read rules file {os.fspath(path)}: {_one_line(reason)}") from None
        return cls.from_toml(text, source=os.fspath(path))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Self:
        unknown = sorted(set(doc) - _TOP_FIELDS)
        if unknown:
            raise RuleError(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(_TOP_FIELDS))})")
        tables = doc.get("rule", [])
        if not isinstance(tables, list):
            raise RuleError("'rule' must be an array of tables: write [[rule]]")
        rules = tuple(_rule_from_table(i, t) for i, t in enumerate(tables))
        default = doc.get("default", "Pass")
        if not isinstance(default, str):
            raise RuleError(f"default = {default!r}: expected Pass or Drop")
        framing = _framing_from_table(doc["framing"]) if "framing" in doc else None
        return cls(rules, default=default, framing=framing)

    # -- evaluation and output -----------------------------------------------------------------------------

    def evaluate(
        self, data: bytes, *, local_port: int = 0, remote_port: int = 0, direction: str = "send"
    ) -> tuple[int | None, str]:
        """Judge a message in Python exactly as the kernel does: ``(rule index or None, verdict name)``."""
        for i, rule in enumerate(self.rules):
            if rule.matches(data, local_port=local_port, remote_port=remote_port, direction=direction):
                return i, rule.verdict
        return None, self.default

    def labels(self) -> list[str]:
        """The redirect labels the rules use, in order of first use."""
        return list(dict.fromkeys(r.to for r in self.rules if r.to))

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"default": self.default, "rule": [r.to_dict() for r in self.rules]}
        if self.framing is not None:
            doc["framing"] = self.framing.to_dict()
        return doc

    def slot_header(self, gen: int, state: int) -> bytes:
        framing = self.framing
        return _SLOT_FORMAT.pack(
            len(self.rules),
            max((len(r.prefix) for r in self.rules), default=0),
            _ACT[self.default],
            framing.size if framing else 0,
            framing.offset if framing else 0,
            (0 if framing.includes_header else framing.header) if framing else 0,
            framing.max_frame if framing else 0,
            state,
            gen,
        )


def _replace(rule: Rule, **changes: Any) -> Rule:
    fields = {f: getattr(rule, f) for f in Rule.__dataclass_fields__}
    fields.update(changes)
    return Rule(**fields)


# ---------------------------------------------------------------------------------------------------------
# counters


@dataclass(frozen=True)
class RuleStats:
    """Messages and bytes judged by one rule (``index`` None: no rule matched, the default applied)."""

    index: int | None
    name: str
    verdict: str
    msgs: int
    bytes: int


@dataclass(frozen=True)
class GenerationStats:
    """The counters of one rule-set generation.

    ``final`` is True once the generation was retired and a grace period passed: the numbers no longer
    change.  ``msgs`` counts program runs (verdicts): one per ``sendmsg``, plus one more per ``apply_bytes``
    window or completed cork, and one per received frame.
    """

    gen: int
    rules: tuple[RuleStats, ...]
    unmatched: RuleStats
    final: bool = False

    @property
    def msgs(self) -> int:
        return sum(r.msgs for r in self.rules) + self.unmatched.msgs

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rules) + self.unmatched.bytes

    def __getitem__(self, name: str) -> RuleStats:
        for r in (*self.rules, self.unmatched):
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "generation": self.gen,
            "final": self.final,
            "rules": [vars(r) for r in self.rules],
            "unmatched": vars(self.unmatched),
        }


# ---------------------------------------------------------------------------------------------------------
# the enforcer


def socket_cookie(sock: socket.socket | int) -> int:
    """The kernel's socket cookie (``SO_COOKIE``): the key of a socket in ``policy`` and ``framed``."""
    if isinstance(sock, int):
        with socket.socket(fileno=os.dup(sock)) as dup:
            return int.from_bytes(dup.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def _fileno(sock: socket.socket | int) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def state_dir(netns_inode: int | None = None, root: str | os.PathLike[str] = DEFAULT_ROOT) -> Path:
    """Where the rules state of a network namespace is pinned: ``<root>/rules/<netns inode>``.

    It is a sibling tree of the dispatcher's ``<root>/<netns inode>`` so that neither one's atomic
    creation or removal sees the other's files.
    """
    if netns_inode is None:
        # thread-self, not self: /proc/self is the thread group leader, whose namespace differs from a
        # thread's that entered another one with setns() (the tests' NetNS.call does that).
        netns_inode = os.stat("/proc/thread-self/ns/net").st_ino
    return Path(os.fspath(root)) / "rules" / str(netns_inode)


_MAP_NAMES = (
    "config",
    "slots",
    "rules",
    "counters",
    "policy",
    "framed",
    "targets",
    "barrier",
    "barrier_inner",
    "sources",
    "pulls",
)
# Maps a pinned state made by an older version may lack (opened when present).
_OPTIONAL_MAP_NAMES = ("frames",)


class Enforcer:
    """The kernel side of per-message rules: the maps, the attached programs, and the rule sets.

    Create one with :meth:`create` (optionally pinned, so other processes and the CLI see it) or open the
    pinned one with :meth:`open`.  Closing an unpinned enforcer leaves sockets unpoliced once no fd holds
    the maps; :meth:`unload` removes pinned state and detaches everything.
    """

    def __init__(self, maps: dict[str, Map], *, directory: Path | None = None) -> None:
        self._maps = maps
        self.directory = directory
        self._thread_lock = threading.Lock()
        self._lock_fd: int | None = None
        if directory is not None:
            self._lock_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._links: list[Link] = []
        #: generation -> final counters of generations retired by this process
        self.retired: dict[int, GenerationStats] = {}
        self._ncpu = self._maps["counters"].lookup_size // _COUNTER_FORMAT.size

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, *, pin: bool = False, root: str | os.PathLike[str] = DEFAULT_ROOT, max_sockets: int = 65536
    ) -> Enforcer:
        """Load ``rules.bpf.o`` and attach its programs to the ``policy`` and ``framed`` maps.

        Until :meth:`replace` loads a rule set every message passes.

        :param pin: pin the maps under :func:`state_dir` (created atomically; if another process created
            it first, that one is opened instead).
        :raises LoadError: the programs do not load on this kernel.
        """
        if pin:
            return cls._create_pinned(Path(os.fspath(root)), max_sockets)
        return cls(cls._load(max_sockets))

    @staticmethod
    def _load(max_sockets: int) -> dict[str, Map]:
        spec = ObjectSpec.from_package("rules")
        spec.max_entries = {"policy": max_sockets, "framed": max_sockets, "frames": max_sockets}
        obj = spec.load()
        try:
            maps = {name: obj.take_map(name) for name in (*_MAP_NAMES, *_OPTIONAL_MAP_NAMES)}
            attachments = [
                obj.programs["rules_msg"].attach_map(maps["policy"], AttachType.SK_MSG_VERDICT),
                obj.programs["rules_parser"].attach_map(maps["framed"], AttachType.SK_SKB_STREAM_PARSER),
                obj.programs["rules_skb"].attach_map(maps["framed"], AttachType.SK_SKB_STREAM_VERDICT),
            ]
            for attachment in attachments:
                attachment.close()  # the attachment lives as long as the map
        finally:
            obj.close()
        return maps

    @classmethod
    def _create_pinned(cls, root: Path, max_sockets: int) -> Enforcer:
        from sockpolicy import _state

        final = state_dir(root=root)
        if not final.exists():
            _state.ensure_root(root)
            parent = root / "rules"
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent, _state.DIR_MODE)
            inode = int(final.name)
            _state.sweep_stale_tmp(parent, inode)

            def populate(tmp: Path) -> Any:
                maps = cls._load(max_sockets)
                try:
                    for name, m in maps.items():
                        m.pin(tmp / name)
                finally:
                    for m in maps.values():
                        m.close()
                return lambda: None

            _state.create_atomically(parent, inode, populate)
        return cls.open(root=root)

    @classmethod
    def open(cls, *, root: str | os.PathLike[str] = DEFAULT_ROOT, netns_inode: int | None = None) -> Enforcer:
        """Open the pinned state of this network namespace.

        :raises NotLoaded: nothing is pinned (run ``sockpolicy enforce`` or ``Enforcer.create(pin=True)``).
        """
        directory = state_dir(netns_inode, root)
        maps: dict[str, Map] = {}
        try:
            for name in _MAP_NAMES:
                maps[name] = Map.from_pin(directory / name)
                maps[name].name = name
            for name in _OPTIONAL_MAP_NAMES:
                with contextlib.suppress(_errors.KeyNotFound):
                    maps[name] = Map.from_pin(directory / name)
                    maps[name].name = name
        except _errors.KeyNotFound:
            for m in maps.values():
                m.close()
            raise _errors.NotLoaded(
                f"no kernel rules are loaded in this network namespace ({directory} does not exist): "
                "run sockpolicy enforce"
            ) from None
        return cls(maps, directory=directory)

    def close(self) -> None:
        """Close this process's fds (pinned state and cgroup links that were pinned stay)."""
        for m in self._maps.values():
            m.close()
        for link in self._links:
            link.close()
        self._links.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def map(self, name: str) -> Map:
        """One of the maps by name (``policy``, ``framed``, ``targets``, ``counters``, ...)."""
        return self._maps[name]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        with self._thread_lock:
            if self._lock_fd is None:
                yield
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- sockets -------------------------------------------------------------------------------------------

    def enrol(self, sock: socket.socket | int, *, send: bool = True, framed: bool = False) -> int:
        """Put a socket under the rules: its sent messages (``send``) and/or its received frames
        (``framed``).  Returns its cookie, the key in the maps.  The socket leaves them when it closes.

        :raises BadSocket: not a connected TCP socket (or a kind the kernel refuses).
        :raises Busy: the socket is already in another map with SK_MSG / SK_SKB programs.
        """
        cookie = socket_cookie(sock)
        fd = struct.pack("<Q", _fileno(sock))
        key = struct.pack("<Q", cookie)
        if send:
            self._maps["policy"].update(key, fd)
        if framed:
            self._forget_frame_position(key)  # its stream may have been read unframed meanwhile
            self._maps["framed"].update(key, fd)
        return cookie

    def _forget_frame_position(self, key: bytes) -> None:
        frames = self._maps.get("frames")
        if frames is not None:
            with contextlib.suppress(_errors.KeyNotFound, _errors.InvalidArgument):
                frames.delete(key)

    def unenrol(self, sock: socket.socket | int) -> None:
        """Take a socket out of ``policy`` and ``framed`` (absent is fine)."""
        key = struct.pack("<Q", socket_cookie(sock))
        for name in ("policy", "framed"):
            with contextlib.suppress(_errors.KeyNotFound, _errors.InvalidArgument):
                self._maps[name].delete(key)
        self._forget_frame_position(key)

    def enrolled(self, which: str = "policy") -> list[int]:
        """Cookies of the sockets in ``policy`` (or ``framed``)."""
        return [struct.unpack("<Q", k)[0] for k in self._maps[which].keys()]  # noqa: SIM118 (Map is not iterable)

    def label(self, sock: socket.socket | int, name: str | tuple[str, int] | None = None) -> str:
        """Make ``sock`` the target of ``Redirect`` rules that name ``name``.

        :param name: a label, or ``(host, port)``; default: the socket's peer address, so that a
            ``Redirect((host, port))`` rule goes to the connected socket whose peer is ``host:port``.
        :returns: the label.
        """
        if name is None:
            s = sock if isinstance(sock, socket.socket) else socket.socket(fileno=os.dup(sock))
            try:
                name = format_label(s.getpeername()[:2])
            finally:
                if s is not sock:
                    s.close()
        label = format_label(name)
        self._maps["targets"].update(struct.pack("<I", label_id(label)), struct.pack("<Q", _fileno(sock)))
        return label

    def unlabel(self, name: str | tuple[str, int]) -> None:
        with contextlib.suppress(_errors.KeyNotFound, _errors.InvalidArgument):
            self._maps["targets"].delete(struct.pack("<I", label_id(format_label(name))))

    def labelled(self) -> list[int]:
        """Label ids that currently have a socket."""
        return [struct.unpack("<I", k)[0] for k in self._maps["targets"].keys()]  # noqa: SIM118

    def attach_cgroup(
        self,
        path: str | os.PathLike[str],
        *,
        send: bool = True,
        framed: bool = False,
        pin: bool | None = None,
    ) -> Link:
        """Enrol every TCP connection of a cgroup v2 (and its descendants) when it is established.

        :param pin: pin the link under the state directory so it outlives this process (default: when
            this enforcer is pinned).  A pinned link is removed by :meth:`unload` or :meth:`detach_cgroup`.
        :raises RuleError: ``path`` is not a cgroup v2 directory.
        """
        path = os.fspath(path)
        check_cgroup(path)
        spec = ObjectSpec.from_package("enrol")
        spec.reuse_maps = {"policy": self._maps["policy"], "framed": self._maps["framed"]}
        with spec.load() as obj:
            flags = (_ENROL_POLICY if send else 0) | (_ENROL_FRAMED if framed else 0)
            obj.maps["enrol_config"].update(struct.pack("<I", 0), struct.pack("<I", flags))
            link = obj.programs["enrol"].attach_cgroup(path)
            if pin if pin is not None else self.directory is not None:
                if self.directory is None:
                    link.close()
                    raise RuleError("cannot pin a cgroup link of an unpinned enforcer")
                name = f"cgroup-{os.stat(path).st_ino}"
                with self._locked():
                    target = self.directory / name
                    if target.exists():
                        _detach_pinned(target)
                        os.unlink(target)
                    link.pin(target)
                    os.chmod(target, 0o600)
        self._links.append(link)
        return link

    def detach_cgroup(self, path: str | os.PathLike[str]) -> bool:
        """Detach the pinned enrolment link of a cgroup.  Returns whether one was pinned."""
        if self.directory is None:
            return False
        target = self.directory / f"cgroup-{os.stat(path).st_ino}"
        if not target.exists():
            return False
        with self._locked():
            _detach_pinned(target)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
        return True

    def cgroup_links(self) -> list[str]:
        """Names of the pinned cgroup links (``cgroup-<inode>``)."""
        if self.directory is None:
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.name.startswith("cgroup-"))

    # -- rule sets -----------------------------------------------------------------------------------------

    def _config_slot(self) -> int:
        return _CONFIG_FORMAT.unpack(self._maps["config"].lookup(struct.pack("<I", 0)))[0] % N_SLOTS

    def _meta(self, slot: int) -> tuple[int, ...]:
        return _SLOT_FORMAT.unpack(self._maps["slots"].lookup(struct.pack("<I", slot)))

    def _set_state(self, slot: int, state: int) -> None:
        meta = list(self._meta(slot))
        meta[7] = state
        self._maps["slots"].update(struct.pack("<I", slot), _SLOT_FORMAT.pack(*meta))

    @property
    def generation(self) -> int:
        """The active generation (0: no rule set was ever loaded, everything passes)."""
        meta = self._meta(self._config_slot())
        return meta[8] if meta[7] == _STATE_ACTIVE else 0

    def replace(self, ruleset: RuleSet) -> int:
        """Atomically replace the whole rule set; returns the new generation number.

        Messages in flight are judged either by the old or by the new set, never by a mixture.  The old
        generation's counters become final after the next grace period (see :meth:`flush`).
        """
        if not isinstance(ruleset, RuleSet):
            raise TypeError(f"replace() needs a RuleSet, not {type(ruleset).__name__}")
        source = json.dumps(ruleset.to_dict(), separators=(",", ":")).encode()
        if len(source) > _SOURCE_MAX:
            raise RuleError(f"the rule set's description is {len(source)} bytes; at most {_SOURCE_MAX} fit")
        with self._locked():
            active = self._config_slot()
            metas = [self._meta(s) for s in range(N_SLOTS)]
            active_meta = metas[active]
            target = (active + 1) % N_SLOTS
            if metas[target][7] == _STATE_RETIRED:
                self._grace_period()
                self._harvest_retired(metas)
            new_gen = max(m[8] for m in metas) + 1
            self._zero_counters(target)
            rules = self._maps["rules"]
            for i, rule in enumerate(ruleset.rules):
                rules.update(struct.pack("<I", target * MAX_RULES + i), rule.encode())
            self._maps["sources"].update(
                struct.pack("<I", target), struct.pack("<I", len(source)) + source.ljust(_SOURCE_MAX, b"\0")
            )
            self._maps["slots"].update(struct.pack("<I", target), ruleset.slot_header(new_gen, _STATE_ACTIVE))
            # The switch: one aligned 4-byte store that every program reads exactly once per message.
            self._maps["config"].update(struct.pack("<I", 0), _CONFIG_FORMAT.pack(target, 0))
            if active_meta[7] == _STATE_ACTIVE:
                self._set_state(active, _STATE_RETIRED)
        return new_gen

    def flush(self) -> dict[int, GenerationStats]:
        """Wait for a grace period and finalise the counters of every retired generation.

        :returns: the generations finalised now (also added to :attr:`retired`).
        """
        with self._locked():
            metas = [self._meta(s) for s in range(N_SLOTS)]
            if not any(m[7] == _STATE_RETIRED for m in metas):
                return {}
            self._grace_period()
            return self._harvest_retired(metas)

    def _grace_period(self) -> None:
        # Updating a map-in-map makes the kernel wait for an RCU grace period (synchronize_rcu) before
        # the syscall returns: afterwards no program still runs with a slot number read before.
        self._maps["barrier"].update(struct.pack("<I", 0), struct.pack("<I", self._maps["barrier_inner"].fd))

    def _harvest_retired(self, metas: Sequence[tuple[int, ...]]) -> dict[int, GenerationStats]:
        done = {}
        for slot, meta in enumerate(metas):
            if meta[7] != _STATE_RETIRED:
                continue
            stats = self._read_stats(slot, meta, final=True)
            self._zero_counters(slot)
            self._set_state(slot, _STATE_FREE)
            done[stats.gen] = stats
        self.retired.update(done)
        return done

    def _zero_counters(self, slot: int) -> None:
        zero = bytes(_COUNTER_FORMAT.size * self._ncpu)
        counters = self._maps["counters"]
        for i in range(_SLOT_STRIDE):
            counters.update(struct.pack("<I", slot * _SLOT_STRIDE + i), zero)

    def _source(self, slot: int) -> dict[str, Any]:
        raw = self._maps["sources"].lookup(struct.pack("<I", slot))
        (length,) = struct.unpack_from("<I", raw)
        if not length:
            return {"default": "Pass", "rule": []}
        return json.loads(raw[4 : 4 + length])

    def _read_stats(self, slot: int, meta: tuple[int, ...], *, final: bool) -> GenerationStats:
        source = self._source(slot)
        counters = self._maps["counters"]
        nrules = meta[0]
        totals = []
        for i in [*range(nrules), MAX_RULES]:
            raw = counters.lookup(struct.pack("<I", slot * _SLOT_STRIDE + min(i, MAX_RULES)))
            msgs = byts = 0
            for cpu in range(self._ncpu):
                m, b = _COUNTER_FORMAT.unpack_from(raw, cpu * _COUNTER_FORMAT.size)
                msgs += m
                byts += b
            totals.append((msgs, byts))
        described = source.get("rule", [])
        rules = tuple(
            RuleStats(
                i,
                described[i]["name"] if i < len(described) else f"rule-{i + 1}",
                described[i]["verdict"] if i < len(described) else "?",
                *totals[i],
            )
            for i in range(nrules)
        )
        unmatched = RuleStats(None, "(default)", source.get("default", "Pass"), *totals[-1])
        return GenerationStats(meta[8], rules, unmatched, final=final)

    def stats(self) -> GenerationStats:
        """Live counters of the active generation (they keep changing while traffic flows)."""
        slot = self._config_slot()
        return self._read_stats(slot, self._meta(slot), final=False)

    def pulls(self) -> tuple[int, int]:
        """How often the SK_MSG program had to pull a prefix together from several scatterlist elements
        (``bpf_msg_pull_data``), and how often that failed."""
        m = self._maps["pulls"]
        return tuple(struct.unpack("<Q", m.lookup(struct.pack("<I", i)))[0] for i in range(2))  # type: ignore[return-value]

    def frame_resyncs(self) -> int:
        """How often the framed-receive programs lost track of where the current frame starts in the skb
        they were given (no per-socket position, or one inconsistent with the skb) and judged from the
        skb's start instead.  0 in normal operation; see docs/rules.md."""
        m = self._maps["pulls"]
        try:
            return struct.unpack("<Q", m.lookup(struct.pack("<I", 2)))[0]  # type: ignore[no-any-return]
        except (_errors.KeyNotFound, _errors.InvalidArgument):
            return 0  # pinned by a version without the counter

    def ruleset(self) -> RuleSet | None:
        """The active rule set, as loaded (None when none was ever loaded)."""
        slot = self._config_slot()
        if self._meta(slot)[7] != _STATE_ACTIVE:
            return None
        return RuleSet.from_dict(self._source(slot))

    # -- teardown ------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Remove every socket from ``policy``, ``framed`` and ``targets`` (they are no longer policed)."""
        for name in ("policy", "framed", "targets"):
            m = self._maps[name]
            for key in list(m.keys()):
                with contextlib.suppress(_errors.KeyNotFound, _errors.InvalidArgument):
                    m.delete(key)

    def unload(self) -> None:
        """Detach the cgroup links, take every socket out of the maps and remove the pinned state."""
        # A Splicer shares the rule tables (docs/splice.md) and keeps them alive past the unpinning: load an
        # empty rule set first, so that spliced connections are judged by nothing from now on.
        with contextlib.suppress(_errors.SockpolicyError, RuleError):
            self.replace(RuleSet())
        for link in self._links:
            with contextlib.suppress(_errors.BpfError):
                link.detach()
        self.clear()
        if self.directory is not None:
            with self._locked():
                for entry in list(self.directory.iterdir()):
                    if entry.name.startswith("cgroup-"):
                        _detach_pinned(entry)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry)
                with contextlib.suppress(OSError):
                    os.rmdir(self.directory)
        self.close()


def _detach_pinned(path: Path) -> None:
    try:
        link = Link.from_pin(path)
    except _errors.BpfError:
        return
    with link, contextlib.suppress(_errors.BpfError):
        link.detach()


CGROUP2_SUPER_MAGIC = 0x63677270


def check_cgroup(path: str | os.PathLike[str]) -> None:
    """Check that ``path`` is a cgroup v2 directory.  :raises RuleError: one line saying what is wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise RuleError(f"cgroup {path} does not exist")
    if not os.path.isdir(path):
        raise RuleError(f"cgroup {path} is not a directory")
    if not os.path.exists(os.path.join(path, "cgroup.procs")) or not _is_cgroup2(path):
        raise RuleError(f"{path} is not a cgroup v2 directory (cgroup2 is usually mounted at /sys/fs/cgroup)")


def _is_cgroup2(path: str) -> bool:
    real = os.path.realpath(path)
    best = ("", "")
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best[0]):
                best = (point, fields[2])
    return best[1] == "cgroup2"
