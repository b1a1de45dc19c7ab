"""Soak test: ``sockpolicy serve`` in a throwaway network namespace under a steady connection rate.

Opens ``--rate`` new TCP connections per second for ``--seconds`` seconds (default 200/s for 30 s), each
echoing a payload through the built-in echo service, then reports errors, latency percentiles and the
server's RSS.  Exits 1 on any error, or if RSS grew by more than ``--max-rss-growth-kib`` after the first
second.  Needs root.  Bounded: it stops by itself and deletes its namespace.

    sudo .venv/bin/python bench/soak.py --seconds 30 --rate 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SCRIPT = str(Path(sys.executable).parent / "sockpolicy")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def in_netns(path: str, fn, *args):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a thread that joined the namespace (sockets stay in it)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    out: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            out["value"] = fn(*args)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def load(rate: float, seconds: float, server_pid: int) -> dict[str, object]:
    latencies: list[float] = []
    errors: list[str] = []
    rss: list[tuple[float, int]] = []
    start = next_at = time.monotonic()
    i = 0
    while (now := time.monotonic()) - start < seconds:
        if not rss or now - rss[-1][0] - start >= 1:
            rss.append((now - start, rss_kib(server_pid)))
        payload = b"%d" % i
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", 8000 + i % 1000), timeout=5) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(100):
                    data += chunk
            if data != payload:
                errors.append(f"#{i}: {data!r}")
            latencies.append(time.monotonic() - t0)
        except OSError as exc:
            errors.append(f"#{i}: {exc!r}")
        i += 1
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    rss.append((time.monotonic() - start, rss_kib(server_pid)))
    latencies.sort()
    pct = {f"p{p}": round(latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000, 3)
           for p in (50, 90, 99)} if latencies else {}  # fmt: skip
    return {
        "connections": i,
        "errors": len(errors),
        "first_errors": errors[:5],
        "latency_ms": pct,
        "rss_kib": rss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-rss-growth-kib", type=int, default=4096)
    args = parser.parse_args()
    name = f"sp-soak-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    proc = None
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        nsenter = shutil.which("nsenter") or "nsenter"
        proc = subprocess.Popen([nsenter, f"--net=/run/netns/{name}", SCRIPT, "serve", "--proto", "tcp",
                                 "--addr", "127.0.0.1", "--ports", "8000-8999", "--handoff-timeout", "0",
                                 "--log-level", "warning"], stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                in_netns(
                    f"/run/netns/{name}", lambda: socket.create_connection(("127.0.0.1", 8000), 1).close()
                )
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("serve did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        result = in_netns(f"/run/netns/{name}", load, args.rate, args.seconds, proc.pid)
        assert isinstance(result, dict)
        rss = result["rss_kib"]
        growth = rss[-1][1] - rss[1][1] if len(rss) > 2 else 0  # type: ignore[index]
        result["rss_growth_kib"] = growth
        print(json.dumps(result, indent=2))
        return 1 if result["errors"] or growth > args.max_rss_growth_kib else 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
        subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    sys.exit(main())
