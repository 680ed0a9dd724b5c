"""Finding training images and their captions, and checking every one of them before step 1.

`scan_folder` searches a folder recursively for .jpg .jpeg .png .webp .bmp .gif .tif .tiff files (any
case), skipping hidden files and folders (names starting with "."). Each image gets its caption
(`sdtune.data.captions` says from where), its repeats (kohya's `N_name` folders: the nearest such folder
above the image gives N) and its size as seen, after EXIF orientation (`sdtune.data.verify` checks it).
Every file that training could not use is reported once as a `Skip` and left out, so nothing fails at
step 400. What is used but worth a look (captions read as Windows-1252) is in `Scan.warnings`. Folders
that are not training data are never searched, each said once in `Scan.notes`: the `exclude` folders
(the run's `--out`, the class and validation images) and any sdtune output folder
(`sdtune.util.run_folder.is_run_folder`), whose sample grids would otherwise become training images of the next
run.

    scan = scan_folder("images", DataConfig(), exclude=["images/out"])
    print(scan.summary())     # "12 of 1,040 images skipped: 7 corrupt, 5 too small"
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sdtune.config import DataConfig
from sdtune.data import captions
from sdtune.data.images import set_pixel_limit
from sdtune.data.verify import ImageProblem, check_image
from sdtune.errors import SdtuneError
from sdtune.util.run_folder import is_run_folder, run_files

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REPEAT_FOLDER = re.compile(r"(\d+)_(.*)", re.DOTALL)


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    size: tuple[int, int] = (0, 0)      # (width, height) as the image is seen, after EXIF orientation
    repeats: int = 1                    # kohya's "N_name" folder convention: N
    caption_source: str = "file name"   # "sidecar", "metadata", "fixed", "folder name" or "file name"
    subset: int = 0                     # its data.subsets table (none: the --data folder)


@dataclass(frozen=True)
class Skip:
    path: Path
    kind: str      # "corrupt", "not an image", "empty", "unreadable", "too large", "too small", "bad caption"
    detail: str    # one line for the user


@dataclass(frozen=True)
class Scan:
    examples: list[Example]
    skipped: list[Skip]
    warnings: tuple[str, ...] = ()  # one line each, for files that are used but may not read as meant
    notes: tuple[str, ...] = ()     # one line each, for folders left out on purpose (output folders)

    def summary(self) -> str:
        """ "12 of 1,040 images skipped: 7 corrupt, 5 too small", or "" when nothing was skipped."""
        if not self.skipped:
            return ""
        total = len(self.examples) + len(self.skipped)
        kinds = sorted(Counter(s.kind for s in self.skipped).items(), key=lambda kv: (-kv[1], kv[0]))
        return (f"{len(self.skipped):,} of {total:,} image{'s' if total != 1 else ''} skipped: "
                + ", ".join(f"{n:,} {kind}" for kind, n in kinds))


def scan_folder(root: str | Path, cfg: DataConfig, exclude=()) -> Scan:
    """Every usable image under `root` (but not under the `exclude` folders) with its caption, and every
    skipped file with the reason; an error when `root` is missing or holds no usable image."""
    scan = scan_all(root, cfg, exclude)
    if not scan.examples:
        raise SdtuneError(no_usable_images(Path(root), scan))
    return scan


def no_usable_images(root: Path, scan: Scan) -> str:
    found = f"{scan.summary()}" if scan.skipped else f"found no {'/'.join(IMAGE_SUFFIXES)} file"
    return f"no usable images in {root} ({found}); add images or fix --data"


def scan_all(root: str | Path, cfg: DataConfig, exclude=()) -> Scan:
    """`scan_folder` without the error for an empty result (for `sdtune data check`, which reports first)."""
    root = Path(root)
    if not root.is_dir():
        raise SdtuneError(f"data folder {root} does not exist or is not a folder; pass --data DIR with your images")
    images, metadata, unlisted, notes = [], {}, [], []
    excluded = {os.path.realpath(folder) for folder in exclude if folder}
    for folder, names in _walk(root, unlisted, lambda folder: _not_data(folder, excluded, root, notes)):
        metadata[folder] = captions.read_metadata(folder, names)
        lower = {}
        for name in names:
            lower.setdefault(name.lower(), name)
        images += [(folder / name, lower) for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    images.sort(key=lambda item: item[0].relative_to(root).parts)
    set_pixel_limit(cfg.max_pixels)  # before any thread opens an image
    sizes, problems = _check_all([path for path, _ in images], cfg, root)
    examples, legacy, multiline = [], [], []
    skipped = [Skip(Path(err.filename), "unreadable", f"a folder that cannot be listed ({err.strerror}): its images "
                                                     "are left out") for err in unlisted]
    for (path, names), size in zip(images, sizes, strict=True):
        if isinstance(size, ImageProblem):
            skipped.append(Skip(path, size.kind, size.detail))
            continue
        try:
            caption, source = _caption(path, root, names, metadata, cfg, legacy, multiline)
        except captions.CaptionError as exc:
            skipped.append(Skip(path, "bad caption", str(exc)))
            continue
        examples.append(Example(path, caption, size, _repeat_folder(path, root)[0], source))
    warnings = (*problems, *((_legacy_warning(legacy, root),) if legacy else ()),
                *((_multiline_warning(multiline, root),) if multiline else ()))
    return Scan(examples, skipped, warnings, tuple(notes))


def not_training_folders(cfg: DataConfig) -> tuple[str, ...]:
    """The folders of `cfg` that hold no training images wherever they lie (`exclude` of the scans): the class,
    validation and mask folders (data.mask_dir and the subsets')."""
    return (cfg.class_dir, cfg.validation_dir, cfg.mask_dir, *(s.mask_dir for s in cfg.subsets if s.mask_dir))


def scan_subsets(cfg: DataConfig, exclude=()) -> list[Scan]:
    """One scan per table of `cfg.subsets`, with the subset's caption settings: its examples carry the
    subset's index and repeats (kohya's num_repeats; `N_name` folders inside give no repeats, as sd-scripts
    reads a subset), and with a metadata_file, only the images it lists, captioned by it. Another subset's
    folder inside it is that subset's alone, as sd-scripts reads each image_dir without its subfolders."""
    scans = []
    for index, subset in enumerate(cfg.subsets):
        folder = Path(subset.dir)
        if not folder.is_dir():
            relative = "" if folder.is_absolute() else f" (relative to the current folder, {Path.cwd()})"
            raise SdtuneError(f"data.subsets folder {subset.dir} (subset {index + 1}) is not a folder{relative}: "
                              "fix its dir (image_dir)")
        inner = [other.dir for other in cfg.subsets if _below(other.dir, folder)]  # sd-scripts: theirs alone
        scan = scan_all(folder, cfg.for_subset(index), (*exclude, *inner))
        if subset.metadata_file:
            scan = with_kohya_metadata(scan, Path(subset.metadata_file), folder)
        examples = [dataclasses.replace(e, repeats=subset.repeats, subset=index) for e in scan.examples]
        scans.append(dataclasses.replace(scan, examples=examples))
    return scans


def _below(inner: str, folder: Path) -> bool:
    """Whether folder `inner` lies strictly inside `folder`."""
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(folder))
    return outer in inner.parents


def with_kohya_metadata(scan: Scan, metadata_file: Path, folder: Path) -> Scan:
    """`scan` with only the images that kohya's fine-tuning metadata (`{image key: {"caption", "tags"}}`, a key
    a path relative to `folder` or absolute, with or without its suffix) lists, each captioned as sd-scripts'
    FineTuningDataset does: the caption, then "," and the tags; the others skipped, saying why."""
    import json

    try:
        entries = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SdtuneError(f"metadata_file {metadata_file} cannot be read as JSON: {exc}") from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise SdtuneError(f"metadata_file {metadata_file} must be a JSON object of {{image key: {{\"caption\": ..., "
                          "\"tags\": ...}}}}, as kohya's merge_captions_to_metadata.py writes it")
    listed = {os.path.normpath(folder / key): entry for key, entry in entries.items()}  # an absolute key stays
    examples, skipped = [], list(scan.skipped)
    for example in scan.examples:
        image = os.path.normpath(example.image)
        entry = listed.get(image) or listed.get(os.path.splitext(image)[0])
        if entry is None:
            skipped.append(Skip(example.image, "not in metadata", f"not listed in {metadata_file.name}"))
            continue
        examples.append(dataclasses.replace(example, caption=kohya_metadata_caption(entry), caption_source="metadata"))
    return dataclasses.replace(scan, examples=examples, skipped=skipped)


def kohya_metadata_caption(entry: dict) -> str:
    """sd-scripts' FineTuningDataset caption: `caption`, then its caption_separator "," and `tags` when given."""
    caption, tags = entry.get("caption") or "", entry.get("tags")
    if tags:
        caption = (caption + "," if caption else "") + tags
    return caption


def joined(scans: list[Scan]) -> Scan:
    """The subsets' scans as one: every example and skip, in subset order."""
    return Scan([e for s in scans for e in s.examples], [k for s in scans for k in s.skipped],
                tuple(w for s in scans for w in s.warnings), tuple(n for s in scans for n in s.notes))


def _not_data(folder: Path, excluded: set[str], root: Path, notes: list[str]) -> bool:
    """True for a folder below `root` that is an `exclude` folder or an sdtune output folder; said in `notes`."""
    if os.path.realpath(folder) in excluded:
        why = "the run's output, class, validation or mask folder, or another subset's"
    elif is_run_folder(folder):
        why = "an sdtune output folder: config.toml beside " + ", ".join(run_files(folder))
    else:
        return False
    notes.append(f"not searched for training images: {folder.relative_to(root)}/ ({why})")
    return True


def _shown(paths: list[Path], root: Path) -> str:
    names = [str(p.relative_to(root)) for p in paths]
    return ", ".join(names[:3]) + (f" and {len(names) - 3:,} more" if len(names) > 3 else "")


def _multiline_warning(paths: list[Path], root: Path) -> str:
    return (f"{len(paths):,} caption file{'s have' if len(paths) > 1 else ' has'} more than one line "
            f"({_shown(paths, root)}): only the first is the caption, as kohya's sd-scripts reads it; put a "
            "caption on one line (tags separated by commas) to train on all of it, or set data.wildcards=true to "
            "train on each line in turn")


def _legacy_warning(paths: list[Path], root: Path) -> str:
    return (f"{len(paths):,} caption file{'s are' if len(paths) > 1 else ' is'} not UTF-8 and "
            f"{'were' if len(paths) > 1 else 'was'} read as Windows-1252 ({_shown(paths, root)}): if a caption was "
            "written in another encoding its letters are wrong; save caption files as UTF-8 to be sure")


def _walk(root: Path, unlisted: list[OSError], skip=lambda folder: False):
    """(folder, sorted file names) for `root` and every folder below it, parents first, in name order;
    hidden entries and the folders `skip(folder)` is true for skipped; linked folders followed once (a link
    back up the tree is not a loop). Folders that cannot be listed are added to `unlisted`."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not skip(Path(dirpath) / d))
        yield Path(dirpath), sorted(f for f in filenames if not f.startswith("."))


def _check_all(paths: list[Path], cfg: DataConfig, root: Path) -> tuple[list[tuple[int, int] | ImageProblem], list]:
    """`check_image` for every path not in the scan cache (`sdtune.data.scan_cache`), in threads (Pillow
    decodes without the GIL), results in order; and a warning when the cache cannot be written.
    Pillow's decompression-bomb warning (images between 1x and 2x its limit, data.max_pixels) becomes an
    error here, so such a file is skipped as "too large" instead of printing a warning and passing."""
    from PIL import Image

    from sdtune.data.scan_cache import CheckedImages

    def check(path):
        try:
            return check_image(path, cfg.smallest_side, decode=cfg.check_images == "decode")
        except ImageProblem as problem:
            return problem

    checked = CheckedImages.for_folder(root, cfg)
    stats = [_stat(path) for path in paths]
    results = [checked.get(path, stat) if stat else None for path, stat in zip(paths, stats, strict=True)]
    todo = [i for i, result in enumerate(results) if result is None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for i, result in zip(todo, pool.map(check, [paths[i] for i in todo]), strict=True):
                results[i] = result
                if stats[i]:
                    checked.put(paths[i], stats[i], result)
    checked.keep(paths)
    try:
        checked.save()
    except OSError as exc:
        return results, [f"the scan cache {checked.path} cannot be written ({exc.strerror or exc}): the next run "
                         "checks every image again; set data.cache_dir to a writable folder"]
    return results, []


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None  # check_image reports what is wrong with it


def _caption(path: Path, root: Path, names: dict[str, str], metadata: dict[Path, dict[str, str]],
             cfg: DataConfig, legacy: list[Path], multiline: list[Path]) -> tuple[str, str]:
    """(caption, source) by the precedence of `sdtune.data.captions`; a sidecar read as Windows-1252 is
    added to `legacy`, one with lines after its caption (that data.wildcards does not keep) to `multiline`."""
    sidecar = captions.sidecar(path, cfg.caption_extension, names)
    if sidecar is not None:
        caption, encoding, more = captions.read_caption_file(sidecar, every_line=cfg.wildcards)
        if encoding == "cp1252":
            legacy.append(sidecar)
        if more and not cfg.wildcards:  # with wildcards the other lines are alternatives
            multiline.append(sidecar)
        return caption, "sidecar"
    for folder in _folders_up(path, root):
        entries = metadata.get(folder)
        key = captions.metadata_key(path.relative_to(folder).as_posix())
        if entries and key in entries:
            return entries[key], "metadata"
    if cfg.caption:
        return cfg.caption, "fixed"
    name = _repeat_folder(path, root)[1]
    if name:
        return name, "folder name"
    return captions.file_name_caption(path), "file name"


def _folders_up(path: Path, root: Path):
    """The image's folder, then each folder above it, up to and including `root`."""
    folder = path.parent
    while True:
        yield folder
        if folder == root or folder == folder.parent:
            return
        folder = folder.parent


def _repeat_folder(path: Path, root: Path) -> tuple[int, str]:
    """(N, name) of the nearest kohya `N_name` folder above `path` (N >= 1) and below `root`, else (1, "").
    `root` itself never counts: `--data 2024_photos` does not mean 2024 repeats."""
    for folder in _folders_up(path, root):
        match = REPEAT_FOLDER.fullmatch(folder.name)
        if folder != root and match and int(match.group(1)) >= 1:
            return int(match.group(1)), captions.clean(match.group(2))
    return 1, ""
