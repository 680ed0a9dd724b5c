"""Captions as the common tools leave them, and the caption each step trains with.

Sources, first found wins (`caption_for`):

1. "sidecar": `NAME<data.caption_extension>`, then `NAME.caption`, then `NAME.txt` beside the image
   (kohya, OneTrainer; UTF-8, a byte-order mark is fine, else Windows-1252 with a warning); its first
   line that is not blank is the caption, as kohya's sd-scripts reads it (`lines[0]`), and the scan warns
   about files with more; with `data.wildcards` every such line is kept, one picked each time (`render`);
2. "metadata": a `metadata.jsonl` or `metadata.csv` in the image's folder or any folder above it (the
   Hugging Face imagefolder convention of the diffusers examples: `file_name` relative to the metadata
   file's folder, caption in `text`, or `caption`); the nearest file that lists the image wins;
3. "fixed": `data.caption`, one caption for every image (an instance prompt such as "a photo of sks dog");
4. "folder name": the name part of kohya's `N_name` repeat folder ("10_sks dog" -> "sks dog");
5. "file name": `blue_sky-photo.jpg` -> "blue sky photo".

Each time an image is used, `render` makes the caption it trains with as kohya's sd-scripts does
(prefix and suffix, dropout, wildcards, keep separators, tag shuffle and dropout); `fixed` is its
deterministic part (cached text embeddings, validation):

    render("sks dog, red collar, grass, sunny", DataConfig(shuffle_tags=True, keep_tags=1), random.Random(0))
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import random
import re
from pathlib import Path

from sdtune.errors import SdtuneError

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
TEXT_COLUMNS = ("text", "caption")


class CaptionError(Exception):
    """A caption file that cannot be read: the image is skipped with kind "bad caption"."""


def clean(text: str) -> str:
    """Whitespace (newlines included) collapsed to single spaces, ends stripped."""
    return " ".join(text.split())


def read_caption_file(path: Path, every_line: bool = False) -> tuple[str, str, bool]:
    """(caption, encoding, more lines) of a sidecar caption file: its first line that is not blank (with
    `every_line`, data.wildcards: all such lines joined with "\\n", as kohya reads them then); "utf-8"
    (a byte-order mark is fine), "utf-16" (with its byte-order mark, as Notepad's "Unicode"), else "cp1252"
    (Windows-1252: what Notepad and older taggers wrote on Windows; the scan says so); and whether other
    lines that are not blank follow (left out, as kohya leaves them: the scan says so). Only a file that is
    none of these encodings, or holds NUL bytes, is a `CaptionError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaptionError(f"caption {path.name} cannot be read: {exc.strerror or exc}") from None
    encodings = ("utf-16",) if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ("utf-8-sig", "cp1252")
    for encoding in encodings:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as exc:
            failure = exc
            continue
        if "\x00" in text:
            raise CaptionError(f"caption {path.name} holds NUL bytes, so it is not text: save it as UTF-8")
        lines = [line for line in map(clean, text.splitlines()) if line]
        caption = "\n".join(lines) if every_line else (lines[0] if lines else "")
        return caption, encoding.removesuffix("-sig"), len(lines) > 1
    tried = " or ".join({"utf-16": "UTF-16", "utf-8-sig": "UTF-8", "cp1252": "Windows-1252"}[e] for e in encodings)
    raise CaptionError(f"caption {path.name} is not {tried} text (byte 0x{data[failure.start]:02x} at offset "
                       f"{failure.start}): save it as UTF-8") from None


def sidecar(image: Path, extension: str, names: dict[str, str]) -> Path | None:
    """The caption file beside `image`, if any. `names` maps each lower-cased file name in the image's
    folder to its real name, so `IMG_1.TXT` captions `IMG_1.JPG` as `IMG_1.txt` would."""
    for suffix in dict.fromkeys((extension, ".caption", ".txt")):
        name = names.get((image.stem + suffix).lower())
        if name is not None:
            return image.with_name(name)
    return None


def file_name_caption(image: Path) -> str:
    return clean(image.stem.replace("_", " ").replace("-", " "))


def render(caption: str, cfg, rng: random.Random) -> str:
    """The caption an image trains with this time, from its scanned `caption` and the caption keys of `cfg`
    (a `DataConfig`: the data section, or a subset's), step by step as kohya's `process_caption`
    (library/train_util.py) with the same draws from `rng` in the same order: `caption_prefix` and
    `caption_suffix` joined on with a space; dropped to "" with probability `caption_dropout` (drawn only
    when it is above 0); with `wildcards` one of the caption's lines, then each `{a|b}` one of its options
    (`{{` and `}}` are literal braces), else the first line; the tags arranged (`arrange_tags`); the
    `secondary_separator` read as a comma.

    Where sdtune departs from kohya it draws the same numbers: the prefix and suffix go on every line of a
    multi-line caption (kohya puts them before the first and after the last line, so most alternatives
    lose them), empty tags (", ,") are left out, and `keep_tags_separator` is taken out of a caption even
    when nothing shuffles or drops (kohya leaves it in the text the encoder reads)."""
    return _made(caption, cfg, rng, calm=False)


def fixed(caption: str, cfg) -> str:
    """`render` without its random parts: no dropout, shuffle or tag dropout, the first line, each `{a|b}`
    its first option. What `data.cache_text` embeds (the prefix and suffix included) and validation reads."""
    return _made(caption, cfg, _First(), calm=True)


def _made(caption: str, cfg, rng, calm: bool) -> str:
    """`render`'s steps; `calm` leaves out dropout, shuffle and tag dropout (`rng` then makes no draw)."""
    caption = _affixed(caption, cfg)
    if not calm and cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    caption = _wildcards(caption, rng) if cfg.wildcards else caption.split("\n")[0]
    shuffle, drop = (False, 0.0) if calm else (cfg.shuffle_tags, cfg.tag_dropout)
    caption = arrange_tags(caption, cfg.keep_tags_separator, cfg.keep_tags, shuffle, drop, rng)
    return caption.replace(cfg.secondary_separator, ",") if cfg.secondary_separator else caption


class _First:
    """A stand-in for `random.Random` whose every choice is the first: any other draw is an error."""

    @staticmethod
    def choice(options):
        return options[0]


def _affixed(caption: str, cfg) -> str:
    prefix, suffix = cfg.caption_prefix, cfg.caption_suffix
    if not (prefix or suffix):
        return caption
    lines = [f"{prefix} {line}" if prefix else line for line in caption.split("\n")]
    return "\n".join(f"{line} {suffix}" if suffix else line for line in lines)


def _wildcards(caption: str, rng: random.Random) -> str:
    """One line of a multi-line caption, then one option of each `{a|b|c}` (kohya's enable_wildcard)."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    opening, closing = "⦅", "⦆"  # stand-ins for the escaped {{ and }}, longer than any run in the caption
    while opening in caption or closing in caption:
        opening, closing = opening + "⦅", closing + "⦆"
    caption = caption.replace("{{", opening).replace("}}", closing)
    caption = re.sub(r"\{([^}]+)\}", lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(opening, "{").replace(closing, "}")


def arrange_tags(caption: str, separator: str, keep: int, shuffle: bool, drop: float, rng: random.Random) -> str:
    """The caption's comma-separated tags in three parts: a fixed head (before `separator`, or the first
    `keep` tags without one), a flexible middle, and a fixed tail (after a second separator); the middle
    shuffled (`shuffle`), then each of its tags dropped with probability `drop`; joined with ", ". A
    caption with neither, nor a separator, comes back as it is."""
    if separator and separator in caption:
        head, middle = caption.split(separator, 1)
        middle, tail = middle.split(separator, 1) if separator in middle else (middle, "")
        head, middle, tail = ([t.strip() for t in part.split(",") if t.strip()] for part in (head, middle, tail))
    elif shuffle or drop > 0:
        tags = [tag.strip() for tag in caption.strip().split(",")]  # empty ones too: they take draws in kohya
        head, middle, tail = tags[:keep], tags[keep:], []
    else:
        return caption
    if shuffle:
        rng.shuffle(middle)
    if drop > 0:
        middle = [tag for tag in middle if rng.random() >= drop]
    return ", ".join(tag for tag in head + middle + tail if tag)


def shuffle_tags(caption: str, keep: int, rng: random.Random) -> str:
    """The caption's comma-separated tags in a random order drawn from `rng`, the first `keep` in place
    (`arrange_tags` with `shuffle_tags` alone)."""
    return arrange_tags(caption, "", keep, True, 0.0, rng)


# ---------------------------------------------------------------------------------------------------------
# metadata.jsonl / metadata.csv


def read_metadata(folder: Path, names: list[str]) -> dict[str, str]:
    """{normalised file_name: caption} from the metadata file among `names` in `folder` (empty without
    one). A file sdtune cannot read fully is an error that names the file and line, not a silent gap."""
    present = [name for name in METADATA_NAMES if name in names]
    if not present:
        return {}
    if len(present) > 1:
        raise SdtuneError(f"{folder / present[0]} and {present[1]} both caption this folder: keep one")
    path = folder / present[0]
    text = _decode(path)
    rows = _jsonl_rows(path, text) if path.suffix == ".jsonl" else _csv_rows(path, text)
    return {key: caption for key, caption in rows}


def metadata_key(relative: str) -> str:
    """A `file_name`, or an image's path relative to the metadata file's folder, in the form both are
    compared in: forward slashes, no `./` or `dir/..`."""
    return posixpath.normpath(relative.replace("\\", "/"))


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SdtuneError(f"{path} line {line}: not UTF-8 (bad byte at offset {exc.start}); "
                          "save the file as UTF-8") from None


def _require_columns(path: Path, line: int, columns) -> str:
    """The caption column among `columns`; an error unless file_name and a caption column are there."""
    column = next((c for c in TEXT_COLUMNS if c in columns), None)
    if "file_name" not in columns or column is None:
        raise SdtuneError(f"{path} line {line}: needs the columns file_name (the image's path relative to "
                          f"this file's folder) and text (its caption); has {', '.join(map(str, columns)) or 'none'}")
    return column


def _row(path: Path, line: int, row: dict) -> tuple[str, str]:
    column = _require_columns(path, line, row)
    name, caption = row["file_name"], row[column]
    if not isinstance(name, str) or not name.strip():
        raise SdtuneError(f"{path} line {line}: file_name must be a file's path, got {json.dumps(name)}")
    if not isinstance(caption, str):
        raise SdtuneError(f"{path} line {line}: {column} must be a string, got {json.dumps(caption)}")
    return metadata_key(name.strip()), clean(caption)


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, str]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SdtuneError(f"{path} line {line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise SdtuneError(f"{path} line {line}: expected a JSON object like "
                              '{"file_name": "a.png", "text": "a caption"}')
        rows.append(_row(path, line, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        if not reader.fieldnames:
            raise SdtuneError(f"{path} line 1: empty; the first line names the columns: file_name,text")
        _require_columns(path, 1, reader.fieldnames)
        for row in reader:
            if None in row or None in row.values():
                raise SdtuneError(f"{path} line {reader.line_num}: not as many fields as the header has columns "
                                  "(quote captions that contain commas)")
            rows.append(_row(path, reader.line_num, row))
    except csv.Error as exc:
        raise SdtuneError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    return rows
