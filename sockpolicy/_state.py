"""Pinned per-network-namespace state directories in bpffs.

Layout: ``<root>/<netns inode>/`` (root defaults to ``/sys/fs/bpf/sockpolicy``) holds the dispatcher's
maps pinned by name, its program (``prog``) and the netns bpf_link (``link``).  Directories are mode 0700
and pins 0600: the tables reveal which services exist, so only root may read them.

A state directory is created complete or not at all: everything is pinned into
``<root>/tmp-<inode>-<pid>`` first (bpffs forbids dots in names) and the directory is then renamed into
place.  ``rename(2)`` onto an existing (non-empty) directory fails, so when two processes race, exactly
one wins; the loser detaches its link, discards its copy and opens the winner's.

Writers serialise with ``flock(LOCK_EX)`` on the state directory's own fd (flock works on bpffs
directories: checked on kernel 6.18).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from sockpolicy import _errors
from sockpolicy._objects import Link, is_bpffs

DEFAULT_ROOT = "/sys/fs/bpf/sockpolicy"
DIR_MODE = 0o700
PIN_MODE = 0o600

# bpffs refuses names containing a dot (EPERM: reserved for its own files), hence no ".tmp-" prefix; the
# final directories are all digits, so "tmp-" cannot collide with them.
_TMP_RE = re.compile(r"tmp-(?P<inode>\d+)-(?P<pid>\d+)(?:-t\d+)?")


def netns_inode(netns: str | os.PathLike[str] | int) -> int:
    """The inode number that names a network namespace (of a path such as ``/run/netns/NAME``, or an fd).

    :raises KeyNotFound: the path does not exist.
    """
    try:
        st = os.fstat(netns) if isinstance(netns, int) else os.stat(netns)
    except FileNotFoundError:
        raise _errors.KeyNotFound(errno.ENOENT, "netns", {"path": os.fspath(netns)}) from None
    return st.st_ino


def ensure_root(root: str | os.PathLike[str]) -> Path:
    """Create the bpffs root directory (mode 0700) if needed.

    :raises BpffsNotMounted: ``root``'s parent is not on bpffs.
    """
    path = Path(os.fspath(root))
    if not path.is_dir():
        if not is_bpffs(path.parent if path.parent.exists() else Path("/")):
            raise _errors.BpffsNotMounted(
                f"{path.parent} is not on a bpffs mount: mount -t bpf bpf /sys/fs/bpf"
            )
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)
    if not is_bpffs(path):
        raise _errors.BpffsNotMounted(f"{path} is not on a bpffs mount: mount -t bpf bpf /sys/fs/bpf")
    return path


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Remove a state directory and every pin in it (pins hold no data of their own). Missing is fine."""
    path = Path(os.fspath(path))
    with contextlib.suppress(FileNotFoundError):
        for entry in path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        path.rmdir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_tmp(root: Path, inode: int) -> None:
    """Remove temp directories left by creators of ``inode``'s state that died before the rename.

    Such a directory may hold an attached, pinned link (of an empty dispatcher, which passes everything);
    it is detached first so it does not linger in the namespace.
    """
    for entry in root.iterdir():
        m = _TMP_RE.fullmatch(entry.name)
        if m is None or int(m["inode"]) != inode or _pid_alive(int(m["pid"])):
            continue
        detach_pinned_link(entry / "link")
        remove_dir(entry)


def detach_pinned_link(path: Path) -> None:
    """Detach the bpf_link pinned at ``path`` (if any), even if other fds or pins hold it."""
    if not path.exists():
        return
    try:
        link = Link.from_pin(path)
    except _errors.KeyNotFound:
        return
    with link, contextlib.suppress(_errors.BpfError):
        link.detach()


def link_netns_inode(link: Link) -> int | None:
    """The inode of the namespace a netns link is attached to; 0 once that namespace is gone.

    Read from ``/proc/self/fdinfo`` (``netns_ino``), which the binding does not expose.
    """
    try:
        text = Path(f"/proc/self/fdinfo/{link.fd}").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("netns_ino:"):
            return int(line.split()[1])
    return None


def create_atomically(root: Path, inode: int, populate: Callable[[Path], Callable[[], None]]) -> Path:
    """Create ``root/<inode>`` complete, or find the one another process created meanwhile.

    :param populate: pins everything into the temp directory it is given; returns an ``undo`` callable
        run when another process won the race (e.g. to detach a link it attached).
    :returns: the final directory path.
    """
    final = root / str(inode)
    # Threads of one process need distinct temp directories: non-main threads add their id.
    tmp = root / f"tmp-{inode}-{os.getpid()}"
    if threading.current_thread() is not threading.main_thread():
        tmp = tmp.with_name(f"{tmp.name}-t{threading.get_ident()}")
    detach_pinned_link(tmp / "link")  # left by a dead process that had our pid
    remove_dir(tmp)
    os.mkdir(tmp, DIR_MODE)
    undo: Callable[[], None] | None = None
    try:
        undo = populate(tmp)
        for entry in tmp.iterdir():
            os.chmod(entry, PIN_MODE)
        os.chmod(tmp, DIR_MODE)
        try:
            os.rename(tmp, final)
            return final
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        # Another process created the state first: ours is discarded, theirs is used.
        undo()
        undo = None
        return final
    except BaseException:
        if undo is not None:
            with contextlib.suppress(Exception):
                undo()
        raise
    finally:
        remove_dir(tmp)


class DirLock:
    """An exclusive writer lock: ``flock`` on the state directory plus a thread lock.

    flock locks belong to the open file description, so threads sharing one fd would not exclude each
    other; the :class:`threading.Lock` covers that.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._thread_lock = threading.Lock()

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise _errors.ClosedError(f"lock on {self.path} is closed")
        return self._fd

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock; raise :class:`NotLoaded` if the directory was removed (e.g. ``unload()``) by
        another holder before we got it."""
        with self._thread_lock:
            fd = self.fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                mine = os.fstat(fd)
                if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
                    raise _errors.NotLoaded(f"sockpolicy state {self.path} was removed (unloaded)")
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
