"""sockpolicy benchmarks, end to end: ``bench/run.py [--quick | --smoke]`` (``make bench``: full mode).

What happens:

1. A network namespace ``sp-bench-<rand>`` (lo up) and a bpffs root ``/sys/fs/bpf/sp-bench-<rand>`` are
   created; this process enters the namespace (``setns``), so everything it starts runs there and only
   that namespace's loopback carries traffic.  Both are removed at the end, on failure too (try/finally,
   atexit, SIGTERM/SIGHUP turned into SystemExit).
2. Phase A starts the upstream server (``server.py``) and the candidates -- HAProxy (tcp mode), the trio
   copy loop (``copyproxy.py``), the sockpolicy userspace and spliced paths (``spproxy.py``), the latter
   only if a functional probe shows that ``Pass(splice=True)`` really splices -- and measures RTT, bulk
   throughput, connection rate, CPU per GB and idle RSS, candidates interleaved in every round.  A
   second spliced proxy, ``sp-spliced-kernel``, has throttle bounds so large that it never hands a
   connection back to userspace; it runs in the bulk measurements only, to show what the kernel redirect
   alone moves (the bound of spliced bulk throughput), with the largest ``MemAvailable`` drop meanwhile.
3. Phase B measures the dispatcher alone: install time/memory of ``--ports 1-65535`` for N prefixes and
   the SK_LOOKUP program's run time per lookup (kernel BPF run-time statistics) with many bindings.
4. Optionally (full mode) a profile of the sockpolicy userspace path: syscalls per request (perf
   tracepoints) and the hottest Python functions (py-spy).
5. The raw results go to ``bench/out/results-<timestamp>.json`` (and ``bench/out/latest.json``); then
   ``report.py`` regenerates ``docs/benchmarks.md`` and ``docs/img/bench-*.png`` from that JSON.

CPU placement (``--cpus``, see :func:`cpu_plan`): by default client, server and proxy all run on CPU 0,
and the ``*_xcpu`` measurements repeat RTT and bulk with the proxy moved to CPU 1.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import itertools
import json
import logging
import os
import platform
import resource
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
PY = sys.executable
HOST = "127.0.0.1"
CLONE_NEWNET = 0x40000000
BPFFS = Path("/sys/fs/bpf")
CGROUP_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))

# Port plan inside the namespace.  Everything sits below the ephemeral range (32768-60999) so that no
# client or proxy source port collides with a listener, and the steered ranges are distinct from every
# port something is bound to.
SERVER_PORT = 10000
HAPROXY_PORT = 11000
COPY_PORT = 12000
SP_USER_BIND = 13000  # where the sockpolicy listeners are bound; clients dial the steered ranges below
SP_SPLICE_BIND = 14000
SP_KERNEL_BIND = 15000
STEER_DIRECT = (20000, 20999)  # steered straight to the server's listener
STEER_USER = (21000, 21999)
STEER_SPLICE = (22000, 22999)
STEER_LOOKUP = (23000, 23999)  # phase B
STEER_KERNEL = (24000, 24999)

# sp-spliced-kernel: the spliced proxy with throttle bounds so large that no connection in a measurement
# (a few GB at most) is ever handed back to userspace, so its bulk numbers are the kernel redirect alone.
# Not a production setting: without a throttle the kernel backlog is unbounded (docs/splice.md).
KERNEL_BACKLOG_HIGH = 1 << 30
KERNEL_BACKLOG_LOW = 512 << 20

log = logging.getLogger("bench")


# --------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Settings:
    mode: str
    rounds: int
    rtt_duration: float
    bulk_duration: float
    rate_duration: float
    idle_conns: int
    idle_rounds: int
    install_prefixes: tuple[int, ...]
    install_rounds: int
    lookup_bindings: tuple[int, int]  # (prefixes, ports per prefix): prefixes*ports bindings
    lookup_duration: float
    lookup_rounds: int
    profile_duration: float  # 0: no profile phase
    rtt_sizes: tuple[int, ...] = (64, 16384)
    bulk_streams: tuple[int, ...] = (1, 4)
    #: ``--only``: measurement keys to run (``rtt_64``, ``bulk_1``, ``rate``, ``idle``, ``dispatcher``, ...);
    #: empty: everything.  ``--candidates``: candidate names to measure; empty: all.
    only: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()

    def wants(self, key: str) -> bool:
        return not self.only or key in self.only

    def measures(self, name: str) -> bool:
        return not self.candidates or name in self.candidates

    @property
    def lookup_total(self) -> int:
        return self.lookup_bindings[0] * self.lookup_bindings[1]


PRESETS = {
    # ~12 minutes on the 2-core reference machine.
    "full": Settings("full", 5, 2.0, 2.0, 2.0, 9000, 3, (1, 100, 1000), 5, (1000, 100), 3.0, 3, 4.0),
    # a few seconds per measurement: for development
    "quick": Settings("quick", 2, 1.0, 1.0, 1.0, 2000, 1, (1, 100, 1000), 2, (1000, 100), 1.0, 1, 0.0),
    # the smoke test: every code path once, tiny sizes
    "smoke": Settings("smoke", 1, 0.1, 0.1, 0.1, 20, 1, (1, 10), 1, (10, 10), 0.1, 1, 0.0),
}


# --------------------------------------------------------------------------------------------------
# small helpers


def _pin(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None

    def preexec() -> None:
        os.sched_setaffinity(0, {cpu})

    return preexec


def cpu_plan(layout: str = "shared") -> dict[str, int | None]:
    """Where each role runs; ``other`` is the CPU the ``*_xcpu`` measurements move the proxy to.

    ``shared`` (default): client, server and proxy all on CPU 0.  On this VM a wakeup across CPUs costs
    tens of microseconds (an IPI through the hypervisor) and a proxied round trip has four of them, so
    splitting would mostly measure the hypervisor; the ``*_xcpu`` rows show that effect.
    ``split``: the proxy alone on CPU 1.  ``none``: no pinning (also what happens on a 1-CPU machine).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if layout == "none" or len(cpus) < 2:
        return {"client": None, "server": None, "proxy": None, "other": None}
    if layout == "shared":
        return {"client": cpus[0], "server": cpus[0], "proxy": cpus[0], "other": cpus[1]}
    return {"client": cpus[0], "server": cpus[0], "proxy": cpus[1], "other": cpus[1]}


def set_affinity(pid: int, cpu: int | None) -> None:
    """Move every thread of ``pid`` (a process we started) to ``cpu``."""
    if cpu is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_user_sys_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class MemWatch:
    """Samples ``MemAvailable`` every 20 ms in a thread while the block runs; ``drop_kib`` is the largest
    fall below the value at entry.  Machine-wide, so anything else allocating counts too; the redirect
    backlog is charged to no socket (docs/splice.md), so this is the cheap place it shows."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.drop_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.drop_kib = max(self.drop_kib, self._start - mem_available_kib())

    def __enter__(self) -> MemWatch:
        self._start = mem_available_kib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.drop_kib = max(self.drop_kib, self._start - mem_available_kib())


def system_busy_s() -> float:
    """CPU seconds spent not idle, summed over all CPUs (includes softirq work no process is charged)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_line(proc: subprocess.Popen, expect: str, timeout: float) -> None:
    """Wait for a line ``expect`` on the process's stdout, bounded by ``timeout``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args[:3]} exited (status {proc.wait(5)}) before printing {expect!r}")
        if line.strip() == expect:
            return
    raise TimeoutError(f"{proc.args[:3]} did not print {expect!r} within {timeout}s")


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(4096)
    return sock


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dirty_sources() -> list[str]:
    """sockpolicy/ files that differ from the commit: the run measures the working tree."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "sockpolicy"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.splitlines() if line[3:].endswith((".py", ".c", ".h"))]


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    try:
        haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, timeout=10).stdout
        haproxy = haproxy.splitlines()[0].split(" - ")[0] if haproxy else "not installed"
    except OSError:
        haproxy = "not installed"
    import trio

    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "haproxy": haproxy,
        "loadavg_start": os.getloadavg(),
        "commit": git_commit(),
        "dirty": dirty_sources(),
    }


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


# --------------------------------------------------------------------------------------------------
# the namespace and everything started in it


class Env:
    """The benchmark's namespace, bpffs root and child processes; :meth:`cleanup` removes them all."""

    def __init__(self, layout: str = "shared") -> None:
        tag = secrets.token_hex(3)
        self.netns = f"sp-bench-{tag}"
        self.bpffs_root = BPFFS / f"sp-bench-{tag}"
        self.procs: list[subprocess.Popen] = []
        self.dispatchers: list[Any] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="sp-bench-"))
        self.cpus = cpu_plan(layout)
        self._cleaned = False

    def enter(self) -> None:
        atexit.register(self.cleanup)
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True, timeout=30)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True, timeout=30)
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.netns}): {os.strerror(err)}")
        finally:
            os.close(fd)
        # Our own bpffs root, so nothing we pin mixes with /sys/fs/bpf/sockpolicy of real users.
        self.bpffs_root.mkdir(mode=0o700)
        # /proc/sys/net now shows this namespace.  Thousands of short connections per second: let
        # outgoing connections reuse TIME_WAIT ports (loopback only anyway).
        Path("/proc/sys/net/ipv4/tcp_tw_reuse").write_text("1")
        Path("/proc/sys/net/core/somaxconn").write_text("8192")
        # 9000 idle connections mean ~27000 fds in this namespace's processes.
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(hard, 65536)  # needs CAP_SYS_RESOURCE; without it the hard limit stays
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))

    def spawn(
        self, argv: list[str], role: str, *, pass_fds: tuple[int, ...] = (), **kw: Any
    ) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(
            argv, pass_fds=pass_fds, preexec_fn=_pin(self.cpus[role]), text=True, cwd=REPO, **kw
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """Stop one child we started (by its own pid), then reap it."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        # A spliced proxy killed before its Splicer closed leaves its (now empty) cgroup behind.
        for cg in CGROUP_ROOTS:
            with contextlib.suppress(OSError):
                (cg / f"sockpolicy-splice-{proc.pid}").rmdir()

    def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        for d in self.dispatchers:
            with contextlib.suppress(Exception):
                if not d.closed:
                    d.unload()
        if self.bpffs_root.exists():
            # Pins hold no data of their own; removing them drops the last references.
            shutil.rmtree(self.bpffs_root, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def open_dispatcher(self, sub: str) -> Any:
        from sockpolicy import Dispatcher

        d = Dispatcher.open(bpffs_root=self.bpffs_root / sub)
        self.dispatchers.append(d)
        return d


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------------------------------
# the spliced path: is it there yet?


PROBE_ROUNDS = 8
PROBE_SIZE = 65536


def probe_splice(proc: subprocess.Popen, port: int) -> dict[str, Any]:
    """Check that ``Pass(splice=True)`` really hands connections to the kernel, through the running
    spliced candidate: after a short pause (the splice is set up after on_connect) echo 8 x 64 KiB through
    it, then ask the process for its counters (SIGUSR1 -> one JSON line).

    Unavailable when bytes come back wrong, no connection was spliced, or most of the payload was still
    relayed by Python; the reason quotes what the proxy logged about splicing.
    """
    where = "sockpolicy/proxy/_splice.py"
    history = subprocess.run(
        ["git", "-C", str(REPO), "log", "--oneline", "-1", "--", where],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    file_note = f"{where}: " + (f"last commit {history}" if history else "no commit yet")
    payload = os.urandom(PROBE_SIZE)
    echoed_ok = True
    try:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"E")
            time.sleep(0.05)
            reply = memoryview(bytearray(PROBE_SIZE))
            for _ in range(PROBE_ROUNDS):
                sock.sendall(payload)
                got = 0
                while got < PROBE_SIZE:
                    n = sock.recv_into(reply[got:])
                    if not n:
                        raise ConnectionError(f"EOF after {got} bytes")
                    got += n
                echoed_ok = echoed_ok and bytes(reply) == payload
            time.sleep(0.1)
            proc.send_signal(signal.SIGUSR1)
            line = _read_line(proc, 10)
    except (OSError, TimeoutError, RuntimeError) as exc:
        return {"available": False, "reason": f"probe failed: {type(exc).__name__}: {exc}; {file_note}"}
    stats = json.loads(line)
    notes = "; ".join(dict.fromkeys(stats.get("notes", [])))
    spliced = stats.get("splice", {}).get("spliced", 0)
    total = PROBE_ROUNDS * PROBE_SIZE
    if not echoed_ok:
        reason = "Pass(splice=True) corrupted bytes in the probe"
    elif not spliced:
        reason = "no probe connection was spliced" + (f" (the proxy logs: {notes})" if notes else "")
    elif stats["bytes_from_client"] > total // 2:
        reason = f"{stats['bytes_from_client']} of {total} probe bytes were relayed in userspace"
    else:
        return {"available": True, "reason": "", "probe": stats, "file": file_note}
    return {"available": False, "reason": f"{reason}; {file_note}", "probe": stats}


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no answer from {proc.args[:3]} within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.args[:3]} exited")
    return line


# --------------------------------------------------------------------------------------------------
# phase A: data path


@dataclass
class Candidate:
    name: str
    port: int  # what the client dials
    proc: subprocess.Popen | None = None  # the proxy (None: no proxy in the path)
    available: bool = True
    reason: str = ""


@dataclass
class PhaseA:
    env: Env
    settings: Settings
    server: subprocess.Popen | None = None
    candidates: dict[str, Candidate] = field(default_factory=dict)
    sockets: list[socket.socket] = field(default_factory=list)

    def start(self) -> dict[str, Any]:
        env = self.env
        server_sock = listener(SERVER_PORT)
        self.sockets.append(server_sock)
        self.server = env.spawn(
            [PY, str(BENCH / "server.py"), "--fd", str(server_sock.fileno())],
            "server",
            pass_fds=(server_sock.fileno(),),
        )
        wait_line(self.server, "ready", 20)

        from sockpolicy import Binding

        dispatcher = env.open_dispatcher("main")
        bindings = {
            "server": STEER_DIRECT,
            "userspace": STEER_USER,
            "spliced": STEER_SPLICE,
            "spliced-kernel": STEER_KERNEL,
        }
        dispatcher.add_bindings(Binding("tcp", f"{HOST}/32", rng, label) for label, rng in bindings.items())
        dispatcher.register_socket("server", server_sock)

        self.candidates["direct"] = Candidate("direct", SERVER_PORT)
        self.candidates["direct-steered"] = Candidate("direct-steered", STEER_DIRECT[0])

        # HAProxy: one thread on the proxy CPU, tcp mode, no logging, generous timeouts.
        cfg = env.tmp / "haproxy.cfg"
        cfg.write_text(
            "global\n  nbthread 1\n  maxconn 9500\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10m\n  timeout server 10m\n"
            f"frontend fe\n  bind {HOST}:{HAPROXY_PORT}\n  default_backend be\n"
            f"backend be\n  server s1 {HOST}:{SERVER_PORT}\n"
        )
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            self.candidates["haproxy"] = Candidate(
                "haproxy", HAPROXY_PORT, available=False, reason="haproxy is not installed (bench/setup.sh)"
            )
        else:
            proc = env.spawn([haproxy, "-db", "-f", str(cfg)], "proxy", stdout=subprocess.DEVNULL)
            wait_port(HAPROXY_PORT, 10)
            self.candidates["haproxy"] = Candidate("haproxy", HAPROXY_PORT, proc)

        copy_sock = listener(COPY_PORT)
        self.sockets.append(copy_sock)
        proc = env.spawn(
            [
                PY,
                str(BENCH / "copyproxy.py"),
                "--fd",
                str(copy_sock.fileno()),
                "--upstream",
                f"{HOST}:{SERVER_PORT}",
            ],
            "proxy",
            pass_fds=(copy_sock.fileno(),),
        )
        wait_line(proc, "ready", 20)
        self.candidates["trio-copy"] = Candidate("trio-copy", COPY_PORT, proc)

        splice: dict[str, Any] = {}
        unbounded = ["--backlog-high", str(KERNEL_BACKLOG_HIGH), "--backlog-low", str(KERNEL_BACKLOG_LOW)]
        for label, mode, bind_port, steer, extra in (
            ("userspace", "userspace", SP_USER_BIND, STEER_USER, []),
            ("spliced", "spliced", SP_SPLICE_BIND, STEER_SPLICE, []),
            ("spliced-kernel", "spliced", SP_KERNEL_BIND, STEER_KERNEL, unbounded),
        ):
            name = f"sp-{label}"
            if label == "spliced-kernel" and not (
                self.settings.measures(name)
                and any(self.settings.wants(f"bulk_{n}") for n in self.settings.bulk_streams)
            ):
                # bulk-only: not worth a process (and a probe) when no bulk measurement runs
                self.candidates[name] = Candidate(
                    name,
                    steer[0],
                    available=False,
                    reason="not selected (bulk-only; no bulk measurement in this run)",
                )
                continue
            # The proxy makes and registers its own listener: with splicing, only sockets created
            # after the Splicer moved the process into its cgroup are enrolled.
            argv = [PY, str(BENCH / "spproxy.py"), "--mode", mode, "--bind", str(bind_port)]
            argv += ["--bpffs-root", str(dispatcher.path.parent), "--label", label]
            argv += ["--upstream", f"{HOST}:{SERVER_PORT}", *extra]
            proc = env.spawn(argv, "proxy")
            wait_line(proc, "ready", 30)
            self.candidates[name] = Candidate(name, steer[0], proc)
            if mode == "spliced":
                probe = probe_splice(proc, steer[0])
                if label == "spliced":
                    splice = probe
                if not probe["available"]:
                    env.stop(proc)
                    self.candidates[name] = Candidate(name, steer[0], available=False, reason=probe["reason"])
        # Every candidate must answer before anything is measured.
        for cand in self.candidates.values():
            if cand.available:
                run_client(
                    self.env,
                    {
                        "mode": "rtt",
                        "host": HOST,
                        "port": cand.port,
                        "size": 64,
                        "duration": 0.01,
                        "warmup": 5,
                    },
                )
        out: dict[str, Any] = {
            name: {"available": c.available, "reason": c.reason, "port": c.port}
            for name, c in self.candidates.items()
        }
        out["sp-spliced-kernel"] |= {"backlog_high": KERNEL_BACKLOG_HIGH, "backlog_low": KERNEL_BACKLOG_LOW}
        return out | {"_splice_probe": splice}

    def stop(self) -> None:
        for cand in self.candidates.values():
            if cand.proc is not None:
                self.env.stop(cand.proc)
        if self.server is not None:
            self.env.stop(self.server)
        for s in self.sockets:
            s.close()

    # -- measurements --------------------------------------------------------------------------------

    def measurements(self) -> list[tuple[str, list[str], Callable[[Candidate], dict[str, Any]]]]:
        s = self.settings
        data_path = ["direct", "haproxy", "trio-copy", "sp-userspace", "sp-spliced"]
        out: list[tuple[str, list[str], Callable[[Candidate], dict[str, Any]]]] = []
        for size in s.rtt_sizes:
            out.append((f"rtt_{size}", data_path, functools.partial(self.rtt, size=size)))
        # sp-spliced-kernel only here: it exists to show what the kernel redirect alone moves in bulk.
        bulk_path = [*data_path, "sp-spliced-kernel"]
        for streams in s.bulk_streams:
            out.append((f"bulk_{streams}", bulk_path, functools.partial(self.bulk, streams=streams)))
        rate_path = ["direct", "direct-steered", "haproxy", "trio-copy", "sp-userspace", "sp-spliced"]
        out.append(("rate", rate_path, self.rate))
        # The same RTT and bulk loads with the proxy (for "direct": the server) moved to the other CPU: on a
        # VM every cross-CPU wakeup is an IPI through the hypervisor, which the report shows separately.
        size = s.rtt_sizes[0]
        out.append((f"rtt_{size}_xcpu", data_path, self._cross_cpu(functools.partial(self.rtt, size=size))))
        out.append(("bulk_1_xcpu", data_path, self._cross_cpu(functools.partial(self.bulk, streams=1))))
        return out

    def _cross_cpu(self, fn: Callable[[Candidate], dict[str, Any]]) -> Callable[[Candidate], dict[str, Any]]:
        def measure(cand: Candidate) -> dict[str, Any]:
            assert self.server is not None
            proc = cand.proc or self.server
            other = self.env.cpus["other"]
            home = self.env.cpus["proxy"]
            if other is None:
                return fn(cand)
            set_affinity(proc.pid, other)
            try:
                return fn(cand)
            finally:
                set_affinity(proc.pid, home if cand.proc is not None else self.env.cpus["server"])

        return measure

    def rtt(self, cand: Candidate, size: int) -> dict[str, Any]:
        spec = {
            "mode": "rtt",
            "host": HOST,
            "port": cand.port,
            "size": size,
            "duration": self.settings.rtt_duration,
        }
        return self._with_cpu(cand, spec)

    def bulk(self, cand: Candidate, streams: int) -> dict[str, Any]:
        spec = {
            "mode": "bulk",
            "host": HOST,
            "port": cand.port,
            "streams": streams,
            "duration": self.settings.bulk_duration,
        }
        if cand.name == "sp-spliced-kernel":
            # Nothing bounds this candidate's redirect backlog: record how far MemAvailable fell meanwhile.
            with MemWatch() as mem:
                result = self._with_cpu(cand, spec)
            result["mem_available_drop_kib"] = mem.drop_kib
        else:
            result = self._with_cpu(cand, spec)
        gb = result["bytes"] / 1e9
        result["cpu_s_per_gb"] = {k: v / gb for k, v in result["cpu_s"].items()}
        return result

    def rate(self, cand: Candidate) -> dict[str, Any]:
        spec = {"mode": "rate", "host": HOST, "port": cand.port, "duration": self.settings.rate_duration}
        return self._with_cpu(cand, spec)

    def _with_cpu(self, cand: Candidate, spec: dict[str, Any]) -> dict[str, Any]:
        """Run the client; add the CPU seconds the proxy, server, client and whole system spent."""
        assert self.server is not None
        pids = {"server": self.server.pid} | ({"proxy": cand.proc.pid} if cand.proc is not None else {})
        before = {k: proc_cpu_s(p) for k, p in pids.items()}
        sys_before = system_busy_s()
        result = run_client(self.env, spec)
        cpu = {k: proc_cpu_s(p) - before[k] for k, p in pids.items()}
        cpu["client"] = result.pop("cpu_s")
        cpu["system"] = system_busy_s() - sys_before
        result["cpu_s"] = cpu
        return result

    def idle(self, cand: Candidate) -> dict[str, Any]:
        assert cand.proc is not None
        pid = cand.proc.pid
        rss_before = proc_rss_kib(pid)
        spec = {"mode": "idle", "host": HOST, "port": cand.port, "count": self.settings.idle_conns}
        client = self.env.spawn(
            [PY, str(BENCH / "loadgen.py"), json.dumps(spec)], "client", stdin=subprocess.PIPE
        )
        try:
            wait_line(client, "ready", 120)
            time.sleep(0.5)  # let the proxy finish the last upstream connects
            rss = proc_rss_kib(pid)
            assert client.stdin is not None
            client.stdin.write("\n")
            client.stdin.flush()
            out, _ = client.communicate(timeout=60)
            result = json.loads(out.strip().splitlines()[-1])
        finally:
            self.env.stop(client)
            self.env.procs.remove(client)
        time.sleep(0.5)  # let 2x9000 closes ripple through before the next candidate
        n = result["connections"]
        return {
            "connections": n,
            "rss_before_kib": rss_before,
            "rss_kib": rss,
            "kib_per_conn": (rss - rss_before) / n if n else 0.0,
            "setup_s": result["setup_s"],
        }


def run_client(env: Env, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    proc = env.spawn([PY, str(BENCH / "loadgen.py"), json.dumps(spec)], "client", stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout or float(spec.get("duration", 1)) + 60)
    finally:
        env.stop(proc)
        env.procs.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen {spec['mode']} on port {spec['port']} failed: {err.strip()[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_phase_a(env: Env, settings: Settings, results: dict[str, Any], say: Callable[[str], None]) -> None:
    phase = PhaseA(env, settings)
    try:
        results["candidates"] = phase.start()
        data: dict[str, dict[str, list[dict[str, Any]]]] = {}
        results["data"] = data
        for key, names, fn in phase.measurements():
            if not settings.wants(key):
                continue
            present = [n for n in names if phase.candidates[n].available and settings.measures(n)]
            data[key] = {n: [] for n in present}
            for rnd in range(settings.rounds):
                for name in present:  # interleaved: A B C D E, A B C D E, ...
                    data[key][name].append(_attempt(fn, phase.candidates[name], f"{key} {name}", say))
                say(f"{key} round {rnd + 1}/{settings.rounds}: " + _brief(key, data[key]))
        idle_names = [
            n
            for n in ("haproxy", "trio-copy", "sp-userspace", "sp-spliced")
            if phase.candidates[n].available and settings.measures(n) and settings.wants("idle")
        ]
        data["idle"] = {n: [] for n in idle_names}
        for rnd in range(settings.idle_rounds):
            for name in idle_names:
                data["idle"][name].append(_attempt(phase.idle, phase.candidates[name], f"idle {name}", say))
            say(f"idle round {rnd + 1}/{settings.idle_rounds}: " + _brief("idle", data["idle"]))
        for name, where in (
            ("sp-spliced", "splice_counters"),
            ("sp-spliced-kernel", "splice_counters_kernel"),
        ):
            spliced = phase.candidates.get(name)
            if spliced is not None and spliced.available and spliced.proc is not None:
                # How much of everything the candidate carried the kernel moved, and how much Python did.
                with contextlib.suppress(OSError, TimeoutError, RuntimeError, ValueError):
                    time.sleep(0.5)  # bytes_spliced is summed when connections close
                    spliced.proc.send_signal(signal.SIGUSR1)
                    results[where] = json.loads(_read_line(spliced.proc, 10))
        if settings.profile_duration > 0:
            results["profile"] = profile_paths(env, phase, settings.profile_duration, say)
    finally:
        phase.stop()


def _attempt(
    fn: Callable[[Candidate], dict[str, Any]], cand: Candidate, what: str, say: Callable[[str], None]
) -> dict[str, Any]:
    """One measurement; a failure (e.g. the load generator found bytes lost or duplicated) is recorded
    as ``{"error": ...}`` for the report instead of ending the whole run."""
    try:
        return fn(cand)
    except (RuntimeError, OSError, TimeoutError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        say(f"{what}: FAILED: {message}")
        return {"error": message[-500:]}


def _brief(key: str, per_cand: dict[str, list[dict[str, Any]]]) -> str:
    field_ = {"rtt": "p50_us", "bulk": "gbit_s", "rate": "conn_s", "idle": "rss_kib"}[key.split("_")[0]]
    return ", ".join(
        f"{n}=" + ("failed" if "error" in runs[-1] else f"{runs[-1][field_]:.1f}")
        for n, runs in per_cand.items()
        if runs
    )


# --------------------------------------------------------------------------------------------------
# profile of the userspace path (what bounds it)

SYSCALLS = (
    "recvfrom",
    "sendto",
    "epoll_wait",
    "epoll_ctl",
    "read",
    "write",
    "recvmsg",
    "sendmsg",
    "futex",
    "poll",
    "select",
    "splice",
)


SYSTEM_EVENTS = ("workqueue:workqueue_execute_start", "sched:sched_switch", "sched:sched_wakeup")
KERNEL_PROFILED = ("direct", "haproxy", "sp-spliced", "sp-spliced-kernel")


def _find_pyspy() -> str | None:
    local = Path(PY).parent / "py-spy"
    return shutil.which("py-spy") or (str(local) if local.exists() else None)


def profile_paths(env: Env, phase: PhaseA, duration: float, say: Callable[[str], None]) -> dict[str, Any]:
    """What each path costs per request (64 B RTT) and per 64 KiB (1-stream bulk), and where it goes.

    * the proxy process: syscalls by name (perf tracepoints), context switches, CPU (perf task-clock) and
      its user/kernel split; py-spy's hottest functions for the Python proxies;
    * the whole machine: busy CPU (/proc/stat), workqueue items run (kworkers), context switches and
      wakeups (perf -a tracepoints);
    * for direct, HAProxy and the spliced paths (sp-spliced-kernel: bulk only): the hottest kernel
      symbols and which threads ran them (perf record -a, cpu-clock sampling: hardware counters are not
      available in this VM), and for the spliced paths how the psock backlog worker ran.
    """
    out: dict[str, Any] = {}
    perf = shutil.which("perf")
    pyspy = _find_pyspy()
    for name in ("sp-userspace", "sp-spliced", "sp-spliced-kernel", "trio-copy", "haproxy", "direct"):
        cand = phase.candidates.get(name)
        if cand is None or not cand.available or not phase.settings.measures(name):
            continue
        for load, spec in (
            ("rtt_64", {"mode": "rtt", "host": HOST, "port": cand.port, "size": 64, "duration": duration}),
            ("bulk_1", {"mode": "bulk", "host": HOST, "port": cand.port, "streams": 1, "duration": duration}),
        ):
            if name == "sp-spliced-kernel" and load != "bulk_1":
                continue  # a bulk-only candidate
            entry = _profile_one(env, cand, name, load, spec, duration, perf, pyspy)
            out.setdefault(name, {})[load] = entry
            say(f"profile {name} {load}: " + ", ".join(f"{k}={v:.1f}" for k, v in entry["per_unit"].items()))
    return out


def _profile_one(
    env: Env,
    cand: Candidate,
    name: str,
    load: str,
    spec: dict[str, Any],
    duration: float,
    perf: str | None,
    pyspy: str | None,
) -> dict[str, Any]:
    tools: list[subprocess.Popen] = []
    span = str(duration + 1.0)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    files = {k: env.tmp / f"{k}-{name}-{load}" for k in ("perf", "system", "record", "pyspy")}
    pid = cand.proc.pid if cand.proc is not None else None
    if perf and pid is not None:
        events = [f"syscalls:sys_enter_{s}" for s in SYSCALLS] + ["context-switches", "task-clock"]
        argv = [perf, "stat", "-x", ",", "-o", str(files["perf"]), "-e", ",".join(events), "-p", str(pid)]
        tools.append(env.spawn([*argv, "--", "sleep", span], "server", **quiet))
    if perf:
        argv = [perf, "stat", "-a", "-x", ",", "-o", str(files["system"]), "-e", ",".join(SYSTEM_EVENTS)]
        tools.append(env.spawn([*argv, "--", "sleep", span], "server", **quiet))
    if perf and name in KERNEL_PROFILED:
        argv = [perf, "record", "-q", "-a", "-e", "cpu-clock", "-F", "1999", "-o", str(files["record"])]
        tools.append(env.spawn([*argv, "--", "sleep", span], "server", **quiet))
    if perf and name.startswith("sp-spliced"):
        wq = ["workqueue:workqueue_queue_work", "workqueue:workqueue_execute_start"]
        argv = [perf, "record", "-q", "-a", "-e", ",".join(wq), "-o", str(env.tmp / f"wq-{name}-{load}")]
        tools.append(env.spawn([*argv, "--", "sleep", span], "server", **quiet))
    if pyspy and pid is not None and name != "haproxy":
        argv = [
            pyspy,
            "record",
            "--format",
            "raw",
            "--nonblocking",
            "-r",
            "200",
            "-d",
            str(int(duration + 1)),
        ]
        tools.append(env.spawn([*argv, "-p", str(pid), "-o", str(files["pyspy"])], "server", **quiet))
    time.sleep(0.4)  # tools attached before the load starts
    ut0, st0 = proc_user_sys_s(pid) if pid else (0.0, 0.0)
    busy0 = system_busy_s()
    result = run_client(env, spec)
    busy1 = system_busy_s()
    ut1, st1 = proc_user_sys_s(pid) if pid else (0.0, 0.0)
    for tool in tools:
        with contextlib.suppress(subprocess.TimeoutExpired):
            tool.wait(timeout=duration + 30)
        env.stop(tool)
        env.procs.remove(tool)
    units = result["count"] if load.startswith("rtt") else result["bytes"] / 65536
    entry: dict[str, Any] = {
        "unit": "request" if load.startswith("rtt") else "64 KiB relayed",
        "units": units,
    }
    per = _parse_perf(files["perf"].read_text(), units) if files["perf"].exists() else {}
    if pid is not None:
        # user vs kernel split of the proxy's CPU (tick-based, fine over seconds of load)
        per["user_us"] = (ut1 - ut0) * 1e6 / units
        per["sys_us"] = (st1 - st0) * 1e6 / units
    entry["per_unit"] = per
    system = _parse_perf(files["system"].read_text(), units) if files["system"].exists() else {}
    system["machine_cpu_us"] = (busy1 - busy0) * 1e6 / units
    entry["system_per_unit"] = system
    if files["record"].exists():
        entry["kernel_top"], entry["by_thread"] = _perf_report(perf, files["record"])
    if files["pyspy"].exists():
        entry["top_python"] = _parse_pyspy(files["pyspy"].read_text())
    wq_data = env.tmp / f"wq-{name}-{load}"
    if wq_data.exists():
        entry["psock_backlog"] = _psock_backlog(perf, wq_data, units)
    return entry


def _psock_backlog(perf: str | None, data: Path, units: float) -> dict[str, Any]:
    """How the kernel's psock backlog worker (which transmits SK_SKB redirects to another socket's
    egress) ran: runs per unit, who queued it (a process sending, or a timer: the retry one jiffy later
    after the target's send buffer was full), and the gaps between runs."""
    if perf is None:
        return {}
    text = subprocess.run(
        [perf, "script", "-i", str(data)], capture_output=True, text=True, timeout=120
    ).stdout
    runs: list[float] = []
    queued_by: dict[str, int] = {}
    for line in text.splitlines():
        if "sk_psock_backlog" not in line:
            continue
        parts = line.split()
        try:
            stamp = float(
                next(p for p in parts if p.endswith(":") and p[:-1].replace(".", "").isdigit())[:-1]
            )
        except StopIteration:
            continue
        if "workqueue_execute_start" in line:
            runs.append(stamp)
        elif "workqueue_queue_work" in line:
            comm = parts[0]
            kind = (
                "timer (swapper/ksoftirqd)" if comm in ("swapper",) or comm.startswith("ksoftirqd") else comm
            )
            kind = "python (a sending process)" if comm.startswith("python") else kind
            queued_by[kind] = queued_by.get(kind, 0) + 1
    gaps = [(b - a) * 1e3 for a, b in itertools.pairwise(runs)]
    long_gaps = [g for g in gaps if g >= 1.0]
    span = (runs[-1] - runs[0]) if len(runs) > 1 else 0.0
    return {
        "runs_per_unit": len(runs) / units if units else 0.0,
        "queued_by": queued_by,
        "gaps_ge_1ms": len(long_gaps),
        "share_of_time_in_gaps_ge_1ms": (sum(long_gaps) / 1e3 / span) if span else 0.0,
        "median_long_gap_ms": statistics.median(long_gaps) if long_gaps else 0.0,
        "hz": _config_hz(),
    }


def _config_hz() -> int | None:
    for path in ("/proc/config.gz", f"/boot/config-{platform.release()}"):
        try:
            if path.endswith(".gz"):
                import gzip

                text = gzip.decompress(Path(path).read_bytes()).decode()
            else:
                text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("CONFIG_HZ="):
                return int(line.split("=")[1])
    return None


def _perf_report(perf: str | None, data: Path, top: int = 10) -> tuple[list[tuple[str, float]], list]:
    """Top symbols (% of all samples, idle excluded) and the share of each kind of thread."""
    if perf is None:
        return [], []
    text = subprocess.run(
        [perf, "report", "-i", str(data), "--stdio", "--sort", "comm,sym", "--percent-limit", "0.3"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    syms: dict[str, float] = {}
    comms: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].endswith("%") or parts[0] == "%":
            continue
        pct, comm, sym = float(parts[0][:-1]), parts[1], " ".join(parts[3:])
        if "halt" in sym or "idle" in sym or comm == "swapper":
            continue  # an idle CPU, not work
        # kworker/0:1H-events -> kworker; python3.11 -> python; the rest as they are
        kind = "kworker" if comm.startswith("kworker") else ("python" if comm.startswith("python") else comm)
        comms[kind] = comms.get(kind, 0.0) + pct
        syms[sym] = syms.get(sym, 0.0) + pct
    busy = sum(comms.values()) or 1.0
    ranked = sorted(syms.items(), key=lambda kv: -kv[1])[:top]
    threads = sorted(comms.items(), key=lambda kv: -kv[1])[:6]
    return [(s, 100 * p / busy) for s, p in ranked], [(c, 100 * p / busy) for c, p in threads]


def _parse_perf(text: str, units: float) -> dict[str, float]:
    per: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 3 or not parts[0].replace(".", "", 1).isdigit():
            continue
        event = parts[2].replace("syscalls:sys_enter_", "").split(":")[-1]
        value = float(parts[0])
        if event == "task-clock":  # msec of CPU in the proxy
            per["cpu_us"] = value * 1e3 / units if units else 0.0
        elif value:
            per[event] = value / units if units else 0.0
    return per


def _parse_pyspy(text: str, top: int = 12) -> list[tuple[str, float]]:
    """Self time per function from py-spy's collapsed stacks (``a;b;c count``), as % of samples."""
    self_time: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        # "func (file.py:123)" -> "func (file.py)": lines of one function add up
        func = leaf.split(":", 1)[0] + ")" if ":" in leaf else leaf
        self_time[func] = self_time.get(func, 0) + int(count)
        total += int(count)
    ranked = sorted(self_time.items(), key=lambda kv: -kv[1])[:top]
    return [(f, 100.0 * c / total) for f, c in ranked] if total else []


# --------------------------------------------------------------------------------------------------
# phase B: the dispatcher alone


def install_trial(root: str, prefixes: int) -> dict[str, Any]:
    """Runs in a fresh process (``--install-trial``): open a dispatcher, install ``--ports 1-65535`` for
    ``prefixes`` prefixes in one call, report time and memory, unload."""
    from sockpolicy import Binding, Dispatcher

    t0 = time.perf_counter()
    d = Dispatcher.open(bpffs_root=root)
    t_open = time.perf_counter() - t0
    try:
        bindings = [
            Binding("tcp", f"10.{i >> 8}.{i & 255}.0/24", (1, 65535), "bench") for i in range(prefixes)
        ]
        maps_before = _bpf_map_memlock()
        # VmRSS, not ru_maxrss: the import peak would hide anything smaller than itself.
        rss_before = proc_rss_kib(os.getpid())
        t0 = time.perf_counter()
        d.add_bindings(bindings)
        t_install = time.perf_counter() - t0
        rss_after = proc_rss_kib(os.getpid())
        maps_after = _bpf_map_memlock()
        assert len(d.bindings()) == prefixes
    finally:
        d.unload()
    return {
        "prefixes": prefixes,
        "open_s": t_open,
        "install_s": t_install,
        "rss_growth_kib": rss_after - rss_before,
        "map_memlock_kib": maps_after / 1024,
        "map_memlock_growth_kib": (maps_after - maps_before) / 1024,
    }


def _bpf_map_memlock() -> int:
    """Bytes the kernel charges for the BPF maps this process has open (fdinfo ``memlock``)."""
    total = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:bpf-map":
                continue
            for line in Path(f"/proc/self/fdinfo/{name}").read_text().splitlines():
                if line.startswith("memlock:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def run_phase_b(env: Env, settings: Settings, results: dict[str, Any], say: Callable[[str], None]) -> None:
    install: dict[str, list[dict[str, Any]]] = {str(n): [] for n in settings.install_prefixes}
    results["install"] = install
    for rnd in range(settings.install_rounds):
        for n in settings.install_prefixes:
            root = env.bpffs_root / f"install-{n}-{rnd}"
            proc = subprocess.run(
                [PY, str(Path(__file__)), "--install-trial", str(n), "--root", str(root)],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=REPO,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"install trial {n}: {proc.stderr.strip()[-2000:]}")
            install[str(n)].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        say(
            f"install round {rnd + 1}: "
            + ", ".join(f"{n}: {v[-1]['install_s']:.3f}s" for n, v in install.items())
        )
    results["lookup"] = lookup_runtime(env, settings, say)


def lookup_runtime(env: Env, settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """SK_LOOKUP program run time per lookup (kernel BPF stats), with 1 binding and with many."""
    from sockpolicy import Binding, Program, enable_run_time_stats

    server_sock = listener(SERVER_PORT)
    server = env.spawn(
        [PY, str(BENCH / "server.py"), "--fd", str(server_sock.fileno())],
        "server",
        pass_fds=(server_sock.fileno(),),
    )
    out: dict[str, Any] = {}
    try:
        wait_line(server, "ready", 20)
        d = env.open_dispatcher("lookup")
        d.add_binding(Binding("tcp", f"{HOST}/32", STEER_LOOKUP, "lookup"))
        d.register_socket("lookup", server_sock)
        prog = Program.from_pin(d.path / "prog")
        n_prefixes, n_ports = settings.lookup_bindings
        steps = [("1", None)]
        many = [
            Binding("tcp", f"10.{i >> 8}.{i & 255}.0/24", 30000 + j, "bulk")
            for i in range(n_prefixes)
            for j in range(n_ports)
        ]
        steps.append((str(len(many) + 1), many))
        with prog, enable_run_time_stats():
            for key, add in steps:
                install_s = None
                if add is not None:
                    t0 = time.perf_counter()
                    d.add_bindings(add)
                    install_s = time.perf_counter() - t0
                rounds = []
                for _ in range(settings.lookup_rounds):
                    before = prog.run_stats()
                    res = run_client(
                        env,
                        {
                            "mode": "rate",
                            "host": HOST,
                            "port": STEER_LOOKUP[0],
                            "duration": settings.lookup_duration,
                        },
                    )
                    after = prog.run_stats()
                    runs = after.run_count - before.run_count
                    rounds.append(
                        {
                            "runs": runs,
                            "ns_per_run": (after.run_time_ns - before.run_time_ns) / runs if runs else 0.0,
                            "connections": res["connections"],
                            "conn_s": res["conn_s"],
                        }
                    )
                out[key] = {"rounds": rounds, "install_s": install_s}
                say(f"lookup with {key} bindings: {[round(r['ns_per_run'], 1) for r in rounds]} ns/run")
        d.unload()
    finally:
        env.stop(server)
        server_sock.close()
    return out


# --------------------------------------------------------------------------------------------------
# main


def run(
    settings: Settings, out_json: Path, say: Callable[[str], None] = print, layout: str = "shared"
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": dataclasses.asdict(settings),
        "machine": machine(),
    }
    env = Env(layout)
    results["netns"] = env.netns
    results["cpu_layout"] = layout
    results["cpu_plan"] = env.cpus
    t0 = time.monotonic()
    try:
        env.enter()
        say(
            f"namespace {env.netns}, bpffs root {env.bpffs_root}, cpus {env.cpus}, "
            f"load average {results['machine']['loadavg_start']}"
        )
        run_phase_a(env, settings, results, say)
        if settings.wants("dispatcher"):
            run_phase_b(env, settings, results, say)
    finally:
        env.cleanup()
    results["duration_s"] = time.monotonic() - t0
    results["loadavg_end"] = os.getloadavg()  # others' work during the run shows up here
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1))
    return results


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    old = {s: signal.signal(s, _raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sockpolicy benchmarks (see docs/benchmarks.md)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="a few seconds each")
    mode.add_argument("--smoke", action="store_const", const="smoke", dest="mode", help="tiny; for the test")
    parser.add_argument("--json", type=Path, help="raw results file (default bench/out/results-<time>.json)")
    parser.add_argument("--md", type=Path, default=REPO / "docs" / "benchmarks.md", help="report to write")
    parser.add_argument("--img", type=Path, default=REPO / "docs" / "img", help="directory for the plots")
    parser.add_argument(
        "--cpus",
        choices=("shared", "split", "none"),
        default="shared",
        help="CPU placement: all on CPU 0 (shared), proxy alone on CPU 1 (split), unpinned",
    )
    parser.add_argument("--profile", type=float, metavar="SECONDS", help="profile phase length (full: 4)")
    parser.add_argument("--no-report", action="store_true", help="only write the JSON")
    parser.add_argument(
        "--only",
        help="comma-separated measurements to run (rtt_64, rtt_16384, bulk_1, bulk_4, rate, rtt_64_xcpu, "
        "bulk_1_xcpu, idle, dispatcher); implies --no-report",
    )
    parser.add_argument("--candidates", help="comma-separated candidates to measure (e.g. haproxy)")
    parser.add_argument("--install-trial", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.install_trial is not None:
        print(json.dumps(install_trial(args.root, args.install_trial)))
        return 0
    settings = PRESETS[args.mode or "full"]
    if args.profile is not None:
        settings = dataclasses.replace(settings, profile_duration=args.profile)
    if args.only:
        settings = dataclasses.replace(settings, only=tuple(args.only.split(",")))
        args.no_report = True  # a partial run would make a partial report
    if args.candidates:
        settings = dataclasses.replace(settings, candidates=tuple(args.candidates.split(",")))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = args.json or OUT / f"results-{settings.mode}-{stamp}.json"
    with _signals_exit():
        results = run(settings, out_json, say=lambda m: print(f"bench: {m}", flush=True), layout=args.cpus)
    if args.json is None:
        shutil.copyfile(out_json, OUT / "latest.json")
    print(f"bench: raw results in {out_json} ({results['duration_s']:.0f}s)")
    if not args.no_report:
        sys.path.insert(0, str(BENCH))
        import report

        report.write_report(results, args.md, args.img)
        print(f"bench: wrote {args.md} and plots in {args.img}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
