"""Framers: turn a byte stream into messages for ``on_message`` callbacks.

Design
------
A framer object holds the parsing state of ONE byte stream (one connection, one direction).  The
instance given to :meth:`Policy.on_message` is a *template*: the proxy never feeds it, it calls
:meth:`Framer.clone` (or :meth:`Framer.pair` when one callback sees both directions) to get fresh
instances for each new connection.  The default :meth:`~Framer.clone` deep-copies the template, so a
user framer usually only has to implement :meth:`~Framer.feed` and :meth:`~Framer.eof`.

Messages are *lossless* slices of the stream: concatenating every message returned by ``feed`` and
the final ``eof()`` leftover gives back exactly the bytes fed in.  The proxy forwards messages
verbatim, so it only accepts lossless framers (``LengthPrefixFramer(include_header=False)`` is for
decoding outside the proxy).

Every framer bounds its memory: it never buffers more than ``max_size`` bytes between calls and
raises :exc:`MessageTooLarge` as soon as a message is known to exceed it.  Malformed input raises
:exc:`FramingError` (a :exc:`ValueError`); after either error the framer must be discarded.
"""

from __future__ import annotations

import abc
import collections
import copy
import re
from typing import ClassVar

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Framer",
    "FramingError",
    "HttpHeadFramer",
    "LengthPrefixFramer",
    "LineFramer",
    "MessageTooLarge",
    "RawFramer",
]

DEFAULT_MAX_MESSAGE_SIZE = 1 << 20


class FramingError(ValueError):
    """The byte stream does not follow the framer's format.

    :ivar messages: the complete messages that preceded the problem in the same :meth:`Framer.feed`
        call (the proxy still delivers them before closing the connection).
    """

    def __init__(self, *args: object, messages: list[bytes] | None = None) -> None:
        super().__init__(*args)
        self.messages: list[bytes] = messages or []


class MessageTooLarge(FramingError):
    """A message (or a pending, still incomplete one) is larger than the framer's ``max_size``."""


class Framer(abc.ABC):
    """Base class for framers (see the module docstring for the template/clone model).

    Subclasses implement :meth:`feed` and :meth:`eof`.  ``max_size = None`` means "the proxy's
    ``max_message_size``" inside :func:`serve` and :data:`DEFAULT_MAX_MESSAGE_SIZE` elsewhere.
    """

    #: Whether concatenated messages reproduce the input exactly (required by the proxy).
    lossless: ClassVar[bool] = True
    max_size: int | None = None

    @abc.abstractmethod
    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the messages completed by it, in order.

        :raises MessageTooLarge: a message exceeds ``max_size``.
        :raises FramingError: the stream is malformed.
        """

    @abc.abstractmethod
    def eof(self) -> bytes:
        """The stream ended: return (and forget) the buffered bytes of an incomplete message."""

    def clone(self) -> Framer:
        """Return a fresh framer with this one's configuration (default: a deep copy)."""
        return copy.deepcopy(self)

    def pair(self) -> tuple[Framer, Framer]:
        """Return ``(to_upstream, to_client)`` framers for one connection.

        The default is two independent clones; direction-aware framers override it to link the two
        halves (:class:`HttpHeadFramer` uses it to know which responses answer ``HEAD`` requests).
        """
        return self.clone(), self.clone()

    @property
    def limit(self) -> int:
        """The effective maximum message size."""
        return self.max_size if self.max_size is not None else DEFAULT_MAX_MESSAGE_SIZE


class _BufferedFramer(Framer):
    """Built-in framers: ``_feed`` appends to ``out``; errors carry the messages completed before."""

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        try:
            self._feed(data, out)
        except FramingError as exc:
            exc.messages = out
            raise
        return out

    @abc.abstractmethod
    def _feed(self, data: bytes, out: list[bytes]) -> None: ...


def _check_max_size(max_size: int | None) -> int | None:
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
        raise ValueError(f"max_size must be a positive int or None, got {max_size!r}")
    return max_size


def _pieces(data: bytes | bytearray, limit: int) -> list[bytes]:
    return [bytes(data[i : i + limit]) for i in range(0, len(data), limit)]


class RawFramer(Framer):
    """Every received chunk is one message (chunks above ``max_size`` are cut into pieces).

    Message boundaries therefore depend on how the network delivered the bytes.
    """

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = _check_max_size(max_size)

    def feed(self, data: bytes) -> list[bytes]:
        return _pieces(data, self.limit) if data else []

    def eof(self) -> bytes:
        return b""

    def __repr__(self) -> str:
        return f"RawFramer(max_size={self.max_size})"


class LineFramer(_BufferedFramer):
    """Messages are lines ending in ``b"\\n"`` (the newline is kept, ``\\r`` is not special).

    :raises MessageTooLarge: a line, or the pending partial line, is longer than ``max_size``.
    """

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = _check_max_size(max_size)
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline, so each byte is scanned once

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete line."""
        return len(self._buf)

    def _feed(self, data: bytes, out: list[bytes]) -> None:
        buf, limit = self._buf, self.limit
        buf += data
        start = 0
        scan = self._scanned
        while True:
            nl = buf.find(b"\n", scan)
            if nl < 0:
                break
            if nl + 1 - start > limit:
                raise MessageTooLarge(f"line of {nl + 1 - start} bytes exceeds max_size {limit}")
            out.append(bytes(buf[start : nl + 1]))
            start = scan = nl + 1
        del buf[:start]
        if len(buf) > limit:
            raise MessageTooLarge(f"partial line of {len(buf)} bytes exceeds max_size {limit}")
        self._scanned = len(buf)

    def eof(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return rest

    def __repr__(self) -> str:
        return f"LineFramer(max_size={self.max_size})"


class LengthPrefixFramer(_BufferedFramer):
    """Frames with a big-endian length field: ``offset`` bytes, then ``size`` length bytes, then payload.

    The length value counts the payload only (the bytes after the length field).

    :param size: width of the length field: 1, 2, 4 or 8 bytes.
    :param offset: bytes before the length field (e.g. a type byte); they belong to the frame.
    :param include_header: whether messages include the ``offset + size`` header bytes.  Only
        ``True`` (lossless) can be used with the proxy.
    :raises MessageTooLarge: a frame (header + payload) is longer than ``max_size``; raised as soon
        as the header is seen, before the payload is buffered.
    """

    def __init__(
        self, size: int = 2, offset: int = 0, max_size: int | None = None, include_header: bool = True
    ) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"size must be 1, 2, 4 or 8, got {size!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        self.size = size
        self.offset = offset
        self.include_header = bool(include_header)
        self.max_size = _check_max_size(max_size)
        self._buf = bytearray()

    @property  # type: ignore[override]
    def lossless(self) -> bool:  # instance-dependent, unlike the base class attribute
        return self.include_header

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def _feed(self, data: bytes, out: list[bytes]) -> None:
        buf, limit = self._buf, self.limit
        buf += data
        head = self.offset + self.size
        pos = 0
        while len(buf) - pos >= head:
            n = int.from_bytes(buf[pos + self.offset : pos + head], "big")
            total = head + n
            if total > limit:
                raise MessageTooLarge(f"frame of {total} bytes exceeds max_size {limit}")
            if len(buf) - pos < total:
                break
            out.append(bytes(buf[pos if self.include_header else pos + head : pos + total]))
            pos += total
        del buf[:pos]

    def eof(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def __repr__(self) -> str:
        return (
            f"LengthPrefixFramer(size={self.size}, offset={self.offset}, max_size={self.max_size},"
            f" include_header={self.include_header})"
        )


class _HttpShared:
    """State shared by the two halves of one HTTP connection (see :meth:`HttpHeadFramer.pair`)."""

    # Pipelined requests still waiting for a response; beyond this the peer is abusing us.
    MAX_PENDING = 1024

    def __init__(self, paired: bool) -> None:
        self.paired = paired
        self.methods: collections.deque[str] = collections.deque()
        self.tunnel = False


_HEAD, _UNIT, _CHUNK_SIZE, _CHUNK_LAST, _RAW = range(5)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_STATUS = re.compile(rb"[1-9][0-9]{2}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_MAX_CHUNK_LINE = 4096


class HttpHeadFramer(_BufferedFramer):
    """HTTP/1.x framing: each request/response head is one message, then the body.

    * The head, from the start line up to and including the blank line (``CRLF CRLF``), is one
      message.  Empty lines before a start line are kept at the front of that head.
    * A ``Content-Length`` body follows as messages of ``max_size`` bytes (the last one shorter): a
      body that fits is exactly one message.
    * A ``Transfer-Encoding: chunked`` body follows as one message per chunk in wire form (size line,
      data, CRLF; split like a Content-Length body if above ``max_size``), then one message holding
      the last chunk, the trailers and the final CRLF.
    * Bodiless messages: requests without ``Content-Length``/``Transfer-Encoding``, ``1xx``, ``204``
      and ``304`` responses, and -- when the framers come from :meth:`pair`, as in the proxy --
      responses to ``HEAD`` requests.  ``101 Switching Protocols`` and a ``2xx`` answer to
      ``CONNECT`` switch both directions to raw chunks (a tunnel).
    * A response delimited by connection close is delivered as raw chunks.

    The role (request or response stream) is taken from the first start line.

    :raises MessageTooLarge: a head, or the last chunk with trailers, exceeds ``max_size``.
    :raises FramingError: a malformed start line, header, length or chunk.
    """

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = _check_max_size(max_size)
        self._buf = bytearray()
        self._state = _HEAD
        self._scanned = 0
        self._remaining = 0  # bytes left in the current length-delimited unit
        self._in_chunk = False  # the current unit is a chunk, so it must end in CRLF
        self._tail = b""  # last two bytes emitted of the current unit, to check that CRLF
        self._shared = _HttpShared(paired=False)

    def pair(self) -> tuple[Framer, Framer]:
        a, b = self.clone(), self.clone()
        assert isinstance(a, HttpHeadFramer) and isinstance(b, HttpHeadFramer)
        a._shared = b._shared = _HttpShared(paired=True)
        return a, b

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message."""
        return len(self._buf)

    def _feed(self, data: bytes, out: list[bytes]) -> None:
        buf, limit = self._buf, self.limit
        buf += data
        while buf:
            state = self._state
            if state == _HEAD:
                if self._shared.tunnel:
                    self._state = _RAW
                    continue
                start = 0
                while buf.startswith(b"\r\n", start):
                    start += 2
                end = buf.find(b"\r\n\r\n", max(start, self._scanned - 3))
                if end < 0:
                    if len(buf) > limit:
                        raise MessageTooLarge(f"HTTP head over {limit} bytes")
                    self._scanned = len(buf)
                    break
                end += 4
                if end > limit:
                    raise MessageTooLarge(f"HTTP head of {end} bytes exceeds max_size {limit}")
                head = bytes(buf[:end])
                del buf[:end]
                self._scanned = 0
                self._parse_head(head[start:])
                out.append(head)
            elif state == _UNIT:
                take = min(self._remaining, limit)
                if len(buf) < take:
                    break
                piece = bytes(buf[:take])
                del buf[:take]
                self._remaining -= take
                self._tail = (self._tail + piece[-2:])[-2:]
                if self._remaining == 0:
                    if self._in_chunk and self._tail != b"\r\n":
                        raise FramingError("HTTP chunk data not followed by CRLF")
                    self._state = _CHUNK_SIZE if self._in_chunk else _HEAD
                out.append(piece)
            elif state == _CHUNK_SIZE:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if len(buf) > _MAX_CHUNK_LINE:
                        raise FramingError("HTTP chunk size line too long")
                    break
                size_field = bytes(buf[:nl]).split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size_field):
                    raise FramingError(f"bad HTTP chunk size {size_field[:20]!r}")
                size = int(size_field, 16)
                if size == 0:
                    self._state = _CHUNK_LAST
                    self._scanned = nl
                else:
                    # The whole chunk in wire form (size line, data, CRLF) is one unit.
                    self._state, self._remaining = _UNIT, nl + 2 + size + 2
                    self._in_chunk, self._tail = True, b""
            elif state == _CHUNK_LAST:
                end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
                if end < 0:
                    if len(buf) > limit:
                        raise MessageTooLarge(f"HTTP trailers over {limit} bytes")
                    self._scanned = max(self._scanned, len(buf))
                    break
                end += 4
                if end > limit:
                    raise MessageTooLarge(f"HTTP trailers of {end} bytes exceed max_size {limit}")
                out.append(bytes(buf[:end]))
                del buf[:end]
                self._state, self._scanned = _HEAD, 0
            else:  # _RAW: tunnel or read-until-close body
                out.extend(_pieces(buf, limit))
                buf.clear()

    def eof(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def _start_unit(self, length: int) -> None:
        if length:
            self._state, self._remaining, self._in_chunk, self._tail = _UNIT, length, False, b""
        else:
            self._state = _HEAD

    def _parse_head(self, head: bytes) -> None:
        lines = head[:-4].split(b"\r\n")
        start_line = lines[0]
        te: list[bytes] = []
        cl: set[int] = set()
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise FramingError("obsolete HTTP header line folding")
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                raise FramingError(f"malformed HTTP header line {line[:40]!r}")
            lname = name.lower()
            if lname == b"transfer-encoding":
                te.extend(c.strip().lower() for c in value.split(b",") if c.strip())
            elif lname == b"content-length":
                for v in value.split(b","):
                    v = v.strip()
                    if not v.isdigit() or len(v) > 18:
                        raise FramingError(f"bad Content-Length {v[:20]!r}")
                    cl.add(int(v))
        if len(cl) > 1:
            raise FramingError("conflicting Content-Length values")
        length = cl.pop() if cl else None
        chunked = bool(te) and te[-1] == b"chunked"
        shared = self._shared

        if start_line.startswith(b"HTTP/"):
            parts = start_line.split(b" ", 2)
            if len(parts) < 2 or not _VERSION.fullmatch(parts[0]) or not _STATUS.fullmatch(parts[1]):
                raise FramingError(f"malformed HTTP status line {start_line[:60]!r}")
            code = int(parts[1])
            if 100 <= code < 200 and code != 101:
                self._state = _HEAD  # interim response; the final one follows
                return
            method = shared.methods.popleft() if shared.methods else None
            if code == 101 or (method == "CONNECT" and 200 <= code < 300):
                shared.tunnel = True
                self._state = _RAW
            elif method == "HEAD" or code in (204, 304):
                self._state = _HEAD
            elif chunked:
                self._state = _CHUNK_SIZE
            elif te:
                self._state = _RAW  # other codings: body delimited by close
            elif length is not None:
                self._start_unit(length)
            else:
                self._state = _RAW
            return

        parts = start_line.split(b" ")
        ok = len(parts) == 3 and parts[1] and _TOKEN.fullmatch(parts[0]) and _VERSION.fullmatch(parts[2])
        if not ok:
            raise FramingError(f"malformed HTTP request line {start_line[:60]!r}")
        if shared.paired:
            if len(shared.methods) >= _HttpShared.MAX_PENDING:
                raise FramingError("too many pipelined HTTP requests without a response")
            shared.methods.append(parts[0].decode("ascii"))
        if te:
            if not chunked:
                raise FramingError("HTTP request Transfer-Encoding does not end in chunked")
            self._state = _CHUNK_SIZE
        else:
            self._start_unit(length or 0)

    def __repr__(self) -> str:
        return f"HttpHeadFramer(max_size={self.max_size})"
