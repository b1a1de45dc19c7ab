"""Framers: chunking invariance, losslessness, bounded memory, clean errors (property-based)."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockpolicy.proxy import (
    Framer,
    FramingError,
    HttpHeadFramer,
    LengthPrefixFramer,
    LineFramer,
    MessageTooLarge,
    RawFramer,
)

# SOCKPOLICY_FRAMER_EXAMPLES raises the example count for a deeper local run.
SETTINGS = settings(
    max_examples=int(os.environ.get("SOCKPOLICY_FRAMER_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def run(framer: Framer, chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += framer.feed(chunk)
        buffered = getattr(framer, "buffered", 0)
        assert buffered <= framer.limit, "framer buffered more than max_size"
    return out, framer.eof()


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=40)


# -- LineFramer ------------------------------------------------------------------------------------

lines = st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=20)


@SETTINGS
@given(lines, st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), cuts)
def test_line_framer_chunking(msgs: list[bytes], tail: bytes, cut: list[int]) -> None:
    data = b"".join(msgs) + tail
    got, rest = run(LineFramer(), chunked(data, cut))
    assert got == msgs
    assert rest == tail


def test_line_framer_many_in_one_and_split() -> None:
    f = LineFramer()
    assert f.feed(b"a\nb\nc") == [b"a\n", b"b\n"]
    assert f.feed(b"") == []
    assert f.feed(b"c\r\n") == [b"cc\r\n"]
    assert f.eof() == b""


def test_line_framer_max_size() -> None:
    f = LineFramer(max_size=4)
    assert f.feed(b"abc\n") == [b"abc\n"]
    with pytest.raises(MessageTooLarge) as info:
        f.feed(b"ok\nabcde")  # the partial line is already too long: refuse before buffering more
    assert info.value.messages == [b"ok\n"]
    with pytest.raises(MessageTooLarge):
        LineFramer(max_size=4).feed(b"abcd\n")


# -- LengthPrefixFramer ----------------------------------------------------------------------------


@SETTINGS
@given(
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 3),
    st.lists(st.binary(max_size=300), max_size=10),
    cuts,
)
def test_length_prefix_chunking(size: int, offset: int, payloads: list[bytes], cut: list[int]) -> None:
    if size == 1:
        payloads = [p[:255] for p in payloads]
    frames = [b"T" * offset + len(p).to_bytes(size, "big") + p for p in payloads]
    got, rest = run(LengthPrefixFramer(size=size, offset=offset), chunked(b"".join(frames), cut))
    assert got == frames
    assert rest == b""
    stripped, _ = run(LengthPrefixFramer(size=size, offset=offset, include_header=False), [b"".join(frames)])
    assert stripped == payloads


def test_length_prefix_limits_and_leftover() -> None:
    f = LengthPrefixFramer(size=2, max_size=10)
    assert f.feed(b"\x00\x02hi\x00\x05ab") == [b"\x00\x02hi"]
    assert f.eof() == b"\x00\x05ab"
    with pytest.raises(MessageTooLarge):
        # 2 + 9 > 10: refused from the header alone, before the payload arrives
        LengthPrefixFramer(size=2, max_size=10).feed(b"\x00\x09")
    with pytest.raises(ValueError):
        LengthPrefixFramer(size=3)
    assert not LengthPrefixFramer(include_header=False).lossless


# -- HttpHeadFramer --------------------------------------------------------------------------------


def http_request(method: str, body: bytes, chunk_sizes: list[int] | None) -> list[bytes]:
    """Wire messages of one request, as the framer should emit them."""
    if chunk_sizes is None:
        headers = f"Content-Length: {len(body)}\r\n" if body else ""
        head = f"{method} /p HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
        return [head, body] if body else [head]
    head = f"{method} /p HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".encode()
    msgs = [head]
    pos = 0
    for n in chunk_sizes:
        piece = body[pos : pos + n]
        pos += n
        if piece:
            msgs.append(b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n")
    msgs.append(b"0\r\nTrailer: t\r\n\r\n")
    return msgs


request_st = st.tuples(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.binary(max_size=200),
    st.one_of(st.none(), st.lists(st.integers(1, 50), min_size=1, max_size=8)),
)


@SETTINGS
@given(st.lists(request_st, min_size=1, max_size=5), cuts)
def test_http_requests_chunking(requests: list[tuple[str, bytes, list[int] | None]], cut: list[int]) -> None:
    expected = [m for r in requests for m in http_request(*r)]
    data = b"".join(expected)
    got, rest = run(HttpHeadFramer(), chunked(data, cut))
    assert got == expected
    assert rest == b""


def test_http_content_length_body_split_at_max_size() -> None:
    head = b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n"
    f = HttpHeadFramer(max_size=40)
    assert f.feed(head + b"a" * 100 + b"GET / HTTP/1.1\r\n\r\n") == [
        head,
        b"a" * 40,
        b"a" * 40,
        b"a" * 20,
        b"GET / HTTP/1.1\r\n\r\n",
    ]


def test_http_responses_bodiless_and_head() -> None:
    req, resp = HttpHeadFramer().pair()
    requests = b"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\nGET /n HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n"
    assert len(req.feed(requests)) == 4
    r1 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"  # answers HEAD: no body follows
    r2a = b"HTTP/1.1 100 Continue\r\n\r\n"
    r2 = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    r3 = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"
    r4 = b"HTTP/1.1 204 No Content\r\n\r\n"
    stream = r1 + r2a + r2 + b"abc" + r3 + r4
    for size in (1, 7, len(stream)):
        req, resp = HttpHeadFramer().pair()
        req.feed(requests)
        got, rest = run(resp, [stream[i : i + size] for i in range(0, len(stream), size)])
        assert got == [r1, r2a, r2, b"abc", r3, r4]
        assert rest == b""


def test_http_until_close_and_upgrade() -> None:
    f = HttpHeadFramer()
    head = b"HTTP/1.0 200 OK\r\n\r\n"
    assert f.feed(head + b"body") == [head, b"body"]
    assert f.feed(b"more") == [b"more"]  # read-until-close: raw chunks
    req, resp = HttpHeadFramer().pair()
    up = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    assert req.feed(up) == [up]
    sw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    assert resp.feed(sw + b"\x81\x00") == [sw, b"\x81\x00"]
    assert req.feed(b"\x81\x05hello") == [b"\x81\x05hello"]  # the tunnel is raw both ways


@pytest.mark.parametrize(
    "bad",
    [
        b"NOT A REQUEST\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ],
)
def test_http_malformed_raises_framing_error(bad: bytes) -> None:
    with pytest.raises(FramingError):
        HttpHeadFramer().feed(bad)


def test_http_head_too_large() -> None:
    with pytest.raises(MessageTooLarge):
        HttpHeadFramer(max_size=64).feed(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 20)


# -- all framers -----------------------------------------------------------------------------------

ALL = [
    lambda: RawFramer(max_size=64),
    lambda: LineFramer(max_size=64),
    lambda: LengthPrefixFramer(size=2, max_size=64),
    lambda: LengthPrefixFramer(size=4, offset=1, max_size=64),
    lambda: HttpHeadFramer(max_size=64),
]


@SETTINGS
@given(st.sampled_from(range(len(ALL))), st.binary(max_size=600), cuts)
def test_garbage_never_crashes_and_is_lossless(which: int, data: bytes, cut: list[int]) -> None:
    framer = ALL[which]()
    out: list[bytes] = []
    try:
        for chunk in chunked(data, cut):
            out += framer.feed(chunk)
            assert getattr(framer, "buffered", 0) <= 64
    except FramingError as exc:  # the only acceptable failure
        out += exc.messages
        assert data.startswith(b"".join(out))
        return
    assert all(len(m) <= 64 for m in out)
    assert b"".join(out) + framer.eof() == data


def test_clone_and_pair_are_independent() -> None:
    template = LineFramer(max_size=100)
    a, b = template.pair()
    c = template.clone()
    assert a.feed(b"x") == [] and b.feed(b"y\n") == [b"y\n"] and c.feed(b"z\n") == [b"z\n"]
    assert a.eof() == b"x" and template.eof() == b""
    assert c.max_size == 100
