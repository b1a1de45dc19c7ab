"""Codecs: how a Python value becomes the fixed-size bytes of a BPF map key or value, and back.

A codec is any object with ``size``, ``name``, ``encode(value) -> bytes`` and ``decode(bytes) -> value``
(:class:`Codec`).  ``encode`` raises :class:`ValueError` with a one-line message (no map name: the typed
map adds that) when a value does not fit.

Integers use host byte order because that is how the kernel and BPF C see ``__u32`` and friends;
:data:`BE16`/:data:`BE32` are for fields the BPF side keeps in network order (ports, addresses).
"""

from __future__ import annotations

import ipaddress
import struct
from collections import namedtuple
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")

__all__ = [
    "BE16",
    "BE32",
    "U8",
    "U16",
    "U32",
    "U64",
    "Bool",
    "Bytes",
    "Codec",
    "IPv4",
    "IPv6",
    "Int",
    "Struct",
]


@runtime_checkable
class Codec(Protocol[T]):
    """Encodes values of type ``T`` into exactly :attr:`size` bytes."""

    #: the encoded length in bytes
    size: int
    #: a short name for messages, e.g. ``"U32"``
    name: str

    def encode(self, value: T) -> bytes: ...

    def decode(self, data: bytes) -> T: ...


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_length(codec: Codec[Any], data: bytes) -> None:
    if len(data) != codec.size:
        raise ValueError(f"{codec.name} decodes {codec.size} bytes, got {len(data)}")


class Int:
    """An unsigned integer of ``size`` bytes in host (``big=False``) or network (``big=True``) order."""

    def __init__(self, size: int, *, big: bool = False, name: str | None = None) -> None:
        formats = {1: "B", 2: "H", 4: "I", 8: "Q"}
        if size not in formats:
            raise ValueError(f"integer codecs are 1, 2, 4 or 8 bytes, not {size}")
        self.size = size
        self.name = name or f"{'BE' if big else 'U'}{size * 8}"
        self._struct = struct.Struct((">" if big else "=") + formats[size])
        self._max = (1 << (8 * size)) - 1

    def __repr__(self) -> str:
        return self.name

    def encode(self, value: int) -> bytes:
        # bool is an int, but a bool where a number is expected is almost always a mistake elsewhere.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"value {_short(value)} is not an int (codec {self.name})")
        if not 0 <= value <= self._max:
            raise ValueError(f"value {value} does not fit {self.name} (0..{self._max})")
        return self._struct.pack(value)

    def decode(self, data: bytes) -> int:
        _check_length(self, data)
        return self._struct.unpack(data)[0]


U8 = Int(1)
U16 = Int(2)
U32 = Int(4)
U64 = Int(8)
BE16 = Int(2, big=True)
BE32 = Int(4, big=True)


class _Bool:
    """One byte: ``0`` is ``False``, anything else ``True`` (C ``bool``/``__u8`` flag)."""

    size = 1
    name = "Bool"

    def __repr__(self) -> str:
        return self.name

    def encode(self, value: bool) -> bytes:
        if value not in (True, False):  # also accepts 0 and 1
            raise ValueError(f"value {_short(value)} is not a bool")
        return b"\x01" if value else b"\x00"

    def decode(self, data: bytes) -> bool:
        _check_length(self, data)
        return data != b"\x00"


Bool = _Bool()


class Bytes:
    """Exactly ``n`` raw bytes (no padding: a shorter value is an error, not silently zero-filled)."""

    def __init__(self, n: int) -> None:
        if n <= 0:
            raise ValueError(f"Bytes needs a positive length, not {n}")
        self.size = n
        self.name = f"Bytes({n})"

    def __repr__(self) -> str:
        return self.name

    def encode(self, value: bytes | bytearray | memoryview) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ValueError(f"value {_short(value)} is not bytes (codec {self.name})")
        data = bytes(value)
        if len(data) != self.size:
            raise ValueError(f"value of {len(data)} bytes does not fit {self.name}")
        return data

    def decode(self, data: bytes) -> bytes:
        _check_length(self, data)
        return bytes(data)


class _Address:
    def __init__(self, version: int) -> None:
        self.version = version
        self.size = 4 if version == 4 else 16
        self.name = f"IPv{version}"
        self._cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address

    def __repr__(self) -> str:
        return self.name

    def encode(self, value: Any) -> bytes:
        """Network byte order, as in ``struct in_addr``/``in6_addr``; accepts a str or an address."""
        try:
            address = self._cls(value) if not isinstance(value, self._cls) else value
        except (ValueError, TypeError):
            raise ValueError(f"value {_short(value)} is not an {self.name} address") from None
        return address.packed

    def decode(self, data: bytes) -> Any:
        _check_length(self, data)
        return self._cls(bytes(data))


IPv4 = _Address(4)
IPv6 = _Address(6)


class Struct:
    """A C struct described with a :mod:`struct` format, decoded as a tuple or a NamedTuple.

    ``Struct("=IHH", names=("addr", "port", "proto"))`` decodes to a NamedTuple with those fields and
    encodes any sequence of the right length.  Mind C padding: ``"=QI"`` is 12 bytes, while the C struct
    ``{__u64 a; __u32 b;}`` is 16 - write ``"=QI4x"``.  A typed map compares :attr:`size` with the map's
    ``value_size`` and names both when they differ.
    """

    def __init__(self, fmt: str, names: Sequence[str] | str | None = None, *, name: str | None = None):
        self._struct = struct.Struct(fmt)
        self.size = self._struct.size
        self.fmt = fmt
        self._tuple: Any = None
        if names is not None:
            field_names = names.replace(",", " ").split() if isinstance(names, str) else list(names)
            self._tuple = namedtuple(name or "Record", field_names)
            count = len(self._struct.unpack(bytes(self.size)))
            if count != len(field_names):
                raise ValueError(f"format {fmt!r} has {count} fields but {len(field_names)} names were given")
        self.name = name or f"Struct({fmt!r})"

    def __repr__(self) -> str:
        return self.name

    def encode(self, value: Sequence[Any]) -> bytes:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ValueError(f"value {_short(value)} is not a tuple for {self.name}")
        try:
            return self._struct.pack(*value)
        except struct.error as exc:
            raise ValueError(f"value {_short(value)} does not fit {self.name}: {exc}") from None

    def decode(self, data: bytes) -> Any:
        _check_length(self, data)
        fields = self._struct.unpack(data)
        return self._tuple._make(fields) if self._tuple is not None else fields
