"""The one writer of output files and directories: whole or not at all, readable by the group,
no leftovers of killed runs, one writer at a time.

Every output of the package goes through :func:`atomic_file` or :func:`atomic_directory` (or the
convenience writers :func:`write_bytes`, :func:`write_text`, :func:`write_json` built on them):

* **Atomic.** The caller writes into a temporary beside the target, in the same directory; on success
  it is renamed over the target, so readers see the old output or the new one, never a partial one.
  On any exception (or ``KeyboardInterrupt``) the temporary is removed and the target is left as it was.
* **Umask.** The temporary is created, and before the rename set, to ``0o666 & ~umask`` (files) or
  ``0o777 & ~umask`` (directories): outputs get the permissions any other file of the user would get.
* **Stale temporaries.** Temporaries are named ``.NAME.tmp-<host>-<pid>-<8 hex><suffix>`` (``NAME``
  is the target's name, ``<suffix>`` its extension for files so writers that pick the format from it
  still work). A process killed with SIGKILL cannot clean up; the next write of the same target removes
  the temporaries of that target whose writer was on this host and is no longer running. Temporaries of
  live processes or of other hosts are left alone. :func:`remove_stale_temporaries` does the same for a
  whole directory.
* **Stopped runs.** While a write is in progress in the main thread, SIGTERM (what schedulers and
  ``timeout`` send) raises ``SystemExit(143)`` instead of ending the process at once, so the temporary
  is removed as for any other exception; a handler the program installed itself is left in place.
* **Lock.** A write holds an exclusive ``flock`` on ``.NAME.lock`` beside the target from before the
  temporary is created until after the rename. A second process (or thread) writing the same target
  waits up to ``lock_timeout`` seconds (default :data:`LOCK_TIMEOUT_S`) for the first to finish, then
  writes its own output; if the first is still writing it stops with a one-line
  :class:`OutputLockedError` naming the target. ``lock_timeout=0`` fails at once. The lock file is
  removed by its holder on release (a killed holder leaves an unlocked one, which the next writer
  reuses and removes), so a finished run leaves only its outputs; lock files are hidden and lie beside
  the target, never inside an output directory.

Locks and stale-temporary checks see processes on this host only (``flock`` also works across hosts on
NFS mounts with locking enabled; liveness of a writer on another host cannot be checked, so its
temporaries are kept).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

from pipeline.errors import PipelineError

LOCK_TIMEOUT_S = 60.0
"""Default time (seconds) a writer waits for another process writing the same target."""


class OutputLockedError(PipelineError):
    """Another process holds the lock of the output being written."""

    def __init__(self, target, lock_path, timeout: float, holder: str = ""):
        self.target, self.lock_path = str(target), str(lock_path)
        who = f" ({holder})" if holder else ""
        super().__init__(f"{self.target}: another process{who} is writing this output; "
                         f"gave up after {timeout:g} s (lock file {self.lock_path})")


# -- umask ---------------------------------------------------------------------------------------
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``); elsewhere
    by setting and restoring it under a module lock (safe among threads that use this module)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def _dir_mode() -> int:
    return 0o777 & ~current_umask()


# -- temporary names -----------------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _temp_path(target: Path, suffix: str) -> Path:
    rand = secrets.token_hex(4)
    return target.with_name(f".{target.name}.tmp-{_host()}-{os.getpid()}-{rand}{suffix}")


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]{8})(?P<suffix>\.[^.]*)?$")


def _parse_temp(name: str):
    """(target name, host, pid) of a temporary's file name, or None if it is not one of ours."""
    m = _TEMP_RE.match(name)
    if m is None:
        return None
    return m.group("name"), m.group("host"), int(m.group("pid"))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(directory, name: str | None = None) -> list[Path]:
    """Remove the temporaries in ``directory`` left by killed writers on this host (of the target
    ``name`` only, if given); returns the removed paths. Temporaries of running processes and of other
    hosts are kept."""
    directory = Path(directory)
    host = _host()
    removed = []
    prefix = f".{name}.tmp-" if name is not None else "."
    try:
        entries = [e for e in os.listdir(directory) if e.startswith(prefix)]
    except FileNotFoundError:
        return removed
    for entry in entries:
        parsed = _parse_temp(entry)
        if parsed is None or (name is not None and parsed[0] != name):
            continue
        _, h, pid = parsed
        if h == host and not pid_alive(pid):
            _remove(directory / entry)
            removed.append(directory / entry)
    return removed


# -- lock ----------------------------------------------------------------------------------------
def _holder(lock_path: Path) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return lock_path.read_text().strip()
    return ""


def _acquire(target: Path, timeout: float) -> tuple[int, Path]:
    lock_path = _lock_path(target)
    deadline = time.monotonic() + max(float(timeout), 0.0)
    wait = 0.02
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # a lock file of another user: locking needs only a read descriptor
            fd = os.open(lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            if time.monotonic() >= deadline:
                raise OutputLockedError(target, lock_path, timeout, _holder(lock_path)) from None
            time.sleep(min(wait, max(deadline - time.monotonic(), 0.0)))
            wait = min(wait * 2, 0.5)
            continue
        # the previous holder unlinks the lock file before releasing it: make sure ours is still the one
        # at lock_path, else we hold a lock nobody else can see
        try:
            st = os.stat(lock_path)
            same = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {_host()}".encode())
        return fd, lock_path


def _release(fd: int, lock_path: Path) -> None:
    try:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(lock_path)  # while still holding it: see _acquire
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(target: Path, timeout: float):
    fd, lock_path = _acquire(target, timeout)
    try:
        remove_stale_temporaries(target.parent, target.name)
        yield
    finally:
        _release(fd, lock_path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_as_exit():
    """Within the block, SIGTERM raises SystemExit(143) (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- writers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(target, *, lock_timeout: float = LOCK_TIMEOUT_S, fsync: bool = True):
    """Yield the path of an empty temporary file beside ``target`` to write (open it, or hand it to
    ``torch.save``, ``HDUList.writeto(..., overwrite=True)``, ``savefig``: it ends with the target's
    extension). On success it gets mode ``0o666 & ~umask``, is fsynced (``fsync``) and renamed over
    ``target``; on any error it is removed and ``target`` is left as it was. Holds the target's lock
    (waits up to ``lock_timeout`` seconds, then :class:`OutputLockedError`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_exit(), _locked(target, lock_timeout):
        tmp = _temp_path(target, target.suffix)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            yield tmp
            os.chmod(tmp, _file_mode())
            if fsync:
                _fsync(tmp)
            os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise


@contextlib.contextmanager
def atomic_directory(target, *, lock_timeout: float = LOCK_TIMEOUT_S):
    """Yield an empty temporary directory beside ``target`` to fill. On success it gets mode
    ``0o777 & ~umask`` and replaces ``target`` (an existing one is renamed aside, the new one renamed
    in, the old one deleted: a kill between the two renames leaves no target, never a mixed one); on
    any error it is removed and ``target`` is left as it was. Holds the target's lock like
    :func:`atomic_file`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_exit(), _locked(target, lock_timeout):
        tmp = _temp_path(target, "")
        os.mkdir(tmp, 0o700)
        try:
            yield tmp
            os.chmod(tmp, _dir_mode())
            if os.path.lexists(target):
                aside = _temp_path(target, "")
                os.replace(target, aside)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(aside, target)
                    raise
                _remove(aside)
            else:
                os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise


def write_bytes(path, data: bytes, **kw) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_file` (keywords go to it); returns the path."""
    with atomic_file(path, **kw) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str, encoding: str = "utf-8", **kw) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_file` (keywords go to it); returns the path."""
    return write_bytes(path, text.encode(encoding), **kw)


def write_json(path, obj, *, indent: int | None = 1, lock_timeout: float = LOCK_TIMEOUT_S, fsync: bool = True,
               **json_kw) -> Path:
    """Write ``json.dumps(obj, indent=indent, **json_kw)`` to ``path`` through :func:`atomic_file`
    (``lock_timeout`` in seconds and ``fsync`` go to it). The text is built first, so an object that
    cannot be serialised leaves ``path`` untouched."""
    return write_text(path, json.dumps(obj, indent=indent, **json_kw), lock_timeout=lock_timeout, fsync=fsync)
