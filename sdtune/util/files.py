"""File helpers shared by checkpoints, caches and exports: content digests, durable writes, modes that
follow the umask, and the disk: free space checked before a large write, and a write the OS refuses (a full
disk, a read-only folder) turned into one line that says where, how much is needed and how much is free."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from sdtune.errors import SdtuneError


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sync(path: Path) -> None:
    """Flush a file's or a folder's data to the disk, so that a power cut cannot undo a write or rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells (/proc), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (a file, or every file and folder under it) the mode a plain `open()` would: safetensors
    writes 0600 files, which a container or another user could not read beside 0644 JSON."""
    mask = _umask()
    path = Path(path)
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        if not target.is_symlink():  # chmod would change what the link points to
            os.chmod(target, (0o777 if target.is_dir() else 0o666) & ~mask)


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, written whole or not at all (a temporary name beside `path`, renamed
    into place), with the file's mode following the umask."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# the disk: what a write needs, what is free, and one line when a write fails for want of either

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) names the OS error it wraps


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind a failed write, or None: an OSError's own; one a library's error wraps
    (torch.save into an open file raises RuntimeError with the OSError as its context); or one its message
    names (safetensors: "I/O error: No space left on device (os error 28)")."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of causes; never a cycle
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        found = _OS_ERROR.search(str(seen))
        if found:
            return int(found.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def free_bytes(folder: Path) -> int:
    """Bytes free to this user on the filesystem that holds `folder` (or would: its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tensor_bytes(tree) -> int:
    """Bytes of every tensor in `tree` (dicts, lists and tuples of tensors and plain values) as stored."""
    if hasattr(tree, "element_size") and hasattr(tree, "numel"):
        return tree.element_size() * tree.numel()
    if isinstance(tree, dict):
        return sum(tensor_bytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(value) for value in tree)
    return 0


def folder_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


GIB = 2**30  # bytes in a GiB: every figure sdtune prints about memory or disk is in binary units
MIB = 2**20


def size_text(n: int) -> str:
    """'3.21 GiB', '12.0 MiB', '512 KiB': bytes as a person reads them."""
    for unit, scale, digits in (("GiB", GIB, 2), ("MiB", MIB, 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{math.ceil(n / 2**10)} KiB"


def check_space(folder: Path, needed: int, what: str, fix: str) -> None:
    """Refuse with one line, before anything is written, when `folder`'s disk has less than `needed` bytes
    free for `what`; `fix` says what to do."""
    free = free_bytes(folder)
    if free < needed:
        raise SdtuneError(f"not enough disk space for {what} in {folder}: it needs {size_text(needed)} and "
                          f"{size_text(free)} is free; {fix}")


def check_space_all_ranks(world, folder: Path, needed: int, what: str, fix: str) -> None:
    """`check_space` measured by rank 0 (the one that writes; `needed` counts there) and its refusal raised
    on every rank of `world` (a `sdtune.util.world.World`): a rank left to go on would wait forever in the
    next collective (a barrier, FSDP's gather of the weights, the next step's all-reduce)."""
    refused = None
    if world.main:
        try:
            check_space(folder, needed, what, fix)
        except SdtuneError as exc:
            refused = exc
    if world.any(refused is not None):
        raise refused or SdtuneError(f"rank 0 refused {what}: not enough disk space in {folder}")


@contextmanager
def disk_errors(folder: Path, what: str, fix: str, needed: int = 0, cleanup: Callable[[], None] | None = None,
                full_fix: str = ""):
    """Turn a write under `folder` that the OS refuses (a full disk, a read-only or unwritable folder) into
    one SdtuneError line that says which folder, how much `what` needs and how much is free, and `fix`
    (`full_fix` instead for a full disk, when given); `cleanup` (removing what was half written) runs
    first. Errors that are not the OS's pass unchanged."""
    try:
        yield
    except Exception as exc:
        number = os_errno(exc)
        if number is None or isinstance(exc, SdtuneError):
            raise
        if cleanup is not None:
            cleanup()
        full = number in DISK_FULL
        raise SdtuneError(write_failure(folder, what, number, full_fix if full and full_fix else fix,
                                        needed)) from None


def write_failure(folder: Path, what: str, number: int, fix: str, needed: int = 0) -> str:
    """One line for a write of `what` ("": anything) under `folder` that the OS refused with `number`."""
    free = size_text(free_bytes(folder))
    if number in DISK_FULL:
        if not what:
            return f"disk full: {folder} has {free} free; {fix}"
        need = f"needs {size_text(needed)} and " if needed else ""
        return f"disk full: {what} in {folder} {need}{free} is free; {fix}"
    reason = os.strerror(number).lower()
    if not what:
        return f"cannot write to {folder} ({reason}): {fix}"
    return f"cannot write {what} in {folder} ({reason}); {fix}"


def write_text(path: Path, text: str) -> None:
    """Write `text` whole or not at all (a temporary name, renamed), leaving no temporary file behind on a
    failed write (a full disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_root(cache_dir: str) -> Path:
    """`cache_dir`, or else sdtune's folder in the user's cache (`$XDG_CACHE_HOME/sdtune`, `~/.cache/sdtune`)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "sdtune"
