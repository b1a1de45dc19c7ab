"""The dispatcher: SK_LOOKUP steering of (protocol, address prefix, port range) to labelled sockets.

A :class:`Binding` says "new TCP connections (or UDP datagrams) to this prefix and port range go to the
socket registered under this label".  :class:`Dispatcher` keeps the bindings in pinned BPF maps that the
``dispatch`` SK_LOOKUP program (``sockpolicy/progs/dispatch.bpf.c``) consults for every new connection in
one network namespace.  See ``docs/dispatcher.md`` for the design; in short:

- precedence: the longest matching prefix wins; among bindings with that prefix, the narrowest port
  range wins (ties: the lower start port).  No match: normal socket lookup.  A match whose label has no
  socket: the connection is refused (and the label's ``misses`` counter counts it);
- port ranges are never enumerated: ports are grouped into *classes* (sets of ports covered by exactly
  the same ranges); the program maps port -> class with an array and (proto, class, address) -> label
  with one LPM trie.  Bindings over all ports (1-65535) stay out of the classes: they sit under the
  reserved class 0 and the program looks them up separately;
- every change builds the complete new tables in the inactive *generation* and then flips one word, so
  the program never sees a half-written table.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import ipaddress
import os
import re
import socket
import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from sockpolicy import _errors, _libbpf
from sockpolicy._objects import Link, Map, ObjectSpec
from sockpolicy._ranges import IPNetwork, PortRange, parse_prefix
from sockpolicy._state import (
    DEFAULT_ROOT,
    DirLock,
    create_atomically,
    detach_pinned_link,
    ensure_root,
    link_netns_inode,
    netns_inode,
    remove_dir,
    sweep_stale_tmp,
)

__all__ = ["Binding", "Dispatcher", "InvalidLabel", "TableTooLarge", "compute_tables", "reference_decision"]

LAYOUT_VERSION = 2  # struct config.version in dispatch.bpf.c; bump when the map layout changes
NUM_PORTS = 65536
ALL_PORTS = (1, 65535)
KEY_HEADER_BITS = 40  # gen + proto + class + family, in front of the address in a trie key
MAX_LABELS = 16384  # label ids 1..MAX_LABELS-1; id 0 is the "matched no binding" counter slot
DEFAULT_TRIE_ENTRIES = 1 << 20
MAP_NAMES = (
    "config", "port_class", "trie", "sockets", "counters", "labels", "label_names", "bindings", "sock_meta"
)  # fmt: skip

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}
_LABEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,31}")

# Byte layouts of dispatch.bpf.c's structs (all host byte order except the trie key's class).
_CONFIG = struct.Struct("<IIQII")  # active_gen, dirty, serial, version, pad
_BINDING_KEY = struct.Struct("<BBBxHH16s")  # proto, family, prefixlen, lo, hi, addr
_TRIE_TAIL = struct.Struct(">BHB16s")  # proto, class (network order), family, addr: after prefixlen+gen
_U32 = struct.Struct("<I")
_TRIE_VALUE = struct.Struct("<II")  # label id, prefix length of the binding
_TABLE_TAIL = struct.Struct("<II")  # has_all_ports, pad: after the 65536 class ids
_U64 = struct.Struct("<Q")
_SOCK_META = struct.Struct("<QII")  # cookie, v6only, pad
_COUNTERS = struct.Struct("<QQQ")  # lookups, misses, errors
_ZERO = _U32.pack(0)


class InvalidLabel(ValueError):
    """A label name is not 1-31 characters of ``[A-Za-z0-9_.-]``."""


class BindingConflict(ValueError):
    """The same (proto, prefix, ports) is already bound to a different label."""


class TableTooLarge(_errors.SockpolicyError, ValueError):
    """The bindings need more trie entries than the dispatcher's trie holds."""


def check_label(label: str) -> str:
    """Return ``label`` if it is a valid label name; raise :class:`InvalidLabel` otherwise."""
    if not isinstance(label, str) or not _LABEL_RE.fullmatch(label):
        raise InvalidLabel(f"invalid label {label!r}: use 1-31 characters from A-Z a-z 0-9 _ . -")
    return label


# ---------------------------------------------------------------------------------------------------------
# bindings


@functools.total_ordering
@dataclass(frozen=True)
class Binding:
    """One binding: ``proto`` traffic to ``prefix`` on ``ports`` goes to the socket labelled ``label``.

    The constructor normalises its arguments: ``prefix`` may be a string (``"127.0.0.0/8"``, a bare
    address means /32 or /128) and ``ports`` a :class:`~sockpolicy._ranges.PortRange`, an ``(lo, hi)``
    tuple, a single ``int`` or a string (``"8000-8999"``).

    Bindings sort by protocol, address family, prefix, ports, label (IPv4 before IPv6).

    :raises ValueError: with a one-line message for a bad protocol, prefix, range or label.
    """

    proto: str
    prefix: IPNetwork
    ports: PortRange
    label: str

    def __post_init__(self) -> None:
        proto = self.proto.lower() if isinstance(self.proto, str) else self.proto
        if proto not in PROTOCOLS:
            raise ValueError(f"invalid protocol {self.proto!r}: expected tcp or udp")
        object.__setattr__(self, "proto", proto)
        prefix = self.prefix
        if isinstance(prefix, str):
            prefix = parse_prefix(prefix)
        elif isinstance(prefix, ipaddress.IPv4Address | ipaddress.IPv6Address):
            prefix = ipaddress.ip_network(prefix)
        elif not isinstance(prefix, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise ValueError(f"invalid prefix {prefix!r}: expected an IPv4 or IPv6 network")
        object.__setattr__(self, "prefix", prefix)
        ports = self.ports
        if isinstance(ports, str):
            ports = PortRange.parse(ports)
        elif isinstance(ports, int):
            ports = PortRange(ports, ports)
        elif isinstance(ports, tuple | list) and len(ports) == 1 and isinstance(ports[0], PortRange):
            ports = ports[0]  # a one-range PortRanges (what parse_ports returns for "80")
        elif isinstance(ports, tuple | list) and any(isinstance(p, PortRange) for p in ports):
            raise ValueError(
                f"a Binding has one port range, not {len(ports)}: make one Binding per range "
                "(Binding.for_ranges does that)"
            )
        elif isinstance(ports, tuple) and len(ports) == 2:
            ports = PortRange(*ports)
        elif not isinstance(ports, PortRange):
            raise ValueError(f"invalid port range {ports!r}: expected PortRange, (lo, hi), int or 'lo-hi'")
        object.__setattr__(self, "ports", ports)
        check_label(self.label)

    @classmethod
    def for_ranges(cls, proto: str, prefix: Any, ranges: Iterable[Any], label: str) -> list[Binding]:
        """One binding per port range, e.g. for ``parse_ports("80,443")``."""
        return [cls(proto, prefix, r, label) for r in ranges]

    def _sort_key(self) -> tuple:
        p = self.prefix
        return (self.proto, p.version, int(p.network_address), p.prefixlen, self.ports, self.label)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Binding):
            return NotImplemented
        return self._sort_key() < other._sort_key()

    def __str__(self) -> str:
        return f"{self.proto} {self.prefix} {self.ports} -> {self.label}"

    @property
    def key(self) -> tuple[int, int, int, bytes, int, int]:
        """(proto number, family 4/6, prefixlen, 16-byte address, lo, hi): identifies the binding."""
        p = self.prefix
        return (
            PROTOCOLS[self.proto], p.version, p.prefixlen,
            p.network_address.packed.ljust(16, b"\0"), self.ports.lo, self.ports.hi,
        )  # fmt: skip


BindingKey = tuple[int, int, int, bytes, int, int]


def _addr_bytes(addr: Any) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(addr)
    return ip.version, ip.packed.ljust(16, b"\0")


def reference_decision(bindings: Iterable[Binding], proto: str, addr: Any, port: int) -> str | None:
    """The label the precedence rules pick, computed directly from ``bindings`` (slow; for tests/explain).

    Longest prefix first, then narrowest range, then lowest start port.
    """
    ip = ipaddress.ip_address(addr)
    best: tuple | None = None
    label = None
    for b in bindings:
        if b.proto != proto or b.prefix.version != ip.version or ip not in b.prefix or port not in b.ports:
            continue
        rank = (-b.prefix.prefixlen, b.ports.hi - b.ports.lo, b.ports.lo)
        if best is None or rank < best:
            best, label = rank, b.label
    return label


# ---------------------------------------------------------------------------------------------------------
# table computation (pure Python; the kernel only stores the result)


@dataclass
class Tables:
    """The program's tables for one generation, without the generation byte.

    :ivar port_class: 65536 class ids (0 = no binding with a partial range covers the port).
    :ivar entries: (trie prefixlen, trie key tail) -> label id, one per (proto, family, prefix, class);
        class 0 holds the bindings over all ports.
    :ivar has_all_ports: some binding covers 1-65535.
    """

    port_class: array
    entries: dict[tuple[int, bytes], int]
    has_all_ports: bool = False

    def port_class_value(self) -> bytes:
        """The ``struct port_table`` value of one generation."""
        return self.port_class.tobytes() + _TABLE_TAIL.pack(int(self.has_all_ports), 0)


def _range_hash(lo: int, hi: int) -> int:
    # 128-bit hashes XORed together identify the *set* of ranges covering an interval (collisions are
    # astronomically unlikely); deterministic, so every process computes the same classes.
    return int.from_bytes(hashlib.blake2b(struct.pack("<HH", lo, hi), digest_size=16).digest(), "little")


def compute_tables(bindings: dict[BindingKey, int], max_entries: int | None = None) -> Tables:
    """Compute port classes and trie entries for ``bindings`` (binding key -> label id).

    :raises TableTooLarge: more than ``max_entries`` trie entries would be needed.
    """
    ranges = {(k[4], k[5]) for k in bindings} - {ALL_PORTS}
    # Elementary intervals: cut 0..65535 at every range start and every range end + 1.
    delta: dict[int, int] = {0: 0, NUM_PORTS: 0}
    for lo, hi in ranges:
        h = _range_hash(lo, hi)
        delta[lo] = delta.get(lo, 0) ^ h
        delta[hi + 1] = delta.get(hi + 1, 0) ^ h
    points = sorted(delta)
    index_of = {p: i for i, p in enumerate(points)}
    # Intervals covered by the same set of ranges share a class, so e.g. 1-65535 with a hole punched by
    # 8080 is 2 classes, not 3.
    interval_class: list[int] = []
    class_of_sig: dict[int, int] = {0: 0}
    port_class = array("H", bytes(2 * NUM_PORTS))
    sig = 0
    for i, start in enumerate(points[:-1]):
        sig ^= delta[start]
        cls = class_of_sig.get(sig)
        if cls is None:
            cls = class_of_sig[sig] = len(class_of_sig)
        interval_class.append(cls)
        if cls:
            end = points[i + 1]
            port_class[start:end] = array("H", [cls]) * (end - start)
    if len(class_of_sig) > NUM_PORTS:  # cannot happen: each class holds at least one port
        raise AssertionError("more port classes than ports")

    entries: dict[tuple[int, bytes], int] = {}
    pack_tail = _TRIE_TAIL.pack
    groups: dict[tuple[int, int, int, bytes], list[tuple[int, int, int]]] = {}
    has_all_ports = False
    for (proto, family, plen, addr, lo, hi), label_id in bindings.items():
        if (lo, hi) == ALL_PORTS:
            # One entry under class 0, however many classes the other ranges make.
            entries[(KEY_HEADER_BITS + plen, pack_tail(proto, 0, family, addr))] = label_id
            has_all_ports = True
        else:
            groups.setdefault((proto, family, plen, addr), []).append((lo, hi, label_id))
    for (proto, family, plen, addr), members in groups.items():
        trie_plen = KEY_HEADER_BITS + plen
        if len(members) == 1:
            lo, hi, label_id = members[0]
            classes = set(interval_class[index_of[lo] : index_of[hi + 1]])
            for cls in classes:
                entries[(trie_plen, pack_tail(proto, cls, family, addr))] = label_id
        else:
            # Paint the group's ranges widest first, so the narrowest range covering an interval wins;
            # equal widths: the lower start is painted last and wins.
            first = min(index_of[lo] for lo, _, _ in members)
            last = max(index_of[hi + 1] for _, hi, _ in members)
            paint: list[int] = [0] * (last - first)
            for lo, hi, label_id in sorted(members, key=lambda m: (m[0] - m[1], -m[0])):
                a, b = index_of[lo] - first, index_of[hi + 1] - first
                paint[a:b] = [label_id] * (b - a)
            for offset, label_id in enumerate(paint):
                if label_id:
                    cls = interval_class[first + offset]
                    entries[(trie_plen, pack_tail(proto, cls, family, addr))] = label_id
        if max_entries is not None and len(entries) > max_entries:
            raise TableTooLarge(
                f"the bindings need more than {max_entries} trie entries (one per prefix and port class "
                "its ranges cover); use fewer distinct port ranges or open the dispatcher with a larger "
                "trie_entries"
            )
    if max_entries is not None and len(entries) > max_entries:
        raise TableTooLarge(
            f"the bindings need {len(entries)} trie entries, more than the {max_entries} it holds"
        )
    return Tables(port_class, entries, has_all_ports)


def _trie_key(gen: int, plen: int, tail: bytes, _plen_cache: dict[tuple[int, int], bytes] = {}) -> bytes:  # noqa: B006
    head = _plen_cache.get((gen, plen))
    if head is None:
        head = _plen_cache[(gen, plen)] = _U32.pack(plen) + bytes([gen])
    return head + tail


# ---------------------------------------------------------------------------------------------------------
# the dispatcher


@dataclass
class _Cache:
    """What this process last wrote (valid while ``config.serial`` still equals ``serial``)."""

    serial: int
    bindings: dict[BindingKey, int]
    active_keys: list[bytes]


@dataclass
class _Config:
    active_gen: int
    dirty: int
    serial: int
    version: int


class Dispatcher:
    """The SK_LOOKUP dispatcher of one network namespace, backed by pinned state.

    Open it with :meth:`open`; it is a context manager and :meth:`close` is idempotent.  Closing (or the
    process exiting) leaves the steering in place: the next :meth:`open` finds the pinned state.  Only
    :meth:`unload` detaches the program and removes the state.
    """

    def __init__(self, path: Path, maps: dict[str, Map], lock: DirLock, netns: str) -> None:
        self.path = path
        self.netns = netns
        self._maps = maps
        self._lock = lock
        self._cache: _Cache | None = None
        self._port_table_cache: tuple[int, int, array, bool] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<Dispatcher {self.path} {'closed' if self._closed else 'open'}>"

    # -- opening ------------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        *,
        netns: str | os.PathLike[str] = "/proc/self/ns/net",
        bpffs_root: str | os.PathLike[str] = DEFAULT_ROOT,
        create: bool = True,
        trie_entries: int = DEFAULT_TRIE_ENTRIES,
    ) -> Dispatcher:
        """Open the dispatcher of ``netns``, loading and attaching it first if nothing is pinned.

        :param netns: the namespace's path (``/proc/self/ns/net``, ``/run/netns/NAME``, ``/proc/PID/ns/net``).
        :param bpffs_root: where per-namespace state directories live (``<root>/<netns inode>``).
        :param create: with False, nothing is loaded: :class:`~sockpolicy.NotLoaded` if nothing is pinned.
        :param trie_entries: size of the trie, only used when the state is created.  Both generations
            share it during an update, so the bindings' entries may use at most half of it.
        :raises NotLoaded: ``create`` is False and the namespace has no dispatcher.
        :raises BpffsNotMounted: ``bpffs_root`` is not on bpffs.
        """
        netns_path = os.fspath(netns)
        inode = netns_inode(netns_path)
        root = Path(os.fspath(bpffs_root))
        final = root / str(inode)
        for _attempt in range(5):
            if not final.is_dir():
                if not create:
                    raise _errors.NotLoaded(
                        f"no sockpolicy dispatcher is loaded for network namespace {netns_path} "
                        f"(nothing pinned at {final})"
                    )
                ensure_root(root)
                sweep_stale_tmp(root, inode)
                create_atomically(root, inode, functools.partial(_populate, netns_path, trie_entries))
            try:
                return cls._open_existing(final, netns_path, inode)
            except _StaleState:
                # The pinned link belongs to a namespace that no longer exists (its inode number was
                # reused by this one): the old state steers nothing, replace it.
                _remove_stale(final, inode)
            except _errors.KeyNotFound:
                # Removed (unloaded) between our check and our open: try again.
                continue
        raise _errors.NotLoaded(f"sockpolicy state at {final} keeps disappearing while being opened")

    @classmethod
    def _open_existing(cls, path: Path, netns: str, inode: int) -> Dispatcher:
        with Link.from_pin(path / "link") as link:
            attached_to = link_netns_inode(link)
        if attached_to is not None and attached_to != inode:
            raise _StaleState(path)
        maps: dict[str, Map] = {}
        lock: DirLock | None = None
        try:
            for name in MAP_NAMES:
                maps[name] = Map.from_pin(path / name)
            lock = DirLock(path)
            raw = maps["config"].lookup(_ZERO)
            version = _CONFIG.unpack(raw)[3]
            if version != LAYOUT_VERSION:
                raise _errors.SockpolicyError(
                    f"sockpolicy state at {path} has layout version {version}, this sockpolicy needs "
                    f"{LAYOUT_VERSION}: unload it first (sockpolicy unload)"
                )
        except BaseException:
            for m in maps.values():
                m.close()
            if lock is not None:
                lock.close()
            raise
        return cls(path, maps, lock, netns)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release this object's fds; the pinned state and the steering stay.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        for m in self._maps.values():
            m.close()
        self._lock.close()
        self._cache = None
        self._port_table_cache = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def unload(self) -> None:
        """Detach the program from the namespace and remove the pinned state; then close.

        Sockets keep working as plain sockets; traffic takes the normal socket lookup again.
        """
        self._check_open()
        try:
            with self._lock.hold():
                detach_pinned_link(self.path / "link")
                remove_dir(self.path)
        finally:
            self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise _errors.ClosedError(f"{self!r} is closed")

    # -- low-level state ----------------------------------------------------------------------------------

    def _map(self, name: str) -> Map:
        self._check_open()
        return self._maps[name]

    def _read_config(self) -> _Config:
        active, dirty, serial, version, _ = _CONFIG.unpack(self._map("config").lookup(_ZERO))
        return _Config(active & 1, dirty, serial, version)

    def _write_config(self, cfg: _Config) -> None:
        self._map("config").update(_ZERO, _CONFIG.pack(cfg.active_gen, cfg.dirty, cfg.serial, cfg.version, 0))

    def _read_bindings(self) -> dict[BindingKey, int]:
        out = {}
        for raw_key, raw_value in self._map("bindings").items():
            proto, family, plen, lo, hi, addr = _BINDING_KEY.unpack(raw_key)
            out[(proto, family, plen, addr, lo, hi)] = _U32.unpack(raw_value)[0]
        return out

    def _label_names(self) -> dict[int, str]:
        return {_U32.unpack(k)[0]: v.rstrip(b"\0").decode() for k, v in self._map("label_names").items()}

    def _label_id(self, label: str) -> int | None:
        raw = self._map("labels").get(label.encode().ljust(32, b"\0"))
        return None if raw is None else _U32.unpack(raw)[0]

    def _allocate_labels(self, labels: Iterable[str]) -> dict[str, int]:
        """Ids for ``labels``, allocating new ones (caller holds the lock)."""
        ids = {}
        used: set[int] | None = None
        for label in sorted(set(labels)):
            existing = self._label_id(label)
            if existing is not None:
                ids[label] = existing
                continue
            if used is None:
                used = set(self._label_names())
            free = next((i for i in range(1, MAX_LABELS) if i not in used), None)
            if free is None:
                raise _errors.SockpolicyError(f"too many labels: the dispatcher holds {MAX_LABELS - 1}")
            used.add(free)
            name = label.encode().ljust(32, b"\0")
            # A reused id starts with zero counters; name first, so that an id found in `labels` always
            # resolves.
            counters = self._map("counters")
            counters.update(_U32.pack(free), bytes(counters.lookup_size))
            self._map("label_names").update(_U32.pack(free), name)
            self._map("labels").update(name, _U32.pack(free))
            ids[label] = free
        return ids

    def _release_unused_labels(self, bindings: dict[BindingKey, int]) -> None:
        """Forget labels that no binding uses and that have no socket (caller holds the lock)."""
        in_use = set(bindings.values())
        sockets = self._map("sockets")
        for label_id, name in self._label_names().items():
            if label_id in in_use:
                continue
            if any(sockets.get(_U32.pack(label_id * 4 + i)) is not None for i in range(4)):
                continue
            for i in range(4):
                with contextlib.suppress(_errors.KeyNotFound):
                    self._map("sock_meta").delete(_U32.pack(label_id * 4 + i))
            with contextlib.suppress(_errors.KeyNotFound):
                self._map("labels").delete(name.encode().ljust(32, b"\0"))
            with contextlib.suppress(_errors.KeyNotFound):
                self._map("label_names").delete(_U32.pack(label_id))

    def _state(self, cfg: _Config) -> _Cache:
        """The current bindings and active-generation trie keys (caller holds the lock).

        Uses this process's cache when nobody else wrote since; otherwise reads the maps.  After a writer
        died mid-update (``dirty``), the inactive generation may hold leftovers: they are deleted.
        """
        if self._cache is not None and not cfg.dirty and self._cache.serial == cfg.serial:
            return self._cache
        trie = self._map("trie")
        active: list[bytes] = []
        leftovers: list[bytes] = []
        for key in trie.keys():  # noqa: SIM118  (Map is not iterable) collect first: deleting while iterating restarts the walk
            (active if key[4] == cfg.active_gen else leftovers).append(key)
        ctx = {"map": "trie"}
        for key in leftovers:
            with contextlib.suppress(_errors.KeyNotFound):
                _libbpf.map_delete(trie.fd, key, ctx)
        return _Cache(cfg.serial, self._read_bindings(), active)

    def _commit(self, old: _Cache, new_bindings: dict[BindingKey, int], tables: Tables, cfg: _Config) -> None:
        """Write ``tables`` into the inactive generation, flip, then delete the old generation."""
        trie = self._map("trie")
        limit = trie.max_entries
        if len(old.active_keys) + len(tables.entries) > limit:
            raise TableTooLarge(
                f"the bindings need {len(tables.entries)} trie entries, and the {len(old.active_keys)} of "
                f"the current generation must stay until the switch: the trie holds {limit} "
                "(open the dispatcher with a larger trie_entries)"
            )
        new_gen = 1 - cfg.active_gen
        # Mark the update in progress: if we die before the end, the next writer repairs the tables.
        cfg.dirty = 1
        self._write_config(cfg)

        bmap = self._map("bindings")
        ctx = {"map": "bindings"}
        for key in old.bindings.keys() - new_bindings.keys():
            proto, family, plen, addr, lo, hi = key
            with contextlib.suppress(_errors.KeyNotFound):
                _libbpf.map_delete(bmap.fd, _BINDING_KEY.pack(proto, family, plen, lo, hi, addr), ctx)
        for key, label_id in new_bindings.items():
            if old.bindings.get(key) != label_id:
                proto, family, plen, addr, lo, hi = key
                _libbpf.map_update(
                    bmap.fd, _BINDING_KEY.pack(proto, family, plen, lo, hi, addr), _U32.pack(label_id), 0, ctx
                )

        self._map("port_class").update(_U32.pack(new_gen), tables.port_class_value())
        ctx = {"map": "trie"}
        values: dict[tuple[int, int], bytes] = {}
        new_keys = []
        update = _libbpf.map_update
        fd = trie.fd
        for (plen, tail), label_id in tables.entries.items():
            key = _trie_key(new_gen, plen, tail)
            value = values.get((label_id, plen))
            if value is None:
                value = values[(label_id, plen)] = _TRIE_VALUE.pack(label_id, plen - KEY_HEADER_BITS)
            update(fd, key, value, 0, ctx)
            new_keys.append(key)

        # The switch: the program reads active_gen once per lookup, so each lookup sees one whole table.
        cfg.active_gen = new_gen
        self._write_config(cfg)

        for key in old.active_keys:
            with contextlib.suppress(_errors.KeyNotFound):
                _libbpf.map_delete(fd, key, ctx)
        cfg.dirty = 0
        cfg.serial += 1
        self._write_config(cfg)
        self._cache = _Cache(cfg.serial, new_bindings, new_keys)

    def _change(self, add: Iterable[Binding] = (), remove: Iterable[Binding] = ()) -> None:
        add = list(add)
        remove = list(remove)
        for b in [*add, *remove]:
            if not isinstance(b, Binding):
                raise TypeError(f"expected a Binding, not {type(b).__name__}")
        with self._lock.hold():
            cfg = self._read_config()
            old = self._state(cfg)
            new = dict(old.bindings)
            names = self._label_names()
            for b in remove:
                current = new.get(b.key)
                if current is None or names.get(current) != b.label:
                    raise _errors.KeyNotFound(errno.ENOENT, "remove_binding", {"binding": str(b)})
                del new[b.key]
            pending: dict[BindingKey, Binding] = {}
            for b in add:
                current = new.get(b.key)
                other = pending.get(b.key)
                if (current is not None and names.get(current) != b.label) or (
                    other is not None and other.label != b.label
                ):
                    theirs = names.get(current) if current is not None else other.label  # type: ignore[union-attr]
                    raise BindingConflict(
                        f"binding {b.proto} {b.prefix} {b.ports} is already bound to label {theirs!r}: "
                        "remove it first"
                    )
                if current is None:
                    pending[b.key] = b
            ids = self._allocate_labels(b.label for b in pending.values()) if pending else {}
            for key, b in pending.items():
                new[key] = ids[b.label]
            if new == old.bindings and not cfg.dirty:
                return
            try:
                tables = compute_tables(new, max_entries=self._map("trie").max_entries)
                self._commit(old, new, tables, cfg)
            except TableTooLarge:
                if pending:
                    self._release_unused_labels(old.bindings)  # labels allocated for nothing
                raise
            if remove:
                self._release_unused_labels(new)

    # -- bindings -----------------------------------------------------------------------------------------

    def add_binding(self, binding: Binding) -> None:
        """Add one binding (a no-op if exactly this binding exists).

        :raises BindingConflict: the same proto, prefix and ports are bound to another label.
        :raises TableTooLarge: the tables would not fit.
        """
        self._change(add=[binding])

    def add_bindings(self, bindings: Iterable[Binding]) -> None:
        """Add many bindings with one table rebuild and one generation switch."""
        self._change(add=bindings)

    def remove_binding(self, binding: Binding) -> None:
        """Remove one binding.  :raises KeyNotFound: no such binding (with that label)."""
        self._change(remove=[binding])

    def remove_bindings(self, bindings: Iterable[Binding]) -> None:
        """Remove many bindings in one switch; nothing changes if any of them is absent."""
        self._change(remove=bindings)

    def replace_bindings(self, remove: Iterable[Binding], add: Iterable[Binding]) -> None:
        """Remove some bindings and add others in ONE switch: no lookup sees the state in between."""
        self._change(add=add, remove=remove)

    def bindings(self) -> list[Binding]:
        """The current bindings, sorted."""
        names = self._label_names()
        out = []
        for (proto, family, plen, addr, lo, hi), label_id in self._read_bindings().items():
            ip = ipaddress.ip_address(addr[:4] if family == 4 else addr)
            prefix = ipaddress.ip_network(f"{ip}/{plen}")
            out.append(Binding(_PROTO_NAMES[proto], prefix, PortRange(lo, hi), names.get(label_id, "?")))
        return sorted(out)

    def _port_table(self, cfg: _Config) -> tuple[array, bool]:
        cached = self._port_table_cache
        if cached is not None and not cfg.dirty and cached[:2] == (cfg.serial, cfg.active_gen):
            return cached[2], cached[3]
        raw = self._map("port_class").lookup(_U32.pack(cfg.active_gen))
        table = array("H")
        table.frombytes(raw[: 2 * NUM_PORTS])
        has_all_ports = bool(_TABLE_TAIL.unpack(raw[2 * NUM_PORTS :])[0])
        if not cfg.dirty:
            self._port_table_cache = (cfg.serial, cfg.active_gen, table, has_all_ports)
        return table, has_all_ports

    def lookup(self, proto: str, addr: Any, port: int) -> str | None:
        """The label the program picks for ``proto`` traffic to ``addr``:``port``, or None (normal lookup).

        Reads the kernel's own tables and repeats the program's two lookups, so it shows what the kernel
        will do (whether or not a socket is registered for the label).
        """
        if proto not in PROTOCOLS:
            raise ValueError(f"invalid protocol {proto!r}: expected tcp or udp")
        if not 0 <= port < NUM_PORTS:
            raise ValueError(f"invalid port {port}: expected 0-65535")
        family, packed = _addr_bytes(addr)
        cfg = self._read_config()
        table, has_all_ports = self._port_table(cfg)
        cls = table[port]
        plen = KEY_HEADER_BITS + (32 if family == 4 else 128)
        trie = self._map("trie")
        best: tuple[int, int] | None = None  # (label id, prefixlen), as the program compares them
        if cls:
            raw = trie.get(
                _trie_key(cfg.active_gen, plen, _TRIE_TAIL.pack(PROTOCOLS[proto], cls, family, packed))
            )
            best = None if raw is None else _TRIE_VALUE.unpack(raw)
        if has_all_ports and port != 0:
            raw = trie.get(
                _trie_key(cfg.active_gen, plen, _TRIE_TAIL.pack(PROTOCOLS[proto], 0, family, packed))
            )
            if raw is not None:
                found = _TRIE_VALUE.unpack(raw)
                if best is None or found[1] > best[1]:
                    best = found
        if best is None:
            return None
        return self._label_names().get(best[0])

    # -- sockets ------------------------------------------------------------------------------------------

    def register_socket(self, label: str, sock: socket.socket) -> None:
        """Make ``sock`` the socket of ``label`` for its protocol and address family.

        ``sock`` must be a listening TCP socket or a bound, unconnected UDP socket, IPv4 or IPv6.  An IPv6
        socket without ``IPV6_V6ONLY`` also receives the label's IPv4 traffic when no IPv4 socket is
        registered.  For an ``SO_REUSEPORT`` group, register any one member: the kernel then picks among
        the group.  Registering again replaces the previous socket; closing the socket unregisters it.

        :raises BadSocket: the socket is of the wrong kind or state.
        """
        check_label(label)
        is_udp, is_v6, v6only = _check_socket(sock)
        with self._lock.hold():
            label_id = self._allocate_labels([label])[label]
            slot = _U32.pack(label_id * 4 + is_udp * 2 + is_v6)
            sockets = self._map("sockets")
            try:
                sockets.update(slot, _U64.pack(sock.fileno()))
            except _errors.BpfError as exc:
                raise _errors.BadSocket(
                    f"cannot register {_describe_socket(sock)} for label {label!r}: the kernel refused it "
                    f"({errno.errorcode.get(exc.errno, exc.errno)})"
                ) from exc
            cookie = _U64.unpack(sockets.lookup(slot))[0]
            self._map("sock_meta").update(slot, _SOCK_META.pack(cookie, int(v6only), 0))

    def unregister_socket(self, label: str, proto: str, family: int | str) -> None:
        """Remove the socket registered for ``label``, ``proto`` (tcp/udp) and ``family``.

        :param family: ``socket.AF_INET``/``AF_INET6``, ``4``/``6`` or ``"ipv4"``/``"ipv6"``.
        :raises KeyNotFound: no socket is registered there.
        """
        check_label(label)
        if proto not in PROTOCOLS:
            raise ValueError(f"invalid protocol {proto!r}: expected tcp or udp")
        is_v6 = _family_is_v6(family)
        with self._lock.hold():
            label_id = self._label_id(label)
            if label_id is None:
                raise _errors.KeyNotFound(errno.ENOENT, "unregister_socket", {"label": label})
            slot = _U32.pack(label_id * 4 + (proto == "udp") * 2 + is_v6)
            try:
                self._map("sockets").delete(slot)
            except _errors.BpfError as exc:
                # A socket that closed meanwhile is already gone (ENOENT, or EINVAL on some kernels).
                raise _errors.KeyNotFound(
                    errno.ENOENT, "unregister_socket", {"label": label, "proto": proto, "family": family}
                ) from exc
            with contextlib.suppress(_errors.KeyNotFound):
                self._map("sock_meta").delete(slot)

    def sockets(self) -> dict[str, list[dict[str, Any]]]:
        """Registered sockets: label -> ``[{"proto", "family" ("ipv4"/"ipv6"), "cookie", "v6only"}]``."""
        sockets = self._map("sockets")
        meta = self._map("sock_meta")
        out: dict[str, list[dict[str, Any]]] = {}
        for label_id, name in sorted(self._label_names().items(), key=lambda item: item[1]):
            for i in range(4):
                slot = _U32.pack(label_id * 4 + i)
                raw = sockets.get(slot)
                if raw is None:
                    continue
                cookie = _U64.unpack(raw)[0]
                raw_meta = meta.get(slot)
                v6only = None
                if raw_meta is not None:
                    meta_cookie, flag, _ = _SOCK_META.unpack(raw_meta)
                    v6only = bool(flag) if meta_cookie == cookie else None
                out.setdefault(name, []).append(
                    {
                        "proto": "udp" if i & 2 else "tcp",
                        "family": "ipv6" if i & 1 else "ipv4",
                        "cookie": cookie,
                        "v6only": v6only if i & 1 else None,
                    }
                )
        return out

    # -- counters -----------------------------------------------------------------------------------------

    def _counter(self, label_id: int) -> tuple[int, int, int]:
        raw = self._map("counters").lookup(_U32.pack(label_id))
        lookups = misses = errors_ = 0
        for a, b, c in _COUNTERS.iter_unpack(raw):
            lookups += a
            misses += b
            errors_ += c
        return lookups, misses, errors_

    def counters(self) -> dict[str, dict[str, int]]:
        """Per label: ``lookups`` (a binding of the label matched), ``misses`` (no usable socket: refused),
        ``errors`` (the kernel refused the assignment: refused)."""
        out = {}
        for label_id, name in sorted(self._label_names().items(), key=lambda item: item[1]):
            lookups, misses, errors_ = self._counter(label_id)
            out[name] = {"lookups": lookups, "misses": misses, "errors": errors_}
        return out

    def unmatched(self) -> int:
        """How many lookups matched no binding and took the normal socket lookup."""
        return self._counter(0)[0]


class _StaleState(Exception):
    pass


def _remove_stale(path: Path, inode: int) -> None:
    with contextlib.suppress(FileNotFoundError, _errors.NotLoaded):
        lock = DirLock(path)
        try:
            with lock.hold():
                with Link.from_pin(path / "link") as link:
                    if link_netns_inode(link) in (None, inode):
                        return  # someone replaced it already
                detach_pinned_link(path / "link")
                remove_dir(path)
        finally:
            lock.close()


def _populate(netns: str, trie_entries: int, tmp: Path) -> Any:
    """Load the program, pin its maps and program into ``tmp``, attach it to ``netns`` and pin the link.

    Returns the undo callable that detaches the link (used when another process won the creation race).
    """
    spec = ObjectSpec.from_package("dispatch")
    spec.max_entries["trie"] = trie_entries
    with spec.load() as obj:
        for name in MAP_NAMES:
            obj.maps[name].pin(tmp / name)
        obj.maps["config"].update(_ZERO, _CONFIG.pack(0, 0, 0, LAYOUT_VERSION, 0))
        prog = obj.programs["dispatch"]
        prog.pin(tmp / "prog")
        link = prog.attach_netns(netns)
    with link:
        link.pin(tmp / "link")
        # Closing our fd keeps the link: it is pinned.  The undo detaches it explicitly.

    def undo() -> None:
        detach_pinned_link(tmp / "link")

    return undo


def _family_is_v6(family: int | str) -> int:
    if family in (socket.AF_INET, 4, "ipv4", "inet"):
        return 0
    if family in (socket.AF_INET6, 6, "ipv6", "inet6"):
        return 1
    raise ValueError(f"invalid address family {family!r}: expected ipv4 or ipv6")


def _describe_socket(sock: socket.socket) -> str:
    kind = {socket.SOCK_STREAM: "TCP", socket.SOCK_DGRAM: "UDP"}.get(sock.type, f"type {int(sock.type)}")
    fam = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}.get(sock.family, f"family {int(sock.family)}")
    return f"{fam} {kind} socket fd {sock.fileno()}"


def _check_socket(sock: socket.socket) -> tuple[int, int, bool]:
    """Validate a socket for registration; return (is_udp, is_v6, v6only)."""
    if not isinstance(sock, socket.socket):
        raise _errors.BadSocket(f"expected a socket.socket, not {type(sock).__name__}")
    if sock.fileno() < 0:
        raise _errors.BadSocket("the socket is closed")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise _errors.BadSocket(f"{_describe_socket(sock)}: only IPv4 and IPv6 sockets can be steered")
    what = _describe_socket(sock)
    if sock.type == socket.SOCK_STREAM:
        if sock.proto not in (0, socket.IPPROTO_TCP):
            raise _errors.BadSocket(f"{what}: protocol {sock.proto} is not TCP")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise _errors.BadSocket(f"{what}: a TCP socket must be listening (call listen() first)")
        is_udp = 0
    elif sock.type == socket.SOCK_DGRAM:
        if sock.proto not in (0, socket.IPPROTO_UDP):
            raise _errors.BadSocket(f"{what}: protocol {sock.proto} is not UDP")
        if sock.getsockname()[1] == 0:
            raise _errors.BadSocket(f"{what}: a UDP socket must be bound (call bind() first)")
        try:
            sock.getpeername()
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
        else:
            raise _errors.BadSocket(f"{what}: a UDP socket must not be connected")
        is_udp = 1
    else:
        raise _errors.BadSocket(f"{what}: only TCP (SOCK_STREAM) and UDP (SOCK_DGRAM) sockets can be steered")
    is_v6 = int(sock.family == socket.AF_INET6)
    v6only = bool(is_v6 and sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return is_udp, is_v6, v6only
