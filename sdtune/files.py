"""File helpers shared by checkpoints, caches and exports: content digests, durable writes, and modes that
follow the umask."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
