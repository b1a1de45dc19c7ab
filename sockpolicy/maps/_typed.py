"""Typed, dict-like views over a :class:`~sockpolicy.Map`.

Each class wraps one :class:`~sockpolicy.Map` and takes ownership of it (closing the typed map closes the
:class:`~sockpolicy.Map`).  The constructor checks the map's type and key/value sizes against the codecs and
raises :class:`~sockpolicy.InvalidArgument` naming expected and actual; on that failure the caller still
owns the map.  ``create`` and ``from_pin`` close what they opened when the check fails.

Conditional writes use :meth:`put` with :class:`~sockpolicy.UpdateFlags`; the name is not ``update`` so
that nobody mistakes it for ``dict.update(mapping)``.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import ipaddress
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, Self, TypeVar

from sockpolicy._errors import BadSocket, InvalidArgument, KeyExists, KeyNotFound
from sockpolicy._libbpf import F_NO_PREALLOC
from sockpolicy._objects import Map, MapType, PathLike, UpdateFlags
from sockpolicy.maps._codecs import U32, U64, Codec

K = TypeVar("K")
V = TypeVar("V")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _type_name(map_type: object) -> str:
    return getattr(map_type, "name", str(map_type))


def _adopt(map_: Map, build: Callable[[Map], Any]) -> Any:
    """Wrap a map this module opened; close it if the wrapper refuses it (nobody else holds it)."""
    try:
        return build(map_)
    except BaseException:
        map_.close()
        raise


class _TypedMap(Generic[K, V]):
    """The dict-like API shared by every typed map.  Subclasses set :attr:`map_type` and the codecs."""

    #: the kernel map type this class wraps
    map_type: ClassVar[MapType]

    def __init__(self, map_: Map, key: Codec[K], value: Codec[V] | None) -> None:
        self._map = map_
        self._key_codec = key
        self._value_codec = value
        self._validate()

    # -- validation ----------------------------------------------------------------------------------------

    def _expected_key_size(self) -> int:
        return self._key_codec.size

    def _expected_value_sizes(self) -> tuple[int, ...]:
        assert self._value_codec is not None
        return (self._value_codec.size,)

    def _describe_key(self) -> str:
        return f"key codec {self._key_codec.name}"

    def _describe_value(self) -> str:
        return f"value codec {getattr(self._value_codec, 'name', '?')}"

    def _refuse(self, detail: str) -> InvalidArgument:
        return InvalidArgument(_errno.EINVAL, "typed_map", {"map": self._map.name}, detail)

    def _validate(self) -> None:
        m, cls = self._map, type(self).__name__
        if m.type != self.map_type:
            raise self._refuse(
                f"{cls} needs a {self.map_type.name} map, but map {m.name!r} is a {_type_name(m.type)}"
            )
        if self._expected_key_size() != m.key_size:
            raise self._refuse(
                f"{cls}: {self._describe_key()} is {self._expected_key_size()} bytes, "
                f"but map {m.name!r} has key_size {m.key_size}"
            )
        sizes = self._expected_value_sizes()
        if m.value_size not in sizes:
            expected = " or ".join(str(s) for s in sizes)
            raise self._refuse(
                f"{cls}: {self._describe_value()} is {expected} bytes, "
                f"but map {m.name!r} has value_size {m.value_size}"
            )

    # -- encoding ------------------------------------------------------------------------------------------

    def _fail(self, what: str, exc: ValueError) -> ValueError:
        message = str(exc)
        if what == "key" and message.startswith("value "):
            message = "key " + message[len("value ") :]
        return ValueError(f"map {self.name!r}: {message}")

    def _encode_key(self, key: K) -> bytes:
        try:
            return self._key_codec.encode(key)
        except ValueError as exc:
            raise self._fail("key", exc) from None

    def _decode_key(self, data: bytes) -> K:
        return self._key_codec.decode(data)

    def _encode_value(self, value: V) -> bytes:
        assert self._value_codec is not None
        try:
            return self._value_codec.encode(value)
        except ValueError as exc:
            raise self._fail("value", exc) from None

    def _decode_value(self, data: bytes) -> V:
        assert self._value_codec is not None
        return self._value_codec.decode(data)

    # -- ownership -----------------------------------------------------------------------------------------

    @property
    def map(self) -> Map:
        """The underlying untyped :class:`~sockpolicy.Map` (still owned by this object)."""
        return self._map

    @property
    def name(self) -> str:
        return self._map.name

    @property
    def fd(self) -> int:
        """The map's fd.  :raises ClosedError: after :meth:`close`."""
        return self._map.fd

    @property
    def closed(self) -> bool:
        return self._map.closed

    @property
    def max_entries(self) -> int:
        return self._map.max_entries

    def close(self) -> None:
        """Close the map's fd.  Idempotent."""
        self._map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pin(self, path: PathLike) -> None:
        """Pin the map in bpffs.  :raises BpffsNotMounted: ``path`` is not on a bpffs mount."""
        self._map.pin(path)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._map._fd}"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    # -- dict-like access ----------------------------------------------------------------------------------

    def __getitem__(self, key: K) -> V:
        """The value under ``key``.  :raises KeyNotFound: (also a :class:`KeyError`) absent."""
        raw = self._encode_key(key)
        try:
            data = self._map.lookup(raw)
        except KeyNotFound as exc:
            exc.context["key"] = key  # the decoded key reads better than its hex
            raise
        return self._decode_value(data)

    def get(self, key: K, default: Any = None) -> V | Any:
        data = self._map.get(self._encode_key(key))
        return default if data is None else self._decode_value(data)

    def __contains__(self, key: object) -> bool:
        return self._map.get(self._encode_key(key)) is not None  # type: ignore[arg-type]

    def __setitem__(self, key: K, value: V) -> None:
        self.put(key, value)

    def put(self, key: K, value: V, flags: UpdateFlags = UpdateFlags.ANY) -> None:
        """Store ``value`` under ``key``: ``ANY`` creates or replaces, ``NOEXIST`` only creates (else
        :class:`~sockpolicy.KeyExists`), ``EXIST`` only replaces (else :class:`~sockpolicy.KeyNotFound`).

        :raises MapFull: no room for a new key.
        """
        raw_key = self._encode_key(key)
        try:
            self._map.update(raw_key, self._encode_value(value), flags)
        except (KeyNotFound, KeyExists) as exc:
            exc.context["key"] = key
            raise

    def __delitem__(self, key: K) -> None:
        """Remove ``key``.  :raises KeyNotFound: absent."""
        try:
            self._map.delete(self._encode_key(key))
        except KeyNotFound as exc:
            exc.context["key"] = key
            raise

    def keys(self) -> Iterator[K]:
        """The keys, decoded.  Keys added or removed meanwhile may or may not be seen."""
        for raw in self._map.keys():  # noqa: SIM118 - Map is not a mapping; keys() walks the kernel map
            yield self._decode_key(raw)

    def __iter__(self) -> Iterator[K]:
        return self.keys()

    def items(self) -> Iterator[tuple[K, V]]:
        for raw_key, raw_value in self._map.items():
            yield self._decode_key(raw_key), self._decode_value(raw_value)

    def values(self) -> Iterator[V]:
        for _, value in self.items():
            yield value

    def __len__(self) -> int:
        """The number of keys, counted by iterating (the kernel keeps no count)."""
        return sum(1 for _ in self._map.keys())  # noqa: SIM118

    def clear(self) -> None:
        """Delete every key (keys are collected first: deleting while walking restarts the walk)."""
        for raw in list(self._map.keys()):
            with contextlib.suppress(KeyNotFound):
                self._map.delete(raw)


# ---------------------------------------------------------------------------------------------------------
# hashes and arrays


class Hash(_TypedMap[K, V]):
    """A ``BPF_MAP_TYPE_HASH`` with typed keys and values::

    counters = Hash(obj.take_map("counters"), key=U32, value=U64)
    counters[1] = 10
    counters.put(1, 11, UpdateFlags.EXIST)
    """

    map_type = MapType.HASH

    def __init__(self, map_: Map, *, key: Codec[K], value: Codec[V]) -> None:
        super().__init__(map_, key, value)

    @classmethod
    def create(
        cls, *, key: Codec[K], value: Codec[V], max_entries: int, name: str = "", flags: int = 0
    ) -> Self:
        """Create a new map of this type in the kernel, sized from the codecs."""
        created = Map.create(cls.map_type, key.size, value.size, max_entries, name=name, flags=flags)
        return _adopt(created, lambda m: cls(m, key=key, value=value))

    @classmethod
    def from_pin(cls, path: PathLike, *, key: Codec[K], value: Codec[V]) -> Self:
        """Open a pinned map.  :raises InvalidArgument: its type or sizes do not match the codecs."""
        return _adopt(Map.from_pin(path), lambda m: cls(m, key=key, value=value))


class _Indexed(_TypedMap[int, V]):
    """Shared by arrays: keys are ``0 .. max_entries-1``, always present, never deleted."""

    def _index(self, key: int) -> bytes:
        raw = self._encode_key(key)
        if key >= self._map.max_entries:
            raise IndexError(
                f"map {self.name!r}: index {key} out of range "
                f"({self.map_type.name} of {self._map.max_entries} entries: 0..{self._map.max_entries - 1})"
            )
        return raw

    def __getitem__(self, key: int) -> V:
        return self._decode_value(self._map.lookup(self._index(key)))

    def get(self, key: int, default: Any = None) -> V | Any:
        if not isinstance(key, int) or not 0 <= key < self._map.max_entries:
            return default
        return self[key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and not isinstance(key, bool) and 0 <= key < self._map.max_entries

    def put(self, key: int, value: V, flags: UpdateFlags = UpdateFlags.ANY) -> None:
        """Store ``value`` at index ``key``.  Only ``ANY`` and ``EXIST`` make sense: every index exists.

        :raises IndexError: ``key >= max_entries``.
        """
        self._map.update(self._index(key), self._encode_value(value), flags)

    def __delitem__(self, key: int) -> None:
        raise TypeError(f"map {self.name!r}: array entries cannot be deleted; assign a zero value instead")

    def __len__(self) -> int:
        return self._map.max_entries

    def keys(self) -> Iterator[int]:
        return iter(range(self._map.max_entries))

    def clear(self) -> None:
        """Set every entry to all-zero bytes (array entries cannot be removed)."""
        zero = bytes(self._map.value_size if not self._map.is_per_cpu else self._map.lookup_size)
        for index in range(self._map.max_entries):
            self._map.update(U32.encode(index), zero)


class Array(_Indexed[V]):
    """A ``BPF_MAP_TYPE_ARRAY``: keys are ``u32`` indices, ``len()`` is ``max_entries``, no deletion.

    An index ``>= max_entries`` raises :class:`IndexError` (the kernel would say E2BIG on update and
    ENOENT on lookup, neither of which reads as "out of range").
    """

    map_type = MapType.ARRAY

    def __init__(self, map_: Map, *, value: Codec[V]) -> None:
        super().__init__(map_, U32, value)

    @classmethod
    def create(cls, *, value: Codec[V], max_entries: int, name: str = "", flags: int = 0) -> Self:
        created = Map.create(cls.map_type, 4, value.size, max_entries, name=name, flags=flags)
        return _adopt(created, lambda m: cls(m, value=value))

    @classmethod
    def from_pin(cls, path: PathLike, *, value: Codec[V]) -> Self:
        return _adopt(Map.from_pin(path), lambda m: cls(m, value=value))


# ---------------------------------------------------------------------------------------------------------
# per-CPU maps


def _sum(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, int):
        return sum(values)
    if isinstance(first, tuple):
        columns = [sum(column) for column in zip(*values, strict=True)]
        make = getattr(type(first), "_make", None)
        return make(columns) if make is not None else tuple(columns)
    raise TypeError(f"cannot sum per-CPU values of type {type(first).__name__}")


class _PerCpuMixin(_TypedMap[K, Any]):
    """Values are lists with one entry per possible CPU; each CPU's slot is padded to 8 bytes."""

    @property
    def cpus(self) -> int:
        """The number of possible CPUs, i.e. the length of every value list."""
        return self._map.lookup_size // self._slot

    @property
    def _slot(self) -> int:
        return (self._map.value_size + 7) // 8 * 8

    def _encode_value(self, value: Any) -> bytes:
        """A list gives one value per CPU; anything else is written to every CPU."""
        cpus = self.cpus
        if isinstance(value, list):
            if len(value) != cpus:
                raise ValueError(
                    f"map {self.name!r}: {len(value)} per-CPU values given, this machine has {cpus} CPUs"
                )
            per_cpu = value
        else:
            per_cpu = [value] * cpus
        return b"".join(super(_PerCpuMixin, self)._encode_value(v).ljust(self._slot, b"\0") for v in per_cpu)

    def _decode_value(self, data: bytes) -> list[Any]:
        size, slot = self._map.value_size, self._slot
        decode = super()._decode_value
        return [decode(data[i : i + size]) for i in range(0, len(data), slot)]

    def sum(self, key: K) -> Any:
        """The sum over CPUs of the value under ``key``: ints add, tuples/NamedTuples add field-wise.

        :raises KeyNotFound: absent.
        """
        return _sum(self[key])


class PerCpuArray(_PerCpuMixin[int], _Indexed[Any]):
    """A ``BPF_MAP_TYPE_PERCPU_ARRAY``: ``m[i]`` is a list with one value per CPU, ``m.sum(i)`` their sum."""

    map_type = MapType.PERCPU_ARRAY

    def __init__(self, map_: Map, *, value: Codec[Any]) -> None:
        _TypedMap.__init__(self, map_, U32, value)

    @classmethod
    def create(cls, *, value: Codec[Any], max_entries: int, name: str = "", flags: int = 0) -> Self:
        created = Map.create(cls.map_type, 4, value.size, max_entries, name=name, flags=flags)
        return _adopt(created, lambda m: cls(m, value=value))

    @classmethod
    def from_pin(cls, path: PathLike, *, value: Codec[Any]) -> Self:
        return _adopt(Map.from_pin(path), lambda m: cls(m, value=value))


class PerCpuHash(_PerCpuMixin[K]):
    """A ``BPF_MAP_TYPE_PERCPU_HASH``: values are per-CPU lists, ``m.sum(key)`` adds them up."""

    map_type = MapType.PERCPU_HASH

    def __init__(self, map_: Map, *, key: Codec[K], value: Codec[Any]) -> None:
        _TypedMap.__init__(self, map_, key, value)

    @classmethod
    def create(
        cls, *, key: Codec[K], value: Codec[Any], max_entries: int, name: str = "", flags: int = 0
    ) -> Self:
        created = Map.create(cls.map_type, key.size, value.size, max_entries, name=name, flags=flags)
        return _adopt(created, lambda m: cls(m, key=key, value=value))

    @classmethod
    def from_pin(cls, path: PathLike, *, key: Codec[K], value: Codec[Any]) -> Self:
        return _adopt(Map.from_pin(path), lambda m: cls(m, key=key, value=value))


# ---------------------------------------------------------------------------------------------------------
# longest-prefix-match tries


class LpmTrie(_TypedMap[Any, V]):
    """A ``BPF_MAP_TYPE_LPM_TRIE`` keyed by IPv4 or IPv6 networks.

    Key layout (``struct bpf_lpm_trie_key`` plus data): ``u32 prefixlen`` in host order, then the optional
    fixed ``header`` (e.g. a protocol byte), then the address in network order.  ``prefixlen`` counts header
    bits too, so a header always matches exactly.  Without a header keys are networks (``"10.0.0.0/8"``,
    :class:`ipaddress.IPv4Network`, or an address meaning a host route); with one, keys are
    ``(header_value, network)`` tuples.

    ``m[net]``, ``net in m`` and ``m.get(net)`` are exact (like a dict): the kernel's lookup returns the
    longest match *up to* the given prefix, so exactness is checked by walking the keys (O(n); these tries
    are control-plane sized).  :meth:`match` is the kernel's own longest-prefix lookup;
    :meth:`longest_match` also tells which network matched.
    """

    map_type = MapType.LPM_TRIE

    def __init__(
        self, map_: Map, *, family: int = 4, value: Codec[V], header: Codec[Any] | None = None
    ) -> None:
        if family not in (4, 6):
            raise ValueError(f"LpmTrie family must be 4 or 6, not {family!r}")
        self.family = family
        self.header = header
        self._addr_size = 4 if family == 4 else 16
        self._header_size = header.size if header is not None else 0
        super().__init__(map_, U32, value)

    def _expected_key_size(self) -> int:
        return 4 + self._header_size + self._addr_size

    def _describe_key(self) -> str:
        header = f" + header {self.header.name}" if self.header is not None else ""
        return f"IPv{self.family} LPM key (u32 prefixlen{header} + {self._addr_size}-byte address)"

    @classmethod
    def create(
        cls,
        *,
        family: int = 4,
        value: Codec[V],
        max_entries: int,
        name: str = "",
        header: Codec[Any] | None = None,
    ) -> Self:
        """Create a trie (with ``BPF_F_NO_PREALLOC``, which the kernel requires for LPM tries)."""
        key_size = 4 + (header.size if header is not None else 0) + (4 if family == 4 else 16)
        created = Map.create(cls.map_type, key_size, value.size, max_entries, name=name, flags=F_NO_PREALLOC)
        return _adopt(created, lambda m: cls(m, family=family, value=value, header=header))

    @classmethod
    def from_pin(
        cls, path: PathLike, *, family: int = 4, value: Codec[V], header: Codec[Any] | None = None
    ) -> Self:
        return _adopt(Map.from_pin(path), lambda m: cls(m, family=family, value=value, header=header))

    # -- keys ----------------------------------------------------------------------------------------------

    def _network(self, value: Any) -> IPNetwork:
        try:
            network = ipaddress.ip_network(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"map {self.name!r}: {exc}") from None
        if network.version != self.family:
            raise ValueError(
                f"map {self.name!r}: {network} is an IPv{network.version} network; "
                f"this trie holds IPv{self.family}"
            )
        return network

    def _split(self, key: Any) -> tuple[bytes, Any]:
        """(encoded header, network part) of a key."""
        if self.header is None:
            return b"", key
        if not isinstance(key, tuple) or len(key) != 2:
            raise ValueError(f"map {self.name!r}: keys are (header, network) tuples, not {key!r}")
        try:
            return self.header.encode(key[0]), key[1]
        except ValueError as exc:
            raise self._fail("key", exc) from None

    def _pack(self, header: bytes, prefixlen: int, address: bytes) -> bytes:
        return struct.pack("=I", self._header_size * 8 + prefixlen) + header + address

    def _encode_key(self, key: Any) -> bytes:
        header, net = self._split(key)
        network = self._network(net)
        return self._pack(header, network.prefixlen, network.network_address.packed)

    def _decode_key(self, data: bytes) -> Any:
        (prefixlen,) = struct.unpack("=I", data[:4])
        header_end = 4 + self._header_size
        address = ipaddress.ip_address(bytes(data[header_end:]))
        # BPF code may store host bits; strict=False keeps the key readable instead of failing.
        network = ipaddress.ip_network((address, prefixlen - self._header_size * 8), strict=False)
        if self.header is None:
            return network
        return (self.header.decode(bytes(data[4:header_end])), network)

    def _normal(self, key: Any) -> Any:
        header, net = self._split(key)
        network = self._network(net)
        return network if self.header is None else (self.header.decode(header), network)

    # -- exact access ----------------------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        wanted = self._normal(key)
        return any(k == wanted for k in self.keys())

    def __getitem__(self, key: Any) -> V:
        if key not in self:
            raise KeyNotFound(_errno.ENOENT, "map_lookup", {"map": self.name, "key": key})
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> V | Any:
        if key not in self:
            return default
        return super().__getitem__(key)

    # -- longest-prefix match --------------------------------------------------------------------------------

    def _full_key(self, address: Any) -> tuple[bytes, IPAddress]:
        header, addr = self._split(address)
        try:
            ip = ipaddress.ip_address(addr)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"map {self.name!r}: {exc}") from None
        if ip.version != self.family:
            raise ValueError(f"map {self.name!r}: {ip} is IPv{ip.version}; this trie holds IPv{self.family}")
        return self._pack(header, self._addr_size * 8, ip.packed), ip

    def match(self, address: Any) -> V | None:
        """The kernel's longest-prefix lookup for ``address`` (or ``(header, address)``): the value, or None.

        This is what a BPF program's ``bpf_map_lookup_elem`` with a full-length key sees.
        """
        raw, _ = self._full_key(address)
        data = self._map.get(raw)
        return None if data is None else self._decode_value(data)

    def longest_match(self, address: Any) -> tuple[Any, V] | None:
        """``(key, value)`` of the longest prefix containing ``address``, or None.

        The value comes from the kernel's lookup with the full-length key; the key (which the kernel does
        not report) is the longest stored prefix that contains the address, found by walking the keys.
        """
        raw, ip = self._full_key(address)
        data = self._map.get(raw)
        if data is None:
            return None
        header = self._split(address)[0]
        best: Any = None
        for key in self.keys():
            header_value, network = (None, key) if self.header is None else key
            if self.header is not None and self.header.encode(header_value) != header:
                continue
            if ip in network and (best is None or network.prefixlen > best[1].prefixlen):
                best = (header_value, network)
        if best is None:  # removed between the lookup and the walk
            return None
        found = best[1] if self.header is None else best
        return found, self._decode_value(data)


# ---------------------------------------------------------------------------------------------------------
# socket maps

SO_COOKIE = 57  # <asm-generic/socket.h>; Python's socket module does not export it
_TCP_ESTABLISHED = 1
_TCP_LISTEN = 10
_TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}  # fmt: skip

SocketLike = socket.socket | int | Any  # anything with fileno() (e.g. trio sockets), or an fd


def _fd_of(sock: SocketLike) -> int:
    if isinstance(sock, bool):
        raise BadSocket(f"expected a socket or an fd, got {sock!r}")
    if isinstance(sock, int):
        if sock < 0:
            raise BadSocket(f"fd {sock} is not a valid file descriptor")
        return sock
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        raise BadSocket(f"expected a socket or an fd, got {type(sock).__name__}")
    fd = fileno()
    if fd < 0:
        raise BadSocket(f"socket {sock!r} is closed")
    return fd


def _describe_fd(fd: int, mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    try:
        return os.readlink(f"/proc/self/fd/{fd}")  # e.g. anon_inode:bpf-map
    except OSError:
        return "something else"


@contextlib.contextmanager
def _socket_view(sock: SocketLike) -> Iterator[tuple[socket.socket, int]]:
    """A :class:`socket.socket` for ``sock`` without taking ownership of its fd.

    :raises BadSocket: closed fd, or not a socket.
    """
    fd = _fd_of(sock)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise BadSocket(f"fd {fd} is closed") from None
    if not stat.S_ISSOCK(mode):
        raise BadSocket(f"fd {fd} is not a socket ({_describe_fd(fd, mode)})")
    if isinstance(sock, socket.socket):
        yield sock, fd
        return
    # socket.socket(fileno=...) may switch the fd to non-blocking (if a default timeout is set) and closes
    # it when collected: restore the flags and detach, so the caller's fd is left exactly as it was.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    view = socket.socket(fileno=fd)
    try:
        yield view, fd
    finally:
        view.detach()
        if fcntl.fcntl(fd, fcntl.F_GETFL) != flags:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def check_socket(sock: SocketLike) -> int:
    """Check that the kernel will accept ``sock`` into a SOCKMAP/SOCKHASH; return its fd.

    Accepted: TCP sockets that are listening or established, bound UDP sockets (Linux 6.x refuses unbound
    ones), connected unix stream sockets, unix datagram sockets.

    :raises BadSocket: with a one-line reason otherwise (closed fd, not a socket, wrong family or state).
    """
    with _socket_view(sock) as (view, fd):
        # Ask the kernel: a socket.socket built with proto=0 reports 0, not IPPROTO_TCP.
        family = _as_enum(socket.AddressFamily, view.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN))
        kind = _as_enum(socket.SocketKind, view.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
        proto = view.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        if family in (socket.AF_INET, socket.AF_INET6):
            if kind == socket.SOCK_STREAM and proto == socket.IPPROTO_TCP:
                state = view.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                if state not in (_TCP_ESTABLISHED, _TCP_LISTEN):
                    raise BadSocket(
                        f"TCP socket fd {fd} is neither listening nor connected "
                        f"(state {_TCP_STATES.get(state, state)}); the kernel only accepts established "
                        "or listening TCP sockets in a SOCKMAP"
                    )
            elif kind == socket.SOCK_DGRAM and proto == socket.IPPROTO_UDP:
                if view.getsockname()[1] == 0:
                    raise BadSocket(
                        f"UDP socket fd {fd} is not bound; the kernel only accepts bound UDP sockets "
                        "in a SOCKMAP"
                    )
            else:
                raise BadSocket(
                    f"fd {fd} is a {_enum_name(kind)} socket with protocol {proto}; "
                    "a SOCKMAP takes TCP, UDP and unix sockets"
                )
        elif family == socket.AF_UNIX:
            if kind == socket.SOCK_STREAM:
                try:
                    view.getpeername()
                except OSError:
                    raise BadSocket(
                        f"unix stream socket fd {fd} is not connected; the kernel only accepts "
                        "connected unix stream sockets in a SOCKMAP"
                    ) from None
            elif kind != socket.SOCK_DGRAM:
                raise BadSocket(f"unix {_enum_name(kind)} socket fd {fd} cannot go into a SOCKMAP")
        else:
            raise BadSocket(
                f"fd {fd} is an {_enum_name(family)} socket; a SOCKMAP takes AF_INET, AF_INET6 "
                "and AF_UNIX sockets"
            )
        return fd


def _as_enum(enum_type: Any, value: int) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        return value


def _enum_name(value: Any) -> str:
    return getattr(value, "name", str(value))


def cookie_of(sock: SocketLike) -> int:
    """The socket cookie (``SO_COOKIE``): what a SOCKMAP/SOCKHASH lookup returns for this socket.

    :raises BadSocket: ``sock`` is closed or not a socket.
    """
    with _socket_view(sock) as (view, _fd):
        return struct.unpack("=Q", view.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


class _SockMapBase(_TypedMap[K, int]):
    """Values written are sockets (objects or fds); values read are socket cookies."""

    def _expected_value_sizes(self) -> tuple[int, ...]:
        return (4, 8)  # the kernel takes the fd as u32 or u64

    def _describe_value(self) -> str:
        return "a socket fd value"

    def _encode_value(self, value: SocketLike) -> bytes:
        fd = check_socket(value)
        return struct.pack("=Q" if self._map.value_size == 8 else "=I", fd)

    def _decode_value(self, data: bytes) -> int:
        return U64.decode(data)

    def _require_cookies(self) -> None:
        # With 4-byte values the kernel can store sockets but refuses every lookup (ENOSPC): the cookie it
        # returns is 8 bytes.  Say that instead of "no space left on device".
        if self._map.value_size != 8:
            raise InvalidArgument(
                _errno.ENOSPC,
                "map_lookup",
                {"map": self.name},
                f"{type(self).__name__} {self.name!r} has {self._map.value_size}-byte values: the kernel "
                "stores sockets but cannot return their 8-byte cookies; create it with value_size 8",
            )

    def __getitem__(self, key: K) -> int:
        """The socket cookie stored under ``key`` (see :func:`cookie_of`)."""
        self._require_cookies()
        return super().__getitem__(key)

    def get(self, key: K, default: Any = None) -> int | Any:
        self._require_cookies()
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._require_cookies()
        return super().__contains__(key)

    def items(self) -> Iterator[tuple[K, int]]:
        self._require_cookies()
        return super().items()

    def put(self, key: K, value: SocketLike, flags: UpdateFlags = UpdateFlags.ANY) -> None:
        """Insert a socket (object or fd) under ``key``; the kernel keeps its own reference.

        Closing the socket removes it from the map.

        :raises BadSocket: the socket is closed or of a kind/state the kernel refuses (checked first).
        :raises KeyExists: ``NOEXIST`` and the slot is taken.
        """
        super().put(key, value, flags)


class SockMap(_SockMapBase[int]):
    """A ``BPF_MAP_TYPE_SOCKMAP``: ``u32`` index -> socket.

    ``m[i] = sock`` inserts (a socket object or an fd), ``m[i]`` is the socket's cookie.
    """

    map_type = MapType.SOCKMAP

    def __init__(self, map_: Map) -> None:
        super().__init__(map_, U32, None)

    @classmethod
    def create(cls, *, max_entries: int, name: str = "", value_size: int = 8) -> Self:
        created = Map.create(cls.map_type, 4, value_size, max_entries, name=name)
        return _adopt(created, cls)

    @classmethod
    def from_pin(cls, path: PathLike) -> Self:
        return _adopt(Map.from_pin(path), cls)

    def _encode_key(self, key: int) -> bytes:
        raw = super()._encode_key(key)
        if key >= self._map.max_entries:
            raise IndexError(
                f"map {self.name!r}: index {key} out of range "
                f"(SOCKMAP of {self._map.max_entries} entries: 0..{self._map.max_entries - 1})"
            )
        return raw

    def __delitem__(self, key: int) -> None:
        """Remove the socket at ``key``.  :raises KeyNotFound: the slot is empty."""
        raw = self._encode_key(key)
        try:
            self._map.delete(raw)
        except InvalidArgument:
            # The kernel reports an empty SOCKMAP slot as EINVAL (the index is known to be in range).
            raise KeyNotFound(_errno.ENOENT, "map_delete", {"map": self.name, "key": key}) from None

    def keys(self) -> Iterator[int]:
        """Indices that hold a socket (the kernel walks every index, occupied or not)."""
        for key, _ in self.items():
            yield key

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def clear(self) -> None:
        for key in list(self.keys()):
            with contextlib.suppress(KeyNotFound):
                del self[key]


class SockHash(_SockMapBase[K]):
    """A ``BPF_MAP_TYPE_SOCKHASH``: typed key -> socket.  ``m[k] = sock`` inserts, ``m[k]`` is the cookie."""

    map_type = MapType.SOCKHASH

    def __init__(self, map_: Map, *, key: Codec[K] = U32) -> None:  # type: ignore[assignment]
        super().__init__(map_, key, None)

    @classmethod
    def create(
        cls,
        *,
        key: Codec[K] = U32,
        max_entries: int,
        name: str = "",
        value_size: int = 8,  # type: ignore[assignment]
    ) -> Self:
        created = Map.create(cls.map_type, key.size, value_size, max_entries, name=name)
        return _adopt(created, lambda m: cls(m, key=key))

    @classmethod
    def from_pin(cls, path: PathLike, *, key: Codec[K] = U32) -> Self:  # type: ignore[assignment]
        return _adopt(Map.from_pin(path), lambda m: cls(m, key=key))
