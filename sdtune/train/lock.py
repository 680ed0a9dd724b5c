"""One sdtune run per output folder: a lock file in `--out`, held for the run's life.

    from sdtune.train.lock import output_lock
    with output_lock(out_dir):   # SdtuneError where another run holds out_dir
        ...train and write into out_dir...

The lock is `fcntl.flock` on `out_dir/.sdtune.lock`, held on a file descriptor open for the whole run. The
kernel decides who holds it, so two runs started at the same moment cannot both win, and it drops the lock
when its process dies in any way (even SIGKILL): a lock file left behind by a dead run is simply locked
again, with one log line naming the run it takes over from. The file's contents (pid, host, start time)
only serve the messages. On leaving the block the file is removed.

Without `fcntl` (Windows) or on a filesystem that refuses `flock`, the lock degrades to the file's
existence (created with O_EXCL): a second run is still refused, but a run that crashed leaves the file
behind; on POSIX a lock whose pid no longer exists on this host is taken over, elsewhere the message says
to delete the file. Two runs racing over a stale file in that mode could both win.

An `--out` that cannot be written (a read-only filesystem, no permission, a full disk) is one SdtuneError
line; on a full disk the holder's record is skipped (it only serves the messages), so that a run stopped
for want of space resumes once some is freed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.util.files import DISK_FULL, disk_errors

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".sdtune.lock"  # in the output folder; whatever checks that `--out` is empty must ignore it
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # a filesystem without flock


@contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Create `out_dir` if needed and hold its lock file until the block ends (yields the file's path).

    Raises `SdtuneError` naming the process that holds it; a lock left by a dead process is taken over,
    with one log line saying so. A second `output_lock` on the same folder in the same process refuses too.
    """
    out = Path(out_dir)
    path = out / LOCK_NAME
    with disk_errors(out, "", "choose another --out", full_fix="free space there, or choose another --out"):
        out.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    try:
        yield path
    finally:
        _release(path, fd)


def _acquire(path: Path) -> int | None:
    """The locked file's descriptor (None: the fallback without flock holds no descriptor)."""
    if fcntl is None:
        return _acquire_by_existence(path)
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), False
        try:
            locked = _flock(fd)
        except BaseException:
            os.close(fd)
            raise
        if locked is None:  # a filesystem without flock: the fallback, where creating the file wins
            if created:
                _write_holder(fd)
            os.close(fd)
            return None if created else _acquire_by_existence(path)
        if not locked:
            holder = _read_holder(path, wait=True)
            os.close(fd)
            raise SdtuneError(_busy_message(path, holder))
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    previous = _parse(os.read(fd, 4096))
    if previous:  # left by a run that died without removing it
        logger.info(_take_over_message(path, previous))
    _write_holder(fd)
    return fd


def _flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: this platform or filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return None
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _release(path: Path, fd: int | None) -> None:
    try:
        path.unlink(missing_ok=True)  # while still locked, so that no one locks the file we remove
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the flock


def _acquire_by_existence(path: Path) -> None:
    """The fallback without flock: whoever creates the file holds the lock."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read_holder(path, wait=True)
            if not _dead(holder):
                raise SdtuneError(_busy_message(path, holder, stale_hint=True)) from None
            logger.info(_take_over_message(path, holder))
            path.unlink(missing_ok=True)
            continue
        try:
            _write_holder(fd)
        finally:
            os.close(fd)
        return None
    raise SdtuneError(_busy_message(path, _read_holder(path, wait=False), stale_hint=True))


def _dead(holder: dict) -> bool:
    """Whether `holder` is known to be gone: a pid on this host that no longer exists (POSIX only)."""
    pid = holder.get("pid")
    if os.name != "posix" or not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        pass
    return False


def _write_holder(fd: int) -> None:
    """Record who holds the lock, if the disk lets us: the record only serves the messages, and a full disk
    (a run that stopped for want of space, resumed once some is freed) must not stop the run here."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise


def _parse(raw: bytes) -> dict:
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _read_holder(path: Path, wait: bool) -> dict:
    """The holder's record; with `wait`, for up to half a second while it has not written it yet."""
    for _ in range(10 if wait else 1):
        try:
            record = _parse(path.read_bytes())
        except OSError:
            record = {}
        if record or not wait:
            return record
        time.sleep(0.05)
    return {}


def _describe(holder: dict) -> str:
    """'pid 1234 on host, since 12:03:44' (the date too when it is not today)."""
    parts = [f"pid {holder.get('pid', '?')}"]
    if holder.get("host"):
        parts[0] += f" on {holder['host']}"
    started = holder.get("started")
    if isinstance(started, (int, float)):
        when = datetime.fromtimestamp(started)
        parts.append("since " + when.strftime("%H:%M:%S" if when.date() == datetime.now().date()
                                              else "%Y-%m-%d %H:%M:%S"))
    return ", ".join(parts)


def _busy_message(path: Path, holder: dict, stale_hint: bool = False) -> str:
    who = f" ({_describe(holder)})" if holder else ""
    hint = f", or delete {path} if that run is gone" if stale_hint else ""
    return (f"{path.parent}/ is in use by another sdtune run{who}; wait for it to finish{hint}, "
            "or choose another --out")


def _take_over_message(path: Path, holder: dict) -> str:
    return f"{path.parent}/: taking over the lock of a run that is no longer running ({_describe(holder)})"
