"""sockpolicy's test harness: privilege gating, an fd-leak check, and network-namespace fixtures.

This module is both a small library (``NetNS``, ``VethPair``, ``privilege_problem`` ...) and a pytest
plugin (the ``pytest_*`` hooks and fixtures below). ``tests/conftest.py`` registers it as a plugin; a
pytest run outside this tree can load it with ``-p _harness`` and ``tests/`` on ``PYTHONPATH``.

Environment variables (see docs/testing.md):

``SOCKPOLICY_REQUIRE_PRIVILEGED=1``
    A ``privileged`` test that cannot run, or that skips for any other reason, FAILS instead of
    skipping. CI sets it.
``SOCKPOLICY_FAKE_UNPRIVILEGED=1``
    Only for testing the harness itself: the privilege check reports "not privileged".
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

REQUIRE_PRIVILEGED_ENV = "SOCKPOLICY_REQUIRE_PRIVILEGED"
FAKE_UNPRIVILEGED_ENV = "SOCKPOLICY_FAKE_UNPRIVILEGED"
NETNS_PREFIX = "sp-"
NETNS_DIR = Path("/run/netns")

# Address plan: only ever configured inside namespaces the harness creates.
IPV4_NET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking range
IPV6_NET = ipaddress.IPv6Network("fd00:5eed::/64")  # ULA

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39
_REQUIRED_CAPS = {CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_BPF: "CAP_BPF"}

CLONE_NEWNET = 0x40000000


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def require_privileged() -> bool:
    """True when ``SOCKPOLICY_REQUIRE_PRIVILEGED`` asks privileged tests to fail rather than skip."""
    return _env_flag(REQUIRE_PRIVILEGED_ENV)


# --------------------------------------------------------------------------------------------------
# privilege check
# --------------------------------------------------------------------------------------------------


def effective_caps() -> int:
    """The CapEff bit mask of this process (0 when /proc/self/status cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def privilege_problem() -> str | None:
    """Why privileged tests cannot run here, or None when they can.

    Needs euid 0 and the effective capabilities CAP_SYS_ADMIN (setns, bpffs), CAP_NET_ADMIN
    (links, addresses) and CAP_BPF (loading programs).
    """
    if _env_flag(FAKE_UNPRIVILEGED_ENV):
        return f"{FAKE_UNPRIVILEGED_ENV}=1 simulates an unprivileged run"
    problems = []
    if os.geteuid() != 0:
        problems.append(f"not root (euid {os.geteuid()})")
    caps = effective_caps()
    missing = [name for bit, name in _REQUIRED_CAPS.items() if not caps >> bit & 1]
    if missing:
        problems.append("missing effective capabilities " + ", ".join(missing))
    return "; ".join(problems) or None


# --------------------------------------------------------------------------------------------------
# fd-leak check
# --------------------------------------------------------------------------------------------------


def open_fds() -> dict[int, str]:
    """Open fds of this process mapped to their readlink target.

    The directory fd used for the listing itself is gone by the time its link is read, so it drops out.
    """
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def leaked_fds(before: dict[int, str], after: dict[int, str]) -> dict[int, str]:
    """fds open in ``after`` that were not open (with the same target) in ``before``."""
    return {fd: target for fd, target in after.items() if before.get(fd) != target}


def format_leak(before: dict[int, str], after: dict[int, str]) -> str | None:
    """A failure message when ``after`` holds more fds than ``before``, else None."""
    if len(after) <= len(before):
        return None
    new = leaked_fds(before, after)
    lines = [f"fd leak: {len(before)} fds open before the test, {len(after)} after; new fds:"]
    lines += [f"  fd {fd} -> {target}" for fd, target in sorted(new.items())]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------


class CommandFailed(subprocess.CalledProcessError):
    """A CalledProcessError whose message includes the command's stderr and stdout."""

    def __str__(self) -> str:
        text = f"command {' '.join(map(str, self.cmd))!r} exited {self.returncode}"
        for label, out in (("stderr", self.stderr), ("stdout", self.output)):
            if out:
                out = out.decode(errors="replace") if isinstance(out, bytes) else out
                text += f"\n{label}: {out.strip()}"
        return text


def run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
    """subprocess.run with the harness's defaults: check=True, text=True, output captured.

    Any of these can be overridden; a failing checked command raises CommandFailed (stderr in the message).
    """
    check = kw.pop("check", True)
    kw.setdefault("text", True)
    if "stdout" not in kw and "stderr" not in kw:
        kw.setdefault("capture_output", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    result = subprocess.run(list(argv), check=False, **kw)
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, result.args, result.stdout, result.stderr)
    return result


# --------------------------------------------------------------------------------------------------
# network namespaces
# --------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """setns(2) for the CALLING THREAD only (Python 3.11 has no os.setns)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_netns_thread(ns_path: str | os.PathLike, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a new thread that has joined the network namespace at ``ns_path``.

    The calling thread never changes namespace. Sockets created by ``fn`` belong to the namespace for
    their whole life, whichever thread later uses them. Returns fn's result or re-raises its exception.
    """
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=f"netns:{os.fspath(ns_path)}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        error = outcome.pop("error")
        try:
            raise error
        finally:
            del error
    return outcome["value"]


# Namespaces created by this process, for the end-of-session sweep.
_created: set[str] = set()
_created_lock = threading.Lock()


def new_netns_name() -> str:
    return f"{NETNS_PREFIX}{os.getpid() % 100000}-{secrets.token_hex(3)}"


class NetNS:
    """A named network namespace (``ip netns add``) with ``lo`` up. Use :meth:`create`, then :meth:`close`
    (or a ``with`` block); the ``netns`` fixture does both."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = str(NETNS_DIR / name)
        self._fd: int | None = None
        self._procs: list[subprocess.Popen] = []
        self.closed = False

    # -- lifecycle --
    @classmethod
    def create(cls, name: str | None = None) -> NetNS:
        ns = cls(name or new_netns_name())
        run(["ip", "netns", "add", ns.name])
        with _created_lock:
            _created.add(ns.name)
        try:
            ns.ip("link", "set", "lo", "up")
        except BaseException:
            ns.close()
            raise
        return ns

    def close(self) -> None:
        """Kill processes started with :meth:`popen`, close the held fd, delete the namespace."""
        if self.closed:
            return
        self.closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
        self._procs.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        delete_netns(self.name)

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"

    def exists(self) -> bool:
        return os.path.exists(self.path)

    # -- fds --
    def fd(self) -> int:
        """An fd for the namespace, owned by this object (closed by :meth:`close`); do not close it."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def open_fd(self) -> int:
        """A new fd for the namespace that the caller owns and must close."""
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    # -- running things inside --
    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a fresh thread inside the namespace; return or raise its outcome."""
        return run_in_netns_thread(self.path, fn, *args, **kwargs)

    async def acall(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Async :meth:`call` for trio tests: the trio thread and trio's cached worker threads never move;
        a worker thread waits for the dedicated namespace thread."""
        import trio

        return await trio.to_thread.run_sync(functools.partial(self.call, fn, *args, **kwargs))

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A ``socket.socket`` created inside the namespace (usable from any thread afterwards)."""
        return self.call(socket.socket, family, type, proto)

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """``ip netns exec NAME argv...`` with :func:`run`'s defaults (check, text, captured output)."""
        return run(["ip", "netns", "exec", self.name, *argv], **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """``subprocess.Popen`` of ``ip netns exec NAME argv...``; killed when the namespace is closed."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)
        self._procs.append(proc)
        return proc

    def ip(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        """``ip -n NAME args...`` (checked, text output)."""
        return run(["ip", "-n", self.name, *args], **kw)

    def ip_json(self, *args: str) -> Any:
        """``ip -j -n NAME args...`` parsed as JSON."""
        out = run(["ip", "-j", "-n", self.name, *args]).stdout
        return json.loads(out) if out.strip() else []

    def links(self) -> list[dict]:
        """The namespace's links as ``ip -j link show`` reports them."""
        return self.ip_json("link", "show")

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        """Read (or set, then read) a sysctl inside the namespace, e.g. ``net.ipv4.ip_forward``."""
        if value is not None:
            self.run(["sysctl", "-qw", f"{key}={value}"])
        return self.run(["sysctl", "-n", key]).stdout.strip()


def delete_netns(name: str) -> None:
    """``ip netns del NAME``; no error when it is already gone."""
    if os.path.exists(NETNS_DIR / name):
        result = run(["ip", "netns", "del", name], check=False)
        if result.returncode != 0 and os.path.exists(NETNS_DIR / name):
            raise CommandFailed(result.returncode, result.args, result.stdout, result.stderr)
    with _created_lock:
        _created.discard(name)


def sweep_created_netns() -> list[str]:
    """Delete every namespace this process created that still exists; return their names."""
    with _created_lock:
        leftovers = sorted(_created)
    removed = []
    for name in leftovers:
        with contextlib.suppress(Exception):
            if os.path.exists(NETNS_DIR / name):
                removed.append(name)
            delete_netns(name)
    return removed


# --------------------------------------------------------------------------------------------------
# veth pairs
# --------------------------------------------------------------------------------------------------


@dataclass
class VethEnd:
    """One end of a veth pair: its namespace, interface name and addresses (without prefix length)."""

    ns: NetNS
    ifname: str
    ip4: str
    ip6: str

    def ifindex(self) -> int:
        return self.ns.ip_json("link", "show", "dev", self.ifname)[0]["ifindex"]


@dataclass
class VethPair:
    """Two namespaces joined by a veth pair: ends ``a`` and ``b``, namespaces ``a.ns`` and ``b.ns``."""

    a: VethEnd
    b: VethEnd
    mtu: int
    prefixlen4: int = 24
    prefixlen6: int = 64
    _owned: list[NetNS] = field(default_factory=list, repr=False)

    def close(self) -> None:
        # Deleting the namespaces deletes the veth devices with them.
        errors = []
        for ns in self._owned:
            try:
                ns.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> VethPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _disable_dad() -> None:
    # Runs in a thread inside the namespace: /proc/sys/net is the opener's network namespace.
    for conf in ("default", "all"):
        Path(f"/proc/sys/net/ipv6/conf/{conf}/accept_dad").write_text("0")


def _link_ready(ns: NetNS, ifname: str) -> bool:
    link = ns.ip_json("addr", "show", "dev", ifname)[0]
    if link.get("operstate") != "UP":
        return False
    return not any(a.get("tentative") for a in link.get("addr_info", []))


def create_veth_pair(
    index: int = 0, mtu: int = 1500, a: NetNS | None = None, b: NetNS | None = None
) -> VethPair:
    """Create two namespaces (or use ``a``/``b``) joined by a veth pair, both ends up with ``mtu``.

    Pair ``index`` gets 198.18.<index>.1/24 and .2/24, fd00:5eed::<index*256+1>/64 and +2 (``nodad``), so
    several pairs in one test have distinct addresses. Returns once both ends are UP with usable addresses.
    """
    if not 0 <= index < 256:
        raise ValueError("veth pair index must be in 0..255")
    owned = []
    try:
        if a is None:
            a = NetNS.create()
            owned.append(a)
        if b is None:
            b = NetNS.create()
            owned.append(b)
        base4 = int(IPV4_NET.network_address) + index * 256
        base6 = int(IPV6_NET.network_address) + index * 256
        v4 = [str(ipaddress.IPv4Address(base4 + host)) for host in (1, 2)]
        v6 = [str(ipaddress.IPv6Address(base6 + host)) for host in (1, 2)]
        end_a = VethEnd(a, f"veth{index}a", v4[0], v6[0])
        end_b = VethEnd(b, f"veth{index}b", v4[1], v6[1])
        for ns in (a, b):
            # No DAD on new devices: link-local addresses would stay tentative for ~2 s otherwise.
            ns.call(_disable_dad)
        a.ip("link", "add", end_a.ifname, "mtu", str(mtu), "type", "veth",
             "peer", "name", end_b.ifname, "mtu", str(mtu), "netns", b.name)  # fmt: skip
        for end in (end_a, end_b):
            end.ns.ip("addr", "add", f"{end.ip4}/24", "dev", end.ifname)
            end.ns.ip("-6", "addr", "add", f"{end.ip6}/64", "dev", end.ifname, "nodad")
            end.ns.ip("link", "set", end.ifname, "up")
        for end in (end_a, end_b):
            _wait_until(lambda end=end: _link_ready(end.ns, end.ifname), 10, f"{end.ifname} in {end.ns.name}")
        return VethPair(end_a, end_b, mtu, _owned=owned)
    except BaseException:
        for ns in owned:
            with contextlib.suppress(Exception):
                ns.close()
        raise


# --------------------------------------------------------------------------------------------------
# pytest plugin: markers, privilege gating, fd-leak check, fixtures
# --------------------------------------------------------------------------------------------------

_NETNS_FIXTURES = frozenset({"netns", "make_netns", "veth_pair", "make_veth_pair"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "privileged: needs root, CAP_BPF and CAP_NET_ADMIN; fails instead of skipping under "
        "SOCKPOLICY_REQUIRE_PRIVILEGED=1",
    )
    config.addinivalue_line("markers", "no_fd_check: exempt a privileged test from the fd-leak check")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that uses a namespace fixture is privileged whether or not it says so.
    for item in items:
        if _NETNS_FIXTURES.intersection(getattr(item, "fixturenames", ())) and not item.get_closest_marker(
            "privileged"
        ):
            item.add_marker(pytest.mark.privileged)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is None:
        return
    problem = privilege_problem()
    if problem is None:
        return
    if require_privileged():
        pytest.fail(
            f"privileged test cannot run: {problem}, and {REQUIRE_PRIVILEGED_ENV}=1 forbids skipping it",
            pytrace=False,
        )
    pytest.skip(f"privileged test: {problem}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("privileged") is not None
        and require_privileged()
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"privileged test skipped under {REQUIRE_PRIVILEGED_ENV}=1, which makes any skip a failure: "
            f"{reason}"
        )
    return report


@pytest.fixture(autouse=True)
def _sockpolicy_fd_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a privileged test that leaves more fds open than it found.

    Function-scoped and autouse, so it is set up before, and torn down after, the test's other
    function-scoped fixtures (and the whole trio run of an async test, whose epoll/wakeup fds are
    therefore both created and closed inside the window); wider-scoped fixtures are set up before it.
    """
    node = request.node
    if node.get_closest_marker("privileged") is None or node.get_closest_marker("no_fd_check") is not None:
        yield
        return
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    message = format_leak(before, open_fds())
    if message is not None:
        pytest.fail(message, pytrace=False)


@pytest.fixture
def make_netns() -> Iterator[Callable[[], NetNS]]:
    """Factory: ``make_netns()`` returns a fresh :class:`NetNS`; all are deleted after the test."""
    made: list[NetNS] = []

    def factory() -> NetNS:
        ns = NetNS.create()
        made.append(ns)
        return ns

    yield factory
    _close_all(made)


@pytest.fixture
def netns(make_netns: Callable[[], NetNS]) -> NetNS:
    """A fresh network namespace ``sp-*`` with only ``lo``, up; deleted after the test (even on failure)."""
    return make_netns()


@pytest.fixture
def make_veth_pair() -> Iterator[Callable[..., VethPair]]:
    """Factory: ``make_veth_pair(mtu=1500)`` returns a :class:`VethPair` in two fresh namespaces.

    The n-th pair of a test uses 198.18.n.1/.2 and fd00:5eed::(n*256+1)/(n*256+2). All are deleted after
    the test.
    """
    made: list[VethPair] = []

    def factory(mtu: int = 1500) -> VethPair:
        pair = create_veth_pair(index=len(made), mtu=mtu)
        made.append(pair)
        return pair

    yield factory
    _close_all(made)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A fresh directory on bpffs for a test's pins, removed with everything pinned in it afterwards."""
    path = Path("/sys/fs/bpf") / f"{NETNS_PREFIX}test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        for entry in path.iterdir():
            entry.unlink()
        path.rmdir()


@pytest.fixture
def veth_pair(make_veth_pair: Callable[..., VethPair]) -> VethPair:
    """A default :class:`VethPair`: MTU 1500, 198.18.0.1/24 <-> 198.18.0.2/24, fd00:5eed::1 <-> ::2 /64."""
    return make_veth_pair()


def _close_all(objects: Sequence[NetNS | VethPair]) -> None:
    errors = []
    for obj in reversed(objects):
        try:
            obj.close()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    removed = sweep_created_netns()
    if removed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"sockpolicy harness: removed leftover namespaces {', '.join(removed)}")
