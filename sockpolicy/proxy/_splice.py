"""Kernel splicing of proxied TCP connections (SOCKHASH + SK_SKB redirect); see docs/splice.md.

A :class:`Splicer` loads ``progs/splice.bpf.c``, creates a dedicated cgroup v2, moves this process into it
and attaches the SOCK_OPS program there.  From then on every TCP socket this process creates (listeners
included, and so the connections they accept) is put into the ``socks`` SOCKHASH when it is established,
before any payload can be queued, and gets a slot in the mmapped ``conns`` array.  The SK_SKB verdict passes
every received skb to userspace and counts it, until userspace asks for a splice; then it redirects once
everything passed has been forwarded.  :class:`SpliceSocket` is userspace's view of one socket's slot.

Nothing here ever makes a connection fail: if the kernel lacks a feature, :meth:`Splicer.open` raises
:exc:`SpliceUnavailable` with one reason, and a connection whose sockets have no slot stays in the
userspace relay.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import socket
import struct
import termios
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from sockpolicy import _errors
from sockpolicy._objects import AttachType, Link, Map, MapAttachment, ObjectSpec
from sockpolicy.maps import U32, U64, Hash, cookie_of

if TYPE_CHECKING:
    from sockpolicy._rules import Enforcer

__all__ = [
    "MAP_NAMES",
    "SPLICE_DISABLE_ENV",
    "AdoptedPair",
    "SpliceSocket",
    "SpliceStats",
    "SpliceUnavailable",
    "Splicer",
]

log = logging.getLogger("sockpolicy.proxy")

#: Comma-separated features to treat as missing (``cgroup``, ``sockops``, ``sk_skb``, ``mmap``, or
#: ``all``): :meth:`Splicer.open` then fails as it would on a kernel without them.  For tests and for
#: switching splicing off without a code change.
SPLICE_DISABLE_ENV = "SOCKPOLICY_SPLICE_DISABLE"
FEATURES = ("cgroup", "sockops", "sk_skb", "mmap")

MODE_PASS = 0
MODE_PENDING = 1
MODE_SPLICED = 2

N_SLOTS = 32768  # CONN_SLOTS in splice.bpf.c
_STATS = (
    "enrolled",
    "no_slot",
    "enrol_failed",
    "peer_gone",
    "throttled",
    "rule_dropped",
    "rule_diverted",
    "rules_framed",
    "old_dropped",
    "old_trimmed",
    "trim_failed",
    "seq_unknown",
)
_CFG_RULES = 2  # CFG_RULES in splice.bpf.c

#: The kernel rules' maps the splice verdict shares with an :class:`~sockpolicy.Enforcer` (rules_eval.h).
RULE_MAPS = ("config", "slots", "rules", "counters", "targets")

#: ``Splicer.open(rules=AUTO)``: use the kernel rules pinned in this network namespace, if any.
AUTO = "auto"

#: The splice object's maps, in the order :meth:`Splicer.export_maps` hands them to a successor.
MAP_NAMES = ("socks", "conns", "slot_of", "owners", "stats", "splice_config")

#: Default backlog bounds (bytes queued towards a peer but not yet transmitted by it); see docs/splice.md.
BACKLOG_HIGH = 4 << 20
BACKLOG_LOW = 1 << 20

#: Slots of closed sockets wait this long before reuse: longer than any verdict run that might still
#: hold a pointer to the slot (an RCU read-side section).
QUARANTINE = 0.2
SWEEP_INTERVAL = 0.5

_TCP_INFO_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked)
_TCP_INFO_BYTES_RECEIVED = 128  # offsetof(struct tcp_info, tcpi_bytes_received)
_TCP_INFO_LEN = 136


class _Conn(ctypes.Structure):
    # Must match struct conn in splice.bpf.c.  ctypes reads and writes each field with one aligned
    # load/store, which is what the single-writer protocol there needs.
    _fields_ = [
        ("owner", ctypes.c_uint64),
        ("peer", ctypes.c_uint64),
        ("mode", ctypes.c_uint32),
        ("closed", ctypes.c_uint32),
        ("passed", ctypes.c_uint64),
        ("forwarded", ctypes.c_uint64),
        ("redirected", ctypes.c_uint64),
        ("skbs", ctypes.c_uint64),
        ("dropped", ctypes.c_uint64),
        ("written", ctypes.c_uint64),
        ("seq_base", ctypes.c_uint64),
        ("peer_slot", ctypes.c_uint32),
        ("throttles", ctypes.c_uint32),
        ("diverted", ctypes.c_uint64),
        ("rcv_next", ctypes.c_uint32),
        ("seq_known", ctypes.c_uint32),
        ("old", ctypes.c_uint64),
        ("broken", ctypes.c_uint32),
        ("pad32", ctypes.c_uint32),
        ("pad", ctypes.c_uint64 * 1),
    ]


_WORDS = ctypes.sizeof(_Conn) // 8  # u64 words per slot
assert ctypes.sizeof(_Conn) == 128


class SpliceUnavailable(Exception):
    """The kernel (or the configuration) cannot splice; ``str(exc)`` is the one-line reason."""

    def __init__(self, feature: str, reason: str) -> None:
        super().__init__(reason)
        self.feature = feature


@dataclass
class SpliceStats:
    """Counters of one :class:`Splicer` (userspace side; :meth:`Splicer.kernel_stats` has the kernel's)."""

    #: connections whose both directions were handed to the kernel
    spliced: int = 0
    #: splice requests that stayed in userspace (the reason is logged once per connection)
    fallbacks: int = 0
    #: payload bytes the kernel redirected, summed when connections close
    bytes_spliced: int = 0
    #: slots freed (claimed by the proxy, or of other sockets of this process)
    slots_freed: int = 0
    #: spliced connections received from the predecessor in a restart (docs/operations.md)
    adopted: int = 0
    #: spliced connections handed to the successor in a restart
    handed_over: int = 0


def _disabled() -> set[str]:
    value = os.environ.get(SPLICE_DISABLE_ENV, "")
    names = {name.strip().lower() for name in value.split(",") if name.strip()}
    return set(FEATURES) if "all" in names else names


def _cgroup2_root() -> Path | None:
    """The cgroup v2 mount point (``/sys/fs/cgroup/unified`` on hybrid hosts, else ``/sys/fs/cgroup``)."""
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                found.append(Path(fields[1]))
    return min(found, key=lambda p: len(p.parts)) if found else None


def _own_cgroup() -> str:
    """This process's cgroup v2 path relative to the mount (``0::/path`` in /proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def queued_total(sock: socket.socket | trio.socket.SocketType) -> int:
    """Payload bytes ever queued on ``sock``'s write side: acked plus still in the write queue.

    TCP_INFO is read before SIOCOUTQ, so an ACK arriving in between makes the sum too small, never too
    large: a caller waiting for a target never stops early.
    """
    acked = _tcp_info_u64(sock, _TCP_INFO_BYTES_ACKED)
    outq = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    return acked + outq


def bytes_received(sock: socket.socket | trio.socket.SocketType) -> int:
    """Payload bytes TCP has received on ``sock`` (``tcpi_bytes_received``)."""
    return _tcp_info_u64(sock, _TCP_INFO_BYTES_RECEIVED)


def _tcp_info_u64(sock: socket.socket | trio.socket.SocketType, offset: int) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return int(struct.unpack_from("=Q", info, offset)[0])


class SpliceSocket:
    """Userspace's view of one enrolled socket's slot.  Obtained from :meth:`Splicer.claim`."""

    def __init__(
        self,
        splicer: Splicer,
        sock: trio.socket.SocketType | socket.socket,
        cookie: int,
        slot: int,
        base: int | None = None,
    ) -> None:
        self.splicer = splicer
        self.cookie = cookie
        self.slot = slot
        self._conn: _Conn | None = splicer._view(slot)
        # Bytes queued on the write side before the proxy wrote anything (0, or 1 on some paths where the
        # SYN is counted as acked): the origin of queued_total() for the drain check.  A socket adopted in
        # a restart brings the value its first owner calibrated.
        self.base = queued_total(sock) if base is None else base
        #: the value of the source's ``redirected`` when everything redirected was last seen queued here
        self.drained_at = 0

    def __repr__(self) -> str:
        return f"<SpliceSocket cookie={self.cookie} slot={self.slot}>"

    @property
    def conn(self) -> _Conn:
        if self._conn is None:
            raise RuntimeError(f"{self!r} was released")
        return self._conn

    @property
    def mode(self) -> int:
        return self.conn.mode

    @property
    def spliced(self) -> bool:
        return self.conn.mode == MODE_SPLICED

    @property
    def passed(self) -> int:
        return self.conn.passed

    @property
    def redirected(self) -> int:
        return self.conn.redirected

    @property
    def dropped(self) -> int:
        return self.conn.dropped

    @property
    def written(self) -> int:
        """Bytes userspace wrote into this socket (the relay adds to it; the verdict reads it)."""
        return self.conn.written

    @written.setter
    def written(self, value: int) -> None:
        self.conn.written = value

    @property
    def throttles(self) -> int:
        return self.conn.throttles

    def set_forwarded(self, count: int) -> None:
        """Tell the verdict that ``count`` bytes passed to us have been written to the peer.

        Call it only when it is true for every byte read so far, i.e. nothing is buffered.
        """
        self.conn.forwarded = count

    def request(self, peer: SpliceSocket) -> None:
        """Ask the verdict to redirect this socket's bytes to ``peer`` once userspace has caught up."""
        conn = self.conn
        conn.peer = peer.cookie  # before the mode: the verdict reads these only after seeing PENDING
        conn.peer_slot = peer.slot
        conn.mode = MODE_PENDING

    def drained_into(self, source: SpliceSocket | None, sock: trio.socket.SocketType) -> bool:
        """Whether every byte for this socket (ours plus ``source``'s redirected ones) reached its queue."""
        redirected = source.redirected if source is not None else 0
        if redirected == self.drained_at:
            return True  # nothing redirected since the last check: our own writes are in order anyway
        if queued_total(sock) - self.base >= self.written + redirected:
            self.drained_at = redirected
            return True
        return False

    def release(self) -> None:
        """Give the slot back (after the socket was closed).  Idempotent."""
        if self._conn is not None:
            self._conn = None
            self.splicer._release(self.slot, self.cookie)


@dataclass
class AdoptedPair:
    """A spliced connection received from the predecessor in a restart: its two sockets and slots.

    ``serve()`` runs it (``_tcp.run_adopted_splice``); :meth:`close` is for a pair that never ran.
    """

    client: socket.socket
    upstream: socket.socket
    client_slot: SpliceSocket
    upstream_slot: SpliceSocket
    #: the predecessor's pid (logs)
    pid: int
    #: the connection's client, original destination and upstream address, as the predecessor saw them
    #: (``getpeername`` fails on a socket that is already closed but still has bytes to read)
    addresses: list[list[Any]] | None = None

    def close(self) -> None:
        self.client.close()
        self.upstream.close()
        self.client_slot.release()
        self.upstream_slot.release()


class Splicer:
    """The kernel side of splicing for one serving process.  Use :meth:`open`; :meth:`close` undoes it.

    The process is moved into a new cgroup ``<cgroup2>/sockpolicy-splice-<pid>`` (or ``cgroup``), so
    open it BEFORE creating the listening sockets: an accepted socket belongs to its listener's cgroup.
    """

    def __init__(self) -> None:
        self.stats = SpliceStats()
        self._links: list[Link] = []
        self._attachment: MapAttachment | None = None
        self._maps: dict[str, Map] = {}
        self._mmap: mmap.mmap | None = None
        self._view_array: ctypes.Array[_Conn] | None = None
        self._slot_of: Hash[int, int] | None = None
        self._owners: Hash[int, int] | None = None
        self._claimed: dict[int, int] = {}  # slot -> cookie of sockets the relay uses
        self._quarantine: dict[int, tuple[int, float]] = {}  # slot -> (cookie, freed at)
        self._orphans: set[int] = set()  # adopted splicer: slots the predecessor released, seen last sweep
        self._cgroup: Path | None = None
        self._created_cgroup = False
        self._named = False  # a cgroup named by the caller (shared across a restart): last one out removes
        self._previous_cgroup: Path | None = None
        self.closed = False
        #: the verdict judges received messages with kernel rules (``rules`` of :meth:`open`)
        self.rules = False
        #: sessions of the relay using this splicer's slots (the restart hands the spliced ones over)
        self.sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        #: a predecessor's splicers whose connections this process finishes (restart), see :meth:`adopt`
        self.adopted: list[Splicer] = []
        #: spliced connections received in a restart, for ``serve()`` to run (:meth:`take_adopted_pairs`)
        self.adopted_pairs: list[Any] = []
        #: pid of the process whose maps these are (a splicer made by :meth:`adopt`), else None
        self.adopted_from: int | None = None
        #: the maps (and so the verdict and every connection still in them) went to a successor:
        #: :meth:`close` then leaves the verdict attached.
        self.exported = False
        #: a successor uses our cgroup (same name): :meth:`close` never removes it.  With ``--workers`` the
        #: successor may have no process in it for a moment (between its parent's setup and the fork), and
        #: removing it then would detach the SOCK_OPS link it took over.
        self.keep_cgroup = False

    # -- lifecycle ----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        cgroup: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        link: Link | None = None,
        backlog_high: int = BACKLOG_HIGH,
        backlog_low: int = BACKLOG_LOW,
        rules: Enforcer | str | None = AUTO,
    ) -> Splicer:
        """Load the programs, create the cgroup, move this process into it and attach.

        :param cgroup: an existing cgroup v2 directory to use instead of a new one; this process is moved
            into it, and every TCP socket of every process in it is enrolled.
        :param name: create (or reuse) ``<cgroup2>/sockpolicy-splice-<name>`` instead of one named after
            the pid: ``serve`` names it after its network namespace and label, so that a successor in a
            restart uses the cgroup its adopted listening sockets belong to.
        :param link: the predecessor's SOCK_OPS link on that cgroup (received in a restart): instead of
            attaching a second program, replace its program by ours with ``BPF_LINK_UPDATE``, atomically,
            so that every establishment is enrolled by exactly one of the two (never into both maps).
            The splicer owns the link from then on.
        :param backlog_high: bytes queued towards a peer but not yet sent by it above which the kernel
            hands a connection back to userspace (which waits for the peer); the memory bound.
        :param backlog_low: the kernel splices again once the backlog is below this.
        :param rules: kernel per-message rules to apply to every received message of the enrolled sockets
            (docs/splice.md, "Kernel rules"): an :class:`~sockpolicy.Enforcer` whose rule sets (replaced
            at any time with :meth:`~sockpolicy.Enforcer.replace`) and counters are shared; :data:`AUTO`
            (the default): the ones pinned in this network namespace by ``sockpolicy enforce``, if any;
            ``None``: none.
        :raises SpliceUnavailable: a feature is missing (or disabled with ``SOCKPOLICY_SPLICE_DISABLE``),
            or rules are configured but cannot be shared (feature ``rules``: splicing without them would
            bypass them); nothing is left behind.
        """
        self = cls()
        try:
            self._open(cgroup, name, link, backlog_high, backlog_low, rules)
        except BaseException:
            self.close()
            raise
        return self

    def _open(
        self,
        cgroup: str | os.PathLike[str] | None,
        name: str | None,
        link: Link | None,
        high: int,
        low: int,
        rules: Enforcer | str | None,
    ) -> None:
        disabled = _disabled()
        root = _cgroup2_root()
        if "cgroup" in disabled or root is None:
            raise SpliceUnavailable("cgroup", "no cgroup v2 mount (cgroup2 in /proc/self/mounts)")
        if "sk_skb" in disabled:
            raise SpliceUnavailable("sk_skb", "SK_SKB programs unavailable (disabled)")
        if "sockops" in disabled:
            raise SpliceUnavailable("sockops", "SOCK_OPS programs unavailable (disabled)")
        spec = ObjectSpec.from_package("splice")
        try:
            enforcer, owned = _rules_enforcer(rules)
        except (_errors.SockpolicyError, OSError) as exc:
            raise SpliceUnavailable(
                "rules", f"cannot open the kernel rules of this namespace: {exc}"
            ) from None
        try:
            if enforcer is not None:
                try:
                    _check_rule_maps(spec, enforcer)
                except (_errors.SockpolicyError, OSError) as exc:
                    raise SpliceUnavailable("rules", f"cannot check the kernel rules' maps: {exc}") from None
                spec.reuse_maps = {name: enforcer.map(name) for name in RULE_MAPS}
            try:
                obj = spec.load()
            except (_errors.SockpolicyError, OSError) as exc:
                if enforcer is not None:
                    raise SpliceUnavailable(
                        "rules", f"cannot load the splice programs with the kernel rules' maps: {exc}"
                    ) from None
                raise SpliceUnavailable("sk_skb", f"cannot load the splice programs: {exc}") from None
            if enforcer is not None:
                self.rules = True
                _log_rules(enforcer)
        finally:
            # The loaded programs hold the shared maps; this process needs no fd of its own for them.
            if owned and enforcer is not None:
                enforcer.close()
        with obj:
            self._maps = {map_name: obj.take_map(map_name) for map_name in MAP_NAMES}
            for index, value in ((0, high), (1, low), (_CFG_RULES, int(self.rules))):
                self._maps["splice_config"].update(struct.pack("=I", index), struct.pack("=Q", value))
            verdict = obj.programs["splice_verdict"]
            sockops = obj.programs["splice_sockops"]
            if "mmap" in disabled:
                raise SpliceUnavailable("mmap", "mmapable BPF arrays unavailable (disabled)")
            self._map_slots()
            try:
                self._attachment = verdict.attach_map(self._maps["socks"], AttachType.SK_SKB_VERDICT)
            except (_errors.SockpolicyError, OSError) as exc:
                raise SpliceUnavailable("sk_skb", f"cannot attach the SK_SKB verdict: {exc}") from None
            self._enter_cgroup(root, cgroup, name)
            if link is not None:
                try:
                    link.update(sockops)
                except (_errors.SockpolicyError, OSError) as exc:
                    link.close()
                    reason = f"cannot take over the SOCK_OPS link on {self._cgroup}: {exc}"
                    raise SpliceUnavailable("sockops", reason) from None
                self._links.append(link)
                log.info("splice: took over the SOCK_OPS attachment of cgroup %s", self._cgroup)
            else:
                try:
                    self._links.append(sockops.attach_cgroup(str(self._cgroup)))
                except (_errors.SockpolicyError, OSError) as exc:
                    reason = f"cannot attach SOCK_OPS to {self._cgroup}: {exc}"
                    raise SpliceUnavailable("sockops", reason) from None
        log.info("splice: enabled (cgroup %s)", self._cgroup)

    def _map_slots(self) -> None:
        """mmap ``conns`` and open the typed views of ``slot_of`` and ``owners``."""
        conns = self._maps["conns"]
        try:
            pages = -(-conns.value_size * conns.max_entries // mmap.PAGESIZE)
            size = pages * mmap.PAGESIZE
            self._mmap = mmap.mmap(conns.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise SpliceUnavailable("mmap", f"cannot mmap the BPF array: {exc}") from None
        self._view_array = (_Conn * conns.max_entries).from_buffer(self._mmap)
        self._slot_of = Hash(self._maps["slot_of"].clone(), key=U64, value=U32)
        self._owners = Hash(self._maps["owners"].clone(), key=U32, value=U64)

    def _enter_cgroup(self, root: Path, cgroup: str | os.PathLike[str] | None, name: str | None) -> None:
        self._previous_cgroup = root / _own_cgroup().lstrip("/")
        if cgroup is None:
            path = root / f"sockpolicy-splice-{name if name is not None else os.getpid()}"
            self._named = name is not None
            try:
                path.mkdir()
                self._created_cgroup = True
            except FileExistsError:
                # Left by an earlier process with our pid, or (named) by a predecessor that was killed, or
                # still in use by the predecessor we take over from: reuse it.
                pass
            except OSError as exc:
                raise SpliceUnavailable("cgroup", f"cannot create cgroup {path}: {exc}") from None
        else:
            path = Path(os.fspath(cgroup))
        try:
            (path / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            raise SpliceUnavailable("cgroup", f"cannot move into cgroup {path}: {exc}") from None
        self._cgroup = path

    def close(self) -> None:
        """Detach everything, move back to the previous cgroup, remove the one we made.  Idempotent.

        Sockets still open stay in the SOCKHASH (the kernel keeps the map while they are in it) but
        nothing redirects them any more once the slots are gone; close connections first.
        """
        if self.closed:
            return
        for pair in self.adopted_pairs:
            pair.close()  # never ran (serve() did not start): closes its sockets, frees its slots
        self.adopted_pairs.clear()
        self.closed = True
        for other in self.adopted:
            other.close()
        self.adopted.clear()
        for link in self._links:
            with contextlib.suppress(OSError, _errors.SockpolicyError):
                link.close()  # our fd only: a successor that took the link over keeps it attached
        self._links.clear()
        if self._cgroup is not None and self._previous_cgroup is not None:
            with contextlib.suppress(OSError):
                (self._previous_cgroup / "cgroup.procs").write_text(str(os.getpid()))
            if not self.keep_cgroup:
                self._remove_cgroup()
        if self._attachment is not None:
            if not self.exported:
                # Exported: the successor's connections still run through this verdict.
                with contextlib.suppress(OSError, _errors.SockpolicyError):
                    self._attachment.detach()
            self._attachment.close()
            self._attachment = None
        self._close_fds()

    def _remove_cgroup(self) -> None:
        """Remove our cgroup unless another process (a successor, or the predecessor still draining)
        is in it: the last one out removes it.  A cgroup named by ``serve`` outlives a killed process
        (empty, harmless) and is reused by the next one."""
        assert self._cgroup is not None
        if not self._created_cgroup and not self._named:
            return  # a cgroup the caller gave us
        procs = self._cgroup / "cgroup.procs"
        # The cgroup reads as populated for a moment after the move: retry briefly.
        for _ in range(50):
            try:
                others = [pid for pid in procs.read_text().split() if int(pid) != os.getpid()]
            except FileNotFoundError:
                return
            except OSError:
                others = []
            if others:
                log.debug("splice: leaving cgroup %s to pid %s", self._cgroup, others[0])
                return
            try:
                self._cgroup.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
        log.warning("splice: could not remove cgroup %s (still busy)", self._cgroup)

    def enter(self) -> None:
        """Move this process into our cgroup (again): its TCP sockets created from now on are enrolled.

        For ``serve --workers N --splice``: the parent creates each worker's listening sockets while in
        that worker's cgroup, and each forked worker moves itself in before it connects upstream.
        """
        assert self._cgroup is not None
        (self._cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def leave(self) -> None:
        """Move this process back to the cgroup it was in before :meth:`open`."""
        if self._previous_cgroup is not None:
            (self._previous_cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def forget(self) -> None:
        """Close this process's fds of a splicer that another process runs: detach, release, free and move
        nothing (a forked ``--workers`` worker and the parent drop what is another process's).  Idempotent.
        """
        if self.closed:
            return
        self.forget_adopted()
        self.closed = True
        self.drop_links()
        if self._attachment is not None:
            self._attachment.close()  # our fds only: the attachment lives as long as the map
            self._attachment = None
        self._close_fds()

    def forget_adopted(self) -> None:
        """Close this process's fds of the spliced connections and predecessor maps received in a restart,
        which another process (the ``--workers`` worker they belong to) runs: nothing is released."""
        for pair in self.adopted_pairs:
            pair.client.close()  # this process's fd only: the worker's keeps the connection open
            pair.upstream.close()
        self.adopted_pairs.clear()
        for other in self.adopted:
            other.forget()
        self.adopted.clear()

    def _close_fds(self) -> None:
        for typed in (self._slot_of, self._owners):
            if typed is not None:
                typed.close()
        self._slot_of = self._owners = None
        self._view_array = None
        if self._mmap is not None:
            # BufferError: a SpliceSocket still holds a view; the mapping goes with it.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
        for owned in self._maps.values():
            owned.close()
        self._maps.clear()

    def drop_links(self) -> None:
        """Close our fds of the SOCK_OPS link without detaching anything (a forked worker: the parent's
        fds keep the attachment, and :meth:`stop_enrolling` there must be able to end it)."""
        for link in self._links:
            with contextlib.suppress(OSError):
                link.close()  # this fd only: an unpinned link detaches when its LAST fd is closed
        self._links.clear()

    def stop_enrolling(self) -> None:
        """Detach the SOCK_OPS program: sockets established from now on are not enrolled.  Idempotent.

        For a restart: the listening sockets handed to a successor stay in this splicer's cgroup, and what
        they accept is the successor's.  Connections already spliced are not affected.
        """
        for link in self._links:
            with contextlib.suppress(OSError, _errors.SockpolicyError):
                link.close()
        self._links.clear()

    # -- restart: handing connections to a successor ------------------------------------------------

    def export_maps(self) -> list[Map]:
        """The maps a successor needs to keep this splicer's connections working, in :data:`MAP_NAMES`
        order (send their fds with SCM_RIGHTS).  Holding ``socks`` keeps the SK_SKB verdict attached
        and every socket in it redirected after this process is gone; ``conns`` (mmapped) and the
        hashes are the slots' state.  Call :meth:`mark_exported` once the successor has them."""
        return [self._maps[map_name] for map_name in MAP_NAMES]

    def sockops_link(self) -> Link | None:
        """The SOCK_OPS link, for a successor to take over with ``BPF_LINK_UPDATE``."""
        return self._links[0] if self._links else None

    def mark_exported(self) -> None:
        """A successor holds our maps now: :meth:`close` must not detach the verdict from them."""
        self.exported = True

    @classmethod
    def adopt(cls, maps: list[Map], pid: int) -> Splicer:
        """A predecessor's splicer from its exported maps (restart): no cgroup, no SOCK_OPS program.

        It keeps the predecessor's connections spliced (the verdict stays attached to ``socks`` as long
        as this process holds the map) and frees their slots when they end.  The owning splicer's
        sweeper sweeps it and closes it once nothing is left in it.
        """
        self = cls()
        self.adopted_from = pid
        try:
            if len(maps) != len(MAP_NAMES):
                raise SpliceUnavailable("restart", f"expected {len(MAP_NAMES)} splice maps, got {len(maps)}")
            self._maps = dict(zip(MAP_NAMES, maps, strict=True))
            self._map_slots()
        except BaseException:
            for m in maps:
                m.close()
            self._maps.clear()
            self.close()
            raise
        return self

    def adopt_slot(self, sock: socket.socket, cookie: int, slot: int, base: int) -> SpliceSocket:
        """Claim the slot of a spliced socket received from the predecessor (restart).

        :raises SpliceUnavailable: the socket is not (or no longer) in that slot.
        """
        if self.closed or self._slot_of is None:
            raise SpliceUnavailable("splicer", "the splicer is closed")
        if cookie_of(sock) != cookie or self._slot_of.get(cookie) != slot:
            raise SpliceUnavailable("socket", "the adopted socket is not in its slot")
        conn = self._view(slot)
        if conn.owner != cookie:
            raise SpliceUnavailable("socket", "the slot belongs to another socket")
        # A closed one (conn.closed: it reached TCP_CLOSE) may still hold bytes for its relay to read.
        handle = SpliceSocket(self, sock, cookie, slot, base)
        self._claimed[slot] = cookie
        return handle

    def _orphan(self, owner: int) -> bool:
        """In a predecessor's maps (:meth:`adopt`): whether the slot of socket ``owner`` is done with.

        Either the predecessor released it (step 1, ``slot_of`` deleted) and exited before its
        quarantine ended, or the socket is closed (it left ``socks``) without being marked: its state
        callbacks now run OUR program, the cgroup's, which does not know these maps.  Nothing enrols
        into them any more, so this is never an enrolment half-way; :meth:`sweep` still waits for a
        second sighting, to let any program run that began before the switch finish.
        """
        assert self._slot_of is not None
        if owner not in self._slot_of:
            return True
        return self._maps["socks"].get(struct.pack("=Q", owner)) is None

    def idle(self) -> bool:
        """No slot in use and nothing to free: an adopted splicer can be closed."""
        if self.closed or self._claimed or self._quarantine:
            return self.closed
        return not len(self._owners or ())

    def take_adopted_pairs(self) -> list[Any]:
        """The spliced connections received in a restart, for ``serve()`` to run; each once."""
        pairs, self.adopted_pairs = self.adopted_pairs, []
        return pairs

    def _adopted_reason(self, cookie: int) -> str | None:
        for other in self.adopted:
            if other._slot_of is not None and cookie in other._slot_of:
                return (
                    f"socket enrolled by the splice programs of pid {other.adopted_from} (established while "
                    "the restart switched over)"
                )
        return None

    def __enter__(self) -> Splicer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cgroup(self) -> Path | None:
        return self._cgroup

    # -- slots --------------------------------------------------------------------------------------

    def _view(self, slot: int) -> _Conn:
        assert self._view_array is not None
        return self._view_array[slot]

    def claim(self, sock: trio.socket.SocketType) -> SpliceSocket:
        """The slot of an established socket of this process, reserved for the caller.

        :raises SpliceUnavailable: the socket was not enrolled (created outside the cgroup, no free slot,
            already closed).
        """
        if self.closed or self._slot_of is None:
            raise SpliceUnavailable("splicer", "the splicer is closed")
        try:
            cookie = cookie_of(sock)
        except _errors.SockpolicyError as exc:
            raise SpliceUnavailable("socket", f"no socket cookie: {exc}") from None
        slot = self._slot_of.get(cookie)
        if slot is None:
            reason = self._adopted_reason(cookie)
            raise SpliceUnavailable(
                "socket", reason or "socket not enrolled (created outside the splice cgroup, or no free slot)"
            )
        conn = self._view(slot)
        if conn.owner != cookie or conn.closed:
            raise SpliceUnavailable("socket", "socket already closed")
        try:
            handle = SpliceSocket(self, sock, cookie, slot)
        except OSError as exc:
            raise SpliceUnavailable("socket", f"cannot read TCP_INFO: {exc}") from None
        self._claimed[slot] = cookie
        return handle

    def _release(self, slot: int, cookie: int) -> None:
        if self._claimed.get(slot) == cookie:
            del self._claimed[slot]
        self._free(slot, cookie)

    def _free(self, slot: int, cookie: int) -> None:
        # Step 1: no new verdict run or close callback finds the slot.  Step 2 (after QUARANTINE) in sweep().
        if self.closed or self._slot_of is None or slot in self._quarantine:
            return
        with contextlib.suppress(KeyError):
            del self._slot_of[cookie]
        self._quarantine[slot] = (cookie, time.monotonic())

    def sweep(self) -> None:
        """Free slots of closed sockets nobody claimed, and slots whose quarantine is over."""
        if self.closed or self._view_array is None or self._mmap is None:
            return
        now = time.monotonic()
        for slot, (cookie, since) in list(self._quarantine.items()):
            if now - since < QUARANTINE:
                continue
            conn = self._view(slot)
            if conn.owner == cookie:
                ctypes.memset(ctypes.addressof(conn) + 8, 0, ctypes.sizeof(_Conn) - 8)
                conn.owner = 0
            del self._quarantine[slot]
            assert self._owners is not None
            with contextlib.suppress(KeyError):
                del self._owners[slot]  # last: only now may the kernel hand the slot out again
            self.stats.slots_freed += 1
        # Every socket of this process is enrolled, not only the relay's (an upstream attempt that lost
        # the happy-eyeballs race, a callback's own HTTP client...): free theirs once closed.
        words = memoryview(self._mmap).cast("Q")
        try:
            owners = words[0::_WORDS].tolist()
            mode_closed = words[2::_WORDS].tolist()
        finally:
            words.release()
        orphans = set()
        for slot, (owner, flags) in enumerate(zip(owners, mode_closed, strict=True)):
            if not owner or slot in self._claimed or slot in self._quarantine:
                continue
            if flags >> 32:
                self._free(slot, owner)
            elif self.adopted_from is not None and self._orphan(owner):
                if slot in self._orphans:
                    self._free(slot, owner)
                else:
                    orphans.add(slot)
        self._orphans = orphans
        for other in list(self.adopted):
            other.sweep()
            if other.idle():
                log.info("splice: released the splice maps adopted from pid %s (nothing left in them)",
                         other.adopted_from)  # fmt: skip
                self.stats.slots_freed += other.stats.slots_freed
                other.close()
                self.adopted.remove(other)

    async def run_sweeper(self, interval: float = SWEEP_INTERVAL) -> None:
        """Call :meth:`sweep` every ``interval`` seconds until cancelled."""
        while not self.closed:
            self.sweep()
            await trio.sleep(interval)

    def entries(self) -> dict[str, int]:
        """How many entries each map holds, and slots in use (diagnostics; the tests check zero)."""
        counts = {
            "socks": sum(1 for _ in self._maps["socks"].keys()),  # noqa: SIM118 - a Map is not iterable
            "slot_of": len(self._slot_of or ()),
            "owners": len(self._owners or ()),
        }
        if self._mmap is not None:
            words = memoryview(self._mmap).cast("Q")
            try:
                counts["slots"] = sum(1 for owner in words[0::_WORDS].tolist() if owner)
            finally:
                words.release()
        counts["claimed"] = len(self._claimed)
        counts["quarantined"] = len(self._quarantine)
        return counts

    def kernel_stats(self) -> dict[str, int]:
        stats_map = self._maps["stats"]
        result = {}
        for index, name in enumerate(_STATS):
            value = stats_map.lookup(struct.pack("=I", index))
            result[name] = struct.unpack("=Q", value)[0]
        return result


def _rules_enforcer(rules: Enforcer | str | None) -> tuple[Enforcer | None, bool]:
    """``(enforcer or None, whether this call opened it)`` for :meth:`Splicer.open`'s ``rules``."""
    if rules is None:
        return None, False
    if not isinstance(rules, str):
        return rules, False
    if rules != AUTO:
        raise ValueError(f"Splicer.open(rules={rules!r}): use an Enforcer, AUTO or None")
    from sockpolicy._rules import Enforcer

    try:
        return Enforcer.open(), True
    except _errors.NotLoaded:
        return None, False


def _check_rule_maps(spec: ObjectSpec, enforcer: Enforcer) -> None:
    """Refuse (feature ``rules``) when a shared map differs from the splice program's definition of it.

    libbpf's reuse of a map fd does not compare the definitions, and the verifier only checks accesses
    against the map it is given: rule tables of another layout (state pinned by another sockpolicy
    version) could load and then be misread.
    """
    from sockpolicy import _libbpf

    handle = _libbpf.object_open(str(spec.path))
    try:
        wanted = {d.name: d for d in map(_libbpf.map_describe, _libbpf.object_maps(handle))}
    finally:
        _libbpf.object_close(handle)
    for name in RULE_MAPS:
        want, have = wanted[name], enforcer.map(name)
        expected = (want.type, want.key_size, want.value_size, want.max_entries)
        actual = (int(have.type), have.key_size, have.value_size, have.max_entries)
        if expected != actual:
            raise SpliceUnavailable(
                "rules",
                f"the kernel rules' map {name!r} (type, key, value, entries {actual}) does not match the "
                f"splice program's {expected}: pinned by another sockpolicy version? "
                "run sockpolicy enforce --unload, then enforce again",
            )


def _log_rules(enforcer: Enforcer) -> None:
    gen = enforcer.generation
    log.info("splice: kernel rules apply to received messages (generation %d)", gen)
    try:
        ruleset = enforcer.ruleset()
    except (_errors.SockpolicyError, ValueError) as exc:  # RuleError is a ValueError
        log.warning("splice: cannot read the description of kernel rule set %d: %s", gen, exc)
        return
    if ruleset is not None and ruleset.framing is not None:
        log.warning(
            "splice: the kernel rule set (generation %d) is framed: spliced connections are not judged "
            "by it (per-frame rules need a stream parser; see docs/splice.md)",
            gen,
        )


def errno_is_reset(exc: OSError) -> bool:
    return exc.errno in (errno.ECONNRESET, errno.EPIPE)
