"""Zero-downtime restart (socket handoff), SIGKILL recovery, and SIGHUP policy reload, end to end."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_ops import echo, log_of, sp, start, stop, wait_for, wait_serving

pytestmark = pytest.mark.privileged

ARGS = ("--proto", "tcp", "--addr", "127.0.0.1", "--ports", "8000-8099")


class Load:
    """Opens ``rate`` connections per second to 127.0.0.1:8000-8099 in ``ns``; records every outcome."""

    def __init__(self, ns: Any, rate: float = 100) -> None:
        self.ns, self.rate = ns, rate
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=ns.call, args=(self._run,), daemon=True)

    def _run(self) -> None:
        i = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            port = 8000 + i % 100
            payload = f"{i}".encode()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    data = b""
                    while chunk := s.recv(100):
                        data += chunk
                if data == payload:
                    self.ok += 1
                else:
                    self.errors.append(f"#{i}: got {data!r}")
            except OSError as exc:
                self.errors.append(f"#{i}: {exc!r}")
            i += 1
            next_at += 1 / self.rate
            time.sleep(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _bindings(ns: Any) -> list[str]:
    return sp(ns, "bindings").stdout.splitlines()


@pytest.mark.parametrize("how", ["sigterm-then-serve", "reload"])
def test_restart_refuses_no_connection(netns: Any, tmp_path: Path, how: str) -> None:
    old = start(netns, tmp_path, *ARGS, "--handoff-timeout", "10", name="old")
    new = None
    try:
        wait_serving(netns, old)
        # A connection that is open across the restart: served to the end by the old process.
        held = netns.call(socket.create_connection, ("127.0.0.1", 8077), 5)
        held.sendall(b"before ")
        assert held.recv(100) == b"before "
        with Load(netns, rate=100) as load:
            time.sleep(0.5)
            if how == "sigterm-then-serve":
                old.send_signal(signal.SIGTERM)
                time.sleep(0.3)  # connections arriving now queue in the backlog of the offered sockets
                new = start(netns, tmp_path, *ARGS, name="new")
            else:
                new = start(netns, tmp_path, *ARGS, command="reload", name="new")
            wait_for(lambda: "adopted" in log_of(new), what="the handoff")
            time.sleep(1.0)
            held.sendall(b"after")  # the old process is draining, not dead
            assert held.recv(100) == b"after"
            held.close()
            assert old.wait(timeout=15) == 0, log_of(old)
            time.sleep(0.5)
        assert load.errors == [], load.errors[:5]
        assert load.ok > 150
        assert new.poll() is None, log_of(new)
        assert _bindings(netns) == ["tcp 127.0.0.1/32 ports 8000-8099 label default"]
        assert "handed over to the successor" in log_of(old)
    finally:
        codes = [stop(p) for p in (old, new) if p is not None]
    assert codes[-1] == 0, log_of(new) if new else ""
    # The successor owns the bindings and the dispatcher now: it cleans both up.
    assert sp(netns, "status").stdout == "dispatcher: not loaded\n"


def test_restart_with_workers_changes_the_worker_count(netns: Any, tmp_path: Path) -> None:
    old = start(netns, tmp_path, *ARGS, "--workers", "2", name="old")
    new = None
    try:
        wait_serving(netns, old)
        with Load(netns, rate=100) as load:
            time.sleep(0.5)
            new = start(netns, tmp_path, *ARGS, "--workers", "3", command="reload", name="new")
            wait_for(lambda: "adopted 2 sockets" in log_of(new), what="the handoff")
            assert old.wait(timeout=15) == 0, log_of(old)
            time.sleep(1.0)
        assert load.errors == [], load.errors[:5]
        assert len(sp(netns, "status", "--json").stdout) > 0
    finally:
        codes = [stop(p) for p in (old, new) if p is not None]
    assert codes[-1] == 0
    assert sp(netns, "status").stdout == "dispatcher: not loaded\n"


def test_reload_without_a_running_serve_is_a_user_error(netns: Any) -> None:
    result = sp(netns, "reload", *ARGS)
    assert result.returncode == 2
    assert result.stderr.startswith("sockpolicy: error: no running serve of label 'default' to reload")
    assert sp(netns, "status").stdout == "dispatcher: not loaded\n"


def test_second_serve_without_reload_is_refused(netns: Any, tmp_path: Path) -> None:
    first = start(netns, tmp_path, *ARGS, "--handoff-timeout", "0")
    try:
        wait_serving(netns, first)
        second = sp(netns, "serve", *ARGS)
        assert second.returncode == 2
        assert "already being served by another process (pid" in second.stderr
        assert "sockpolicy reload" in second.stderr
        assert echo(netns, "127.0.0.1", 8001) == b"hello"
    finally:
        assert stop(first) == 0


def test_sigkill_then_serve_reuses_the_dispatcher_and_refuses_meanwhile(netns: Any, tmp_path: Path) -> None:
    first = start(netns, tmp_path, *ARGS, name="first")
    try:
        wait_serving(netns, first)
    finally:
        stop(first, signal.SIGKILL)
    # Pinned state and bindings outlive the process; the label has no socket: refused, not misrouted.
    assert _bindings(netns) == ["tcp 127.0.0.1/32 ports 8000-8099 label default"]
    decoy = netns.socket()  # a normal listener on a steered port must NOT get the traffic
    try:
        decoy.bind(("127.0.0.1", 8050))
        decoy.listen()
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            echo(netns, "127.0.0.1", 8050)
        assert time.monotonic() - started < 1
    finally:
        decoy.close()
    assert json.loads(sp(netns, "status", "--json").stdout)["counters"]["default"]["misses"] >= 1
    second = start(netns, tmp_path, *ARGS, "--handoff-timeout", "0", name="second")
    try:
        wait_serving(netns, second)
        assert "taking over the bindings of serve pid" in log_of(second)
    finally:
        assert stop(second) == 0
    # It took over the dead serve's bindings (state file) and the dispatcher it had loaded.
    assert sp(netns, "status").stdout == "dispatcher: not loaded\n"


def test_sighup_reloads_the_policy_atomically_and_keeps_it_when_invalid(netns: Any, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[[rule]]\nports = "8022"\naction = "drop"\n')
    policy.chmod(0o644)
    proc = start(netns, tmp_path, *ARGS, "--policy", str(policy), "--handoff-timeout", "0")
    try:
        wait_serving(netns, proc)
        assert echo(netns, "127.0.0.1", 8022) == b""  # dropped (reset or empty)
    except ConnectionResetError:
        pass
    try:
        # A connection accepted before the reload keeps the policy it started with.
        held = netns.call(socket.create_connection, ("127.0.0.1", 8033), 5)
        policy.write_text('[[rule]]\nports = "8033"\naction = "drop"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "policy" in log_of(proc) and "reloaded" in log_of(proc), what="the reload")
        held.sendall(b"old")
        assert held.recv(10) == b"old"
        held.close()
        assert echo(netns, "127.0.0.1", 8022) == b"hello"
        with pytest.raises(ConnectionResetError):
            assert echo(netns, "127.0.0.1", 8033) == b""
        # Invalid: the old policy stays, and the log says why.
        policy.write_text("[[rule]]\nports = 8034\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the current policy" in log_of(proc), what="the failed reload")
        assert "'ports' must be a string" in log_of(proc)
        with pytest.raises(ConnectionResetError):
            echo(netns, "127.0.0.1", 8033)
        # A policy file that became group-writable is refused the same way.
        policy.write_text('[[rule]]\nports = "8044"\naction = "drop"\n')
        policy.chmod(0o664)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "writable by group/others" in log_of(proc), what="the refused reload")
        assert echo(netns, "127.0.0.1", 8044) == b"hello"
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
