"""The load generator: the SAME client for every candidate.  Run as a subprocess, one measurement each.

``python loadgen.py '<json spec>'`` prints one JSON result line.  Blocking sockets, preallocated
buffers and ``recv_into``, ``time.perf_counter_ns``; several streams are threads (a blocked
send/recv releases the GIL, and with 256 KiB per call the interpreter's share is small).

Modes (``spec["mode"]``), all bounded by ``duration`` seconds AND a maximum count:

``rtt``   one connection, TCP_NODELAY, ``size``-byte request, same-size echo; quantiles of the round trip.
``bulk``  ``streams`` connections each send for ``duration`` s, half-close, and wait for the server's
          byte count (so the time includes draining every proxy buffer).
``rate``  connect, exchange one byte, wait for the server's close, close; sequential.
``idle``  open ``count`` connections (one byte exchanged on each, so every proxy leg exists), print
          ``ready``, wait for a line on stdin, close them all.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any

_COUNT = struct.Struct("!Q")
# Quantiles reported for RTT (enough for a CDF plot, small enough for the JSON).
QUANTILES = [i / 100 for i in range(1, 100)] + [0.995, 0.999]
BULK_CHUNK = 256 * 1024


def _connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, want = 0, len(view)
    while got < want:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError(f"EOF after {got} of {want} bytes")
        got += n


def quantile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank quantile of an already sorted list."""
    idx = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def rtt(spec: dict[str, Any]) -> dict[str, Any]:
    size = int(spec["size"])
    deadline_s = float(spec["duration"])
    max_iters = int(spec.get("max_iters", 2_000_000))
    warmup = int(spec.get("warmup", 200))
    msg = bytes(size)
    reply = memoryview(bytearray(size))
    samples: list[int] = []
    clock = time.perf_counter_ns
    with _connect(spec["host"], spec["port"]) as sock:
        sock.sendall(b"E")
        for _ in range(warmup):
            sock.sendall(msg)
            _recv_exact(sock, reply)
        end = clock() + int(deadline_s * 1e9)
        append = samples.append
        for _ in range(max_iters):
            t0 = clock()
            sock.sendall(msg)
            _recv_exact(sock, reply)
            t1 = clock()
            append(t1 - t0)
            if t1 > end:
                break
    samples.sort()
    return {
        "count": len(samples),
        "p50_us": quantile(samples, 0.5) / 1e3,
        "p99_us": quantile(samples, 0.99) / 1e3,
        "mean_us": sum(samples) / len(samples) / 1e3,
        "quantiles_us": [quantile(samples, q) / 1e3 for q in QUANTILES],
    }


def bulk(spec: dict[str, Any]) -> dict[str, Any]:
    streams = int(spec["streams"])
    duration = float(spec["duration"])
    socks = [_connect(spec["host"], spec["port"]) for _ in range(streams)]
    for s in socks:
        s.sendall(b"S")
    barrier = threading.Barrier(streams)
    results: list[dict[str, Any]] = [{} for _ in range(streams)]

    def run(i: int) -> None:
        sock = socks[i]
        buf = memoryview(bytearray(BULK_CHUNK))
        ack = memoryview(bytearray(_COUNT.size))
        sent = 0
        barrier.wait(timeout=10)
        t0 = time.perf_counter_ns()
        end = t0 + int(duration * 1e9)
        # Bounded by time; the count bound is a safety net far above any loopback rate (1 TB).
        for _ in range(4_000_000):
            sock.sendall(buf)
            sent += BULK_CHUNK
            if time.perf_counter_ns() > end:
                break
        sock.shutdown(socket.SHUT_WR)
        _recv_exact(sock, ack)
        t1 = time.perf_counter_ns()
        (received,) = _COUNT.unpack(ack)
        results[i] = {"sent": sent, "received": received, "t0": t0, "t1": t1}
        sock.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 60)
    if any(not r for r in results):
        raise RuntimeError("a bulk stream did not finish")
    bad = [r for r in results if r["sent"] != r["received"]]
    if bad:
        raise RuntimeError(
            f"bytes lost or duplicated: sent {bad[0]['sent']}, server counted {bad[0]['received']}"
        )
    total = sum(r["sent"] for r in results)
    seconds = (max(r["t1"] for r in results) - min(r["t0"] for r in results)) / 1e9
    return {"bytes": total, "seconds": seconds, "gbit_s": total * 8 / seconds / 1e9}


def rate(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], int(spec["port"])
    duration = float(spec["duration"])
    max_conns = int(spec.get("max_conns", 1_000_000))
    one = memoryview(bytearray(1))
    rest = bytearray(16)
    ok = failed = 0
    t0 = time.perf_counter_ns()
    end = t0 + int(duration * 1e9)
    for _ in range(max_conns):
        try:
            with socket.create_connection((host, port), timeout=5.0) as sock:
                sock.sendall(b"R")
                _recv_exact(sock, one)
                # Wait for the server's FIN so that the server side, not our ephemeral port, holds the
                # TIME_WAIT: many rounds of this would otherwise run out of ports.
                sock.recv_into(rest)
            ok += 1
        except OSError:
            failed += 1
            if failed > 100:
                break
        if time.perf_counter_ns() > end:
            break
    seconds = (time.perf_counter_ns() - t0) / 1e9
    return {"connections": ok, "failed": failed, "seconds": seconds, "conn_s": ok / seconds}


def idle(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, count = spec["host"], int(spec["port"]), int(spec["count"])
    one = memoryview(bytearray(1))
    socks: list[socket.socket] = []
    t0 = time.perf_counter()
    try:
        for _ in range(count):
            sock = _connect(host, port)
            socks.append(sock)
            sock.sendall(b"H")
            _recv_exact(sock, one)
        setup_s = time.perf_counter() - t0
        print("ready", flush=True)
        sys.stdin.readline()  # the orchestrator measures the proxy's RSS meanwhile
    finally:
        for s in socks:
            s.close()
    return {"connections": len(socks), "setup_s": setup_s}


MODES = {"rtt": rtt, "bulk": bulk, "rate": rate, "idle": idle}


def main() -> None:
    spec = json.loads(sys.argv[1])
    before = os.times()
    result = MODES[spec["mode"]](spec)
    after = os.times()
    result["cpu_s"] = (after.user - before.user) + (after.system - before.system)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
