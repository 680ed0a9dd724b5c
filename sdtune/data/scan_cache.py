"""What the scan found about each image, remembered by (path, size, mtime): a warm start opens no image.

    checked = CheckedImages.for_folder(root, cfg)      # cfg.cache_dir/scan/<folder digest>.json
    known = checked.get(path, stat)                    # (w, h), an ImageProblem, or None: check it
    checked.put(path, stat, result); checked.save()
    digests = FileDigests.for_cache(cfg)               # each file's sha256 (the latent cache's key), the same way

An entry counts only while the file has the size and modification time (to the nanosecond) it had when
it was checked, under the same check (decode or headers, smallest side, data.max_pixels); anything else is
checked again.
The file is one JSON object, written whole (a temporary name, renamed) after each scan; a damaged one
is ignored and rewritten; one that cannot be written (a full disk) leaves no temporary file and only costs
the next run its checks (the callers warn). `data.scan_cache=false` keeps nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sdtune.data.cache import cache_root
from sdtune.data.verify import ImageProblem
from sdtune.util.files import write_text

VERSION = 2  # 2: a problem names the size as seen (EXIF orientation), not as stored


class CheckedImages:
    def __init__(self, path: Path | None, check: str):
        self.path, self.check = path, check
        self.entries: dict[str, list] = {}
        self.changed = False
        if path is not None:
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                if stored.get("version") == VERSION and stored.get("check") == check:
                    self.entries = stored["images"]
            except (OSError, ValueError, KeyError, AttributeError):
                pass  # none yet, or damaged: every image is checked and the file rewritten

    @classmethod
    def for_folder(cls, root: Path, cfg) -> CheckedImages:
        check = f"{cfg.check_images}:{cfg.smallest_side}:{cfg.max_pixels}"
        if not cfg.scan_cache:
            return cls(None, check)
        digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
        return cls(cache_root(cfg.cache_dir) / "scan" / f"{digest}.json", check)

    def get(self, path: Path, stat: os.stat_result):
        entry = self.entries.get(str(path))
        if entry is None or entry[:2] != [stat.st_size, stat.st_mtime_ns]:
            return None
        result = entry[2]
        return ImageProblem(result[1], result[2]) if result[0] == "problem" else (result[0], result[1])

    def put(self, path: Path, stat: os.stat_result, result) -> None:
        if isinstance(result, ImageProblem):
            if result.kind == "unreadable":  # the disk or a permission: worth trying again next time
                return
            value = ["problem", result.kind, result.detail]
        else:
            value = list(result)
        self.entries[str(path)] = [stat.st_size, stat.st_mtime_ns, value]
        self.changed = True

    def save(self) -> None:
        """Write the entries (those of images the scan no longer finds are dropped by `keep`)."""
        if self.path is None or not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps({"version": VERSION, "check": self.check, "images": self.entries}))

    def keep(self, paths: list[Path]) -> None:
        """Forget images that are no longer in the folder."""
        wanted = {str(p) for p in paths}
        if len(wanted) != len(self.entries) or any(k not in wanted for k in self.entries):
            self.entries = {k: v for k, v in self.entries.items() if k in wanted}
            self.changed = True


class FileDigests:
    """Each file's sha256 (the latent cache keys images by content), remembered by (path, size, mtime) in
    cache_dir/scan/digests.json, so that a warm start with cached latents reads no image's bytes."""

    def __init__(self, path: Path | None):
        self.path, self.known, self.changed = path, {}, False
        if path is not None:
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                self.known = stored["files"] if stored.get("version") == VERSION else {}
            except (OSError, ValueError, KeyError, AttributeError):
                pass

    @classmethod
    def for_cache(cls, cfg) -> FileDigests:
        return cls(cache_root(cfg.cache_dir) / "scan" / "digests.json" if cfg.scan_cache else None)

    def of(self, file: Path) -> str:
        from sdtune.util.files import sha256_file

        stat = file.stat()
        entry = self.known.get(str(file))
        if entry is not None and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            return entry[2]
        digest = sha256_file(file)
        self.known[str(file)] = [stat.st_size, stat.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        """Merge what this process learnt into the file (another process may have written it meanwhile)."""
        if self.path is None or not self.changed:
            return
        merged = {**FileDigests(self.path).known, **self.known}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps({"version": VERSION, "files": merged}))
        self.changed = False
