"""Finding training images and their captions, and checking them before step 1.

An image folder is searched recursively for .jpg/.jpeg/.png/.webp files; `NAME.txt` beside an image is
its caption, otherwise the file name is (`red_circle.png` -> "red circle"). Unreadable files are
reported and skipped before training starts.

    scan = scan_folder("images", DataConfig())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdtune.config import DataConfig
from sdtune.errors import SdtuneError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


@dataclass(frozen=True)
class Scan:
    examples: list[Example]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)


def _caption_for(image: Path, extension: str) -> str:
    sidecar = image.with_suffix(extension)
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8-sig").strip()
    return image.stem.replace("_", " ").replace("-", " ").strip()


def _problem(image: Path) -> str | None:
    from PIL import Image

    if image.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(image) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for corrupt data; each means "skip this file"
        return f"not a readable image ({type(exc).__name__})"
    return None


def scan_folder(root: str | Path, cfg: DataConfig) -> Scan:
    """Every usable image under `root` with its caption, and every skipped file with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise SdtuneError(f"data folder {root} does not exist or is not a folder; pass --data DIR with your images")
    examples, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        problem = _problem(path)
        if problem:
            skipped.append((path, problem))
            continue
        try:
            examples.append(Example(path, _caption_for(path, cfg.caption_extension)))
        except UnicodeDecodeError:
            skipped.append((path, f"caption {path.with_suffix(cfg.caption_extension).name} is not UTF-8"))
    if not examples:
        raise SdtuneError(f"no usable images in {root} (looked for {', '.join(IMAGE_SUFFIXES)}; "
                          f"{len(skipped)} skipped); add images or fix --data")
    return Scan(examples, skipped)
