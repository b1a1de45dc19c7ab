"""Operations: helpers shared by the ops tests (restart, metrics, load, hardening), logging, docs.

The end-to-end tests run the real ``sockpolicy`` script in a throwaway network namespace through
``nsenter --net`` (``ip netns exec`` would hide bpffs, see tests/test_cli.py).
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _e2e import SCRIPT, in_ns, sockpolicy
from click.testing import CliRunner

from sockpolicy._cli import cli
from sockpolicy._logging import JsonFormatter, setup_logging

DOCS = Path(__file__).resolve().parent.parent / "docs"


# --- helpers (imported by the other ops tests) ----------------------------------------------------------


def sp(ns: Any, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``sockpolicy ARGS`` inside ``ns`` and wait for it."""
    return sockpolicy(ns, *args, **kw)


def start(
    ns: Any, tmp_path: Path, *args: str, command: str = "serve", name: str = "serve"
) -> subprocess.Popen[str]:
    """Start ``sockpolicy serve ARGS`` (or ``reload``) in ``ns``; stderr goes to ``tmp_path/NAME.log``."""
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed by stop()
    proc = subprocess.Popen(
        [*in_ns(ns), SCRIPT, command, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=log, text=True
    )
    proc.log_path = tmp_path / f"{name}.log"  # type: ignore[attr-defined]
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def log_of(proc: subprocess.Popen[str]) -> str:
    return Path(proc.log_path).read_text()  # type: ignore[attr-defined]


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal ``proc`` and wait; kill it if it does not exit in ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log_file.close()  # type: ignore[attr-defined]
    return proc.returncode


def echo(ns: Any, host: str, port: int, payload: bytes = b"hello", timeout: float = 3) -> bytes:
    """One TCP exchange from inside ``ns``; raises OSError (e.g. ConnectionRefusedError) on failure."""

    def go() -> bytes:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    return ns.call(go)


def wait_serving(ns: Any, proc: subprocess.Popen[str], host: str = "127.0.0.1", port: int = 8000) -> None:
    """Wait until ``proc`` answers an echo on ``host:port`` (fails if it exits first)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            if echo(ns, host, port) == b"hello":
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log_of(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"serve did not come up:\n{log_of(proc)}")
        time.sleep(0.1)


def wait_for(predicate: Callable[[], Any], timeout: float = 10, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def scrape(ns: Any, port: int) -> dict[str, float]:
    """``{'name{labels}': value}`` of the metrics endpoint at 127.0.0.1:PORT inside ``ns``."""
    import urllib.request

    text = ns.call(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


# --- logging ---------------------------------------------------------------------------------------------


def test_json_formatter_one_line_with_extra_fields() -> None:
    record = logging.LogRecord("sockpolicy.conn", logging.INFO, __file__, 1, "a\nb %s", ("c",), None)
    record.conn_id = 7
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["msg"] == "a\nb c" and doc["conn_id"] == 7 and doc["level"] == "info"
    assert doc["logger"] == "sockpolicy.conn" and isinstance(doc["pid"], int) and doc["ts"].endswith("+00:00")


def test_setup_logging_replaces_handlers() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        first, second = io.StringIO(), io.StringIO()
        setup_logging("info", "text", first)
        setup_logging("warning", "json", second)
        logging.getLogger("sockpolicy.test").warning("once")
        assert first.getvalue() == ""
        assert json.loads(second.getvalue())["msg"] == "once"
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


@pytest.mark.privileged
def test_e2e_json_logs_summary_and_periodic_line(netns: Any, tmp_path: Path) -> None:
    proc = start(netns, tmp_path, "--proto", "tcp", "--addr", "127.0.0.1", "--log-format", "json",
                 "--conn-log-interval", "0.5", "--handoff-timeout", "0")  # fmt: skip
    try:
        wait_serving(netns, proc)

        def long_lived() -> bytes:
            with socket.create_connection(("127.0.0.1", 8042), timeout=5) as s:
                s.sendall(b"x" * 1000)
                time.sleep(1.3)
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                return data

        assert netns.call(long_lived) == b"x" * 1000
        wait_for(
            lambda: '"event":"conn_close","reason"' in log_of(proc) and log_of(proc).count("conn_close") >= 2
        )
    finally:
        assert stop(proc) == 0
    docs = [json.loads(line) for line in log_of(proc).splitlines()]  # every line is JSON
    closes = [d for d in docs if d.get("event") == "conn_close" and d["original_dst"] == "127.0.0.1:8042"]
    assert len(closes) == 1
    close = closes[0]
    assert close["bytes_from_client"] == 1000 and close["bytes_to_client"] == 1000, close
    assert close["duration_s"] >= 1.3 and close["proto"] == "tcp" and close["label"] == "default"
    periodic = [d for d in docs if d.get("event") == "conn_open" and d["conn_id"] == close["conn_id"]]
    assert periodic, "no periodic line for a connection open longer than --conn-log-interval"


# --- docs ------------------------------------------------------------------------------------------------


def test_every_serve_option_is_documented() -> None:
    out = CliRunner().invoke(cli, ["serve", "--help"]).stdout
    options = set(re.findall(r"(--[a-z][a-z-]+)", out)) - {"--help"}
    cli_md = (DOCS / "cli.md").read_text()
    missing = [o for o in sorted(options) if f"`{o}" not in cli_md]
    assert not missing, f"docs/cli.md does not document {missing}"
    assert "## reload" in cli_md


def test_operations_doc_covers_the_features() -> None:
    ops = (DOCS / "operations.md").read_text()
    for needle in ["--metrics", "sockpolicy reload", "SIGHUP", "--handoff-timeout", "--user", "--log-format",
                   "handoff-<label>.sock", "SIGKILL", "bench/soak.py"]:  # fmt: skip
        assert needle in ops, needle
    sec = (DOCS / "security.md").read_text()
    for needle in ["Threat model", "not protected", "0700", "--user"]:
        assert needle in sec, needle
