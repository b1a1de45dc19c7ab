"""Feasibility probe (not collected by pytest): an SK_MSG verdict on the sink of an SK_SKB splice.

Run as root inside a throwaway netns:  ip netns exec NS .venv/bin/python tests/probe_msg_sink.py CASE...
CASE: count pop cork apply framed framed-small framed-tiny apply-cork framed-eof.  Each prints OK/FAIL per
run (byte-exact at the far end, EOF seen, no SO_ERROR) with the program's counters; FAIL is often the
finding (cork without an explicit uncork, apply_bytes + cork, a partial header at EOF).
Topology: C1 -> S1 (source, in `socks` key 0; its skbs are redirected) and C2 -> S2 (C2 = sink, key 1;
S2 = far end, checks every byte).  See sockpolicy/progs/test_msg_probe.bpf.c for the program logic.
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from sockpolicy import AttachType, ObjectSpec
from sockpolicy.maps import cookie_of
from sockpolicy.proxy._splice import queued_total

MODES = {"count": 0, "pop": 1, "cork": 2, "apply": 3, "framed": 4, "apply-cork": 5}
CFG = {"mode": 0, "sink_port": 1, "src_cookie": 2, "cork_n": 3, "apply_n": 4, "uncork": 9, "nopop": 10}
ST = [
    "calls", "off", "popped", "pop_fail", "corked", "redir", "redir_fail", "other", "fin_dropped",
    "skip", "skip_drop", "frames", "frames_dropped", "pull_fail", "head", "skbs", "limit", "stuck",
    "target", "cork_short", "phase",
]  # fmt: skip


@dataclass
class Result:
    received: bytes = b""
    eof: bool = False
    errors: dict[str, int] = field(default_factory=dict)
    st: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[int, ...]] = field(default_factory=list)
    sink_queued: int = 0
    userspace: int = 0


def run(
    mode: str,
    chunks: list[bytes],
    *,
    gap: float = 0.0,
    drops: list[tuple[int, int]] = (),
    cork_n: int = 0,
    apply_n: int = 0,
    uncork: bool = False,
    nopop: bool = False,
    user_first: bytes = b"",
    shutdown: bool = True,
    settle: float = 0.5,
) -> Result:
    res = Result()
    with ObjectSpec.from_package("test_msg_probe").load() as obj:
        socks, cfg, st, calls = (obj.maps[n] for n in ("socks", "cfg", "st", "calls"))

        def put(key: str | int, value: int) -> None:
            cfg.update(struct.pack("=I", CFG[key] if isinstance(key, str) else key), struct.pack("=Q", value))

        def stat(name: str) -> int:
            return struct.unpack("=Q", st.lookup(struct.pack("=I", ST.index(name))))[0]

        skb = obj.programs["probe_skb"].attach_map(socks, AttachType.SK_SKB_VERDICT)
        msg = obj.programs["probe_msg"].attach_map(socks, AttachType.SK_MSG_VERDICT)
        with skb, msg, socket.create_server(("127.0.0.1", 0)) as lst:
            c1 = socket.create_connection(lst.getsockname())
            s1, _ = lst.accept()
            c2 = socket.create_connection(lst.getsockname())
            s2, _ = lst.accept()
            c1.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            put("mode", MODES[mode])
            put("sink_port", c2.getsockname()[1])
            put("src_cookie", cookie_of(s1))
            put("cork_n", cork_n)
            put("apply_n", apply_n)
            put("uncork", int(uncork))
            put("nopop", int(nopop))
            for i, (lo, hi) in enumerate(drops):
                put(5 + 2 * i, lo)
                put(6 + 2 * i, hi)
            socks.update(struct.pack("=I", 0), struct.pack("=q", s1.fileno()))
            socks.update(struct.pack("=I", 1), struct.pack("=q", c2.fileno()))
            base = queued_total(c2)
            total = sum(map(len, chunks))
            if user_first:
                c2.sendall(user_first)
                res.userspace = len(user_first)

            def send() -> None:
                for chunk in chunks:
                    c1.sendall(chunk)
                    if gap:
                        time.sleep(gap)
                if shutdown:
                    c1.shutdown(socket.SHUT_WR)

            def receive() -> None:
                s2.settimeout(5)
                parts = []
                try:
                    while True:
                        data = s2.recv(1 << 20)
                        if not data:
                            res.eof = True
                            break
                        parts.append(data)
                except TimeoutError:
                    pass
                res.received = b"".join(parts)

            sender = threading.Thread(target=send)
            receiver = threading.Thread(target=receive)
            receiver.start()
            sender.start()
            sender.join()
            # The relay's job: once the source hit EOF and every byte was redirected, wait until the sink's
            # write queue stops growing (the backlog drained), then pass the EOF on.
            deadline = time.monotonic() + 20
            while stat("redir") < total and time.monotonic() < deadline:
                time.sleep(0.01)
            last, since = -1, time.monotonic()
            while time.monotonic() - since < settle and time.monotonic() < deadline:
                now = queued_total(c2)
                if now != last:
                    last, since = now, time.monotonic()
                time.sleep(0.01)
            res.sink_queued = queued_total(c2) - base
            if shutdown:
                s1.setblocking(False)
                try:
                    assert s1.recv(1) == b"", "source not at EOF"
                except BlockingIOError:
                    res.errors["source_not_eof"] = 1
                c2.shutdown(socket.SHUT_WR)
            receiver.join()
            for name, sock in (("c1", c1), ("s1", s1), ("c2", c2), ("s2", s2)):
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    res.errors[name] = err
            res.st = {name: stat(name) for name in ST}
            for i in range(min(res.st["calls"], 65536)):
                res.calls.append(struct.unpack("=IIIiIIIII", calls.lookup(struct.pack("=I", i))))
            for s in (c1, s1, c2, s2):
                s.close()
    return res


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def cut(data: bytes, drops: list[tuple[int, int]]) -> bytes:
    out, pos = [], 0
    for lo, hi in sorted(drops):
        out.append(data[pos:lo])
        pos = hi
    out.append(data[pos:])
    return b"".join(out)


def report(name: str, res: Result, expected: bytes, *, sent: bytes = b"", show_calls: int = 12) -> bool:
    got = res.received
    ok = got == expected and res.eof and not res.errors
    first_bad = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )
    sizes = [c[0] for c in res.calls]
    print(
        f"{name}: {'OK' if ok else 'FAIL'} received={len(got)} expected={len(expected)} "
        f"match={got == expected} first_diff={first_bad if got != expected else '-'} eof={res.eof} "
        f"so_error={res.errors} sink_queued={res.sink_queued} msg_calls={len(res.calls)} "
        f"sum_sizes={sum(sizes)} min={min(sizes, default=0)} max={max(sizes, default=0)}"
    )
    print("   st:", {k: v for k, v in res.st.items() if v})
    if show_calls:
        # Where each message starts in the sent stream, from its first 4 bytes (-1: not found / not linear).
        shown = [(size, sent.find(struct.pack("=I", head)) if head else -1, after, ret)
                 for size, _off, after, ret, head, *_ in res.calls[:show_calls]]  # fmt: skip
        print("   calls (size, at, after, ret):", shown, "..." if len(res.calls) > show_calls else "")
    return ok


def framed_stream(seed: int, count: int, max_len: int) -> tuple[bytes, bytes]:
    """Frames of 4-byte big-endian length + payload; payload[0] odd = Drop.  (stream, expected)."""
    rng = random.Random(seed)
    out, keep = [], []
    for _ in range(count):
        n = rng.randint(1, max_len)
        payload = rng.randbytes(n)
        frame = struct.pack(">I", n) + payload
        out.append(frame)
        if not payload[0] & 1:
            keep.append(frame)
    return b"".join(out), b"".join(keep)


def main(cases: list[str]) -> None:
    ok = True
    if "count" in cases:
        data = pattern(1, 5000)
        sent = b"U" * 300 + data
        ok &= report("count/paced+user", run("count", split(data, 1000), gap=0.05, user_first=b"U" * 300),
                     sent, sent=sent)  # fmt: skip
        for i in range(3):
            data = pattern(2 + i, 4 << 20)
            ok &= report(f"count/4MB run {i}", run("count", [data]), data, sent=data, show_calls=6)
    if "pop" in cases:
        data = pattern(3, 5000)
        drops = [(1000, 2000), (2500, 2600)]  # the whole 2nd message, then 100 bytes inside the 3rd
        res = run("pop", split(data, 1000), gap=0.05, drops=drops)
        ok &= report("pop/paced", res, cut(data, drops), sent=data)
        for i in range(10):
            data = pattern(100 + i, 4 << 20)
            drops = [(1_000_000 + 7 * i, 1_300_000), (3_000_001, 3_000_009 + i)]
            res = run("pop", [data], drops=drops)
            ok &= report(f"pop/4MB run {i}", res, cut(data, drops), show_calls=0)
    if "cork" in cases:
        for uncork in (False, True):
            tag = "+uncork" if uncork else "no uncork"
            data = pattern(4, 7000)
            res = run("cork", split(data, 1000), gap=0.05, cork_n=5000, uncork=uncork)
            ok &= report(f"cork/5000 paced {tag}", res, data, sent=data, show_calls=20)
            data = pattern(5, 3000)
            res = run("cork", split(data, 1000), gap=0.05, cork_n=10000, uncork=uncork)
            ok &= report(f"cork/10000 but 3000 then EOF {tag}", res, data, sent=data)
            data = pattern(9, 200_000)
            res = run("cork", split(data, 1000), gap=0.002, cork_n=100_000, uncork=uncork)
            ok &= report(f"cork/100000 paced 1000 B {tag}", res, data, sent=data, show_calls=4)
            for i in range(3):
                data = pattern(6 + i, 4 << 20)
                res = run("cork", [data], cork_n=1 << 20, uncork=uncork)
                ok &= report(f"cork/1MB on 4MB {tag} run {i}", res, data, sent=data, show_calls=4)
    if "apply" in cases:
        data = pattern(7, 10000)
        res = run("apply", split(data, 1000), gap=0.05, apply_n=2500)
        ok &= report("apply/2500 paced", res, data, sent=data, show_calls=20)
        for i in range(3):
            data = pattern(8 + i, 4 << 20)
            res = run("apply", [data], apply_n=1 << 20)
            ok &= report(f"apply/1MB on 4MB run {i}", res, data, sent=data, show_calls=20)
    if "framed" in cases:
        for uncork in (True, False):
            for i in range(10):
                stream, expected = framed_stream(200 + i, 400, 20000)
                chunks = split(stream, 3000 + 997 * i) if i % 2 else [stream]
                res = run("framed", chunks, gap=0.001 if i % 2 else 0, uncork=uncork)
                tag = "+uncork" if uncork else "no uncork"
                name = f"framed {tag} run {i} ({len(stream)} B, {len(chunks)} writes)"
                ok &= report(name, res, expected, show_calls=0)
    if "framed-small" in cases:
        # Small frames, small paced writes: many headers cut between messages, so the cork path runs.
        for uncork in (True, False):
            for i, size in enumerate((13, 61, 97, 250, 1000)):
                stream, expected = framed_stream(300 + i, 1500, 300)
                res = run("framed", split(stream, size), gap=0.0005, uncork=uncork)
                tag = "+uncork" if uncork else "no uncork"
                name = f"framed-small {tag} writes of {size} ({len(stream)} B)"
                ok &= report(name, res, expected, show_calls=0)
    if "framed-tiny" in cases:
        # More than MAX_FRAMES (16) frames per message: the program sends the judged part with
        # apply_bytes and judges the rest in the kernel's re-run.
        for i, (size, gap) in enumerate(((4000, 0.001), (1 << 20, 0), (1 << 20, 0))):
            stream, expected = framed_stream(500 + i, 40000, 20)
            res = run("framed", split(stream, size), gap=gap, uncork=True)
            ok &= report(f"framed-tiny writes of {size} ({len(stream)} B)", res, expected, show_calls=0)
    if "apply-cork" in cases:
        # apply_bytes(size - 2), then cork the 2 bytes left in the kernel's re-run: no byte is changed.
        for size, gap in ((1000, 0.01), (4000, 0.001), (1000, 0)):
            data = pattern(700 + size, 400_000)
            res = run("apply-cork", split(data, size), gap=gap)
            ok &= report(f"apply-cork writes of {size} gap {gap}", res, data, sent=data, show_calls=9)
    if "framed-eof" in cases:
        stream, expected = framed_stream(400, 50, 3000)
        for tail, what in (
            (b"\0\0\0", "3 bytes of a header"),
            (struct.pack(">I", 100) + b"\2" * 40, "a cut frame"),
        ):
            res = run("framed", [*split(stream, 1000), tail], gap=0.002, uncork=True)
            # A cut frame's first 40 payload bytes are passed as they come; a cut header cannot be judged.
            report(f"framed-eof, stream ends with {what}", res, expected + tail, show_calls=0)
    print("ALL OK" if ok else "SOME FAILED")


if __name__ == "__main__":
    main(sys.argv[1:])
