"""Typed, dict-like BPF maps.

Wrap a :class:`~sockpolicy.Map` (taking ownership), or create / open a pinned one::

    from sockpolicy.maps import Hash, U32, U64

    with Hash.create(key=U32, value=U64, max_entries=64, name="counters") as counters:
        counters[1] = 10
        counters.put(1, 11, UpdateFlags.EXIST)   # conditional writes: put(), not update()

Codecs (:class:`Codec`) turn Python values into the map's fixed-size bytes: :data:`U8` .. :data:`U64`
(host order), :data:`BE16`/:data:`BE32` (network order), :class:`Struct`, :class:`Bytes`, :data:`IPv4`,
:data:`IPv6`, :data:`Bool`.
"""

from sockpolicy.maps._codecs import BE16, BE32, U8, U16, U32, U64, Bool, Bytes, Codec, Int, IPv4, IPv6, Struct
from sockpolicy.maps._typed import (
    SO_COOKIE,
    Array,
    Hash,
    LpmTrie,
    PerCpuArray,
    PerCpuHash,
    SockHash,
    SockMap,
    check_socket,
    cookie_of,
)

__all__ = [
    "BE16",
    "BE32",
    "SO_COOKIE",
    "U8",
    "U16",
    "U32",
    "U64",
    "Array",
    "Bool",
    "Bytes",
    "Codec",
    "Hash",
    "IPv4",
    "IPv6",
    "Int",
    "LpmTrie",
    "PerCpuArray",
    "PerCpuHash",
    "SockHash",
    "SockMap",
    "Struct",
    "check_socket",
    "cookie_of",
]
