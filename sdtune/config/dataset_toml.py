"""kohya sd-scripts' dataset config (its `--dataset_config` TOML) read into sdtune's keys: `--data dataset.toml`.

    layer = dataset_layer("dataset.toml")   # ({"data": {..., "subsets": [...]}, "train": {...}}, source)

The file's `[general]`, `[[datasets]]` and `[[datasets.subsets]]` inherit as sd-scripts' `config_util`
does (a subset's key, else its dataset's, else general's; docs/config_README-en.md). The datasets' own keys
(resolution, batch_size, buckets) become the [data] and [train] keys, the subsets `data.subsets`. Every key
has one fate, in `FATES`: honoured (mapped to an sdtune key), warned (one line naming it and why sdtune does
not do it), or refused (one error line: it cannot be honoured safely). A key kohya does not know is a
warning, as a typo should be. Relative folders are read from the current folder, as sd-scripts reads them
(and written absolute into the run folder's config.toml).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import tomllib

from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

DATASET, SUBSET, OWN = "dataset", "subset", "own"  # where a key may stand: up to [[datasets]], anywhere, a subset


@dataclass(frozen=True)
class Fate:
    where: str           # DATASET keys: [general] or [[datasets]]; SUBSET keys: any level; OWN: a subset only
    key: str = ""        # honoured: the sdtune key ("data.x", "train.x", or a subset's field); empty: not honoured
    why: str = ""        # warned (with `harmless`, kohya's default that needs no warning) or refused (`refuse`)
    harmless: object = None
    refuse: bool = False


_NOT_CACHED = "sdtune keeps its own caches (data.cache_latents, data.cache_text)"
FATES: dict[str, Fate] = {
    # [[datasets]] (and [general]): one value for the run
    "resolution": Fate(DATASET, "data.resolution"),
    "batch_size": Fate(DATASET, "train.batch_size"),
    "enable_bucket": Fate(DATASET, "data.buckets"),
    "min_bucket_reso": Fate(DATASET, "data.min_side"),
    "max_bucket_reso": Fate(DATASET, "data.max_side"),
    "bucket_reso_steps": Fate(DATASET, why="sdtune's bucket sides step by 64", harmless=64),
    "bucket_no_upscale": Fate(DATASET, why="sdtune resizes every image to fill its bucket (images smaller than "
                              "data.min_side are skipped)", harmless=False),
    "prior_loss_weight": Fate(DATASET, "train.prior_loss_weight"),
    "max_token_length": Fate(DATASET, "data.max_token_length"),
    "network_multiplier": Fate(DATASET, why="sdtune trains one network at its full strength", harmless=1.0),
    "debug_dataset": Fate(DATASET, why="`sdtune data check` shows what training sees", harmless=False),
    "validation_seed": Fate(SUBSET, why="the validation split is seeded by train.seed"),
    "validation_split": Fate(SUBSET, why="use data.validation_split (one share of all images)", harmless=0.0),
    "resize_interpolation": Fate(SUBSET, why="sdtune resizes with Pillow's bicubic filter"),
    # [[datasets.subsets]] (and above): a subset's own
    "num_repeats": Fate(SUBSET, "repeats"),
    "class_tokens": Fate(SUBSET, "caption"),
    "caption_extension": Fate(SUBSET, "caption_extension"),
    "shuffle_caption": Fate(SUBSET, "shuffle_tags"),
    "keep_tokens": Fate(SUBSET, "keep_tags"),
    "keep_tokens_separator": Fate(SUBSET, "keep_tags_separator"),
    "secondary_separator": Fate(SUBSET, "secondary_separator"),
    "enable_wildcard": Fate(SUBSET, "wildcards"),
    "caption_dropout_rate": Fate(SUBSET, "caption_dropout"),
    "caption_tag_dropout_rate": Fate(SUBSET, "tag_dropout"),
    "caption_prefix": Fate(SUBSET, "caption_prefix"),
    "caption_suffix": Fate(SUBSET, "caption_suffix"),
    "flip_aug": Fate(SUBSET, "random_flip"),
    "random_crop": Fate(SUBSET, "center_crop"),  # negated
    "caption_separator": Fate(SUBSET, why="sdtune's tags are separated by commas", harmless=","),
    "color_aug": Fate(SUBSET, why="sdtune has no colour augmentation", harmless=False),
    "face_crop_aug_range": Fate(SUBSET, why="sdtune has no face-crop augmentation"),
    "caption_dropout_every_n_epochs": Fate(SUBSET, why="sdtune drops captions at random (caption_dropout_rate), "
                                           "not by epoch", harmless=0),
    "token_warmup_min": Fate(SUBSET, why="sdtune has no token warmup", harmless=1),
    "token_warmup_step": Fate(SUBSET, why="sdtune has no token warmup", harmless=0),
    "cache_info": Fate(SUBSET, why=_NOT_CACHED, harmless=False),
    "custom_attributes": Fate(SUBSET, why="sdtune's methods take no per-subset attributes"),
    "image_dir": Fate(OWN, "dir"),
    "is_reg": Fate(OWN, "is_reg"),
    "metadata_file": Fate(OWN, "metadata_file"),
    "alpha_mask": Fate(OWN, "data.masked_loss"),
    "conditioning_data_dir": Fate(OWN, "mask_dir"),  # kohya's masked loss reads the masks from it
}
RUN_KEYS = [key for key, fate in FATES.items() if fate.where == DATASET and fate.key]


def dataset_layer(path: str | Path) -> tuple[dict, str]:
    """The file as a config layer ({section: {key: value}}, its source) for `sdtune.config.apply_layers`;
    each key sdtune does not honour said once as a warning."""
    path, warned = Path(path), {}
    layer = translate(_read(path), path.name, warned)
    for line in warned.values():
        logger.warning(line)
    return layer, f"dataset config {path.name}"


def dataset_sets(path: str | Path) -> list[str]:
    """The file's run keys ([data] and [train], the subsets aside) as `--set` items, read without a word:
    what `--preset auto` plans the memory for."""
    path = Path(path)
    layer = translate(_read(path), path.name, {})
    return [f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
            for section, values in layer.items() for key, value in values.items() if key != "subsets"]


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SdtuneError(f"dataset config {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SdtuneError(f"dataset config {path} is not valid TOML: {exc}") from None


def translate(raw: dict, name: str, warned: dict[str, str]) -> dict:
    """The sdtune layer of a parsed dataset config; the lines of keys not honoured go into `warned`."""
    general = _table(raw.get("general", {}), "[general]", name)
    for key in set(raw) - {"general", "datasets"}:  # sd-scripts reads only these two tables
        warned[key] = f"{key} at the top level of {name} is not read, as sd-scripts does not: put it in [general]"
    datasets = raw.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise SdtuneError(f"dataset config {name} has no [[datasets]] table: a dataset config lists its datasets, "
                          "each with [[datasets.subsets]] naming an image_dir")
    runs, subsets = [], []
    for n, dataset in enumerate(datasets, 1):
        dataset = _table(dataset, f"[[datasets]] {n}", name)
        merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        _check_levels(merged, f"[[datasets]] {n} (or [general])", name)
        for key, value in merged.items():
            _warn(key, value, DATASET, name, warned)
        runs.append({key: _square(merged[key]) for key in RUN_KEYS if key in merged})
        tables = dataset.get("subsets", [])
        if not isinstance(tables, list) or not tables:
            raise SdtuneError(f"[[datasets]] {n} of {name} has no [[datasets.subsets]]: give it one with image_dir")
        for m, subset in enumerate(tables, 1):
            where = f"[[datasets.subsets]] {m} of [[datasets]] {n}"
            _check_subset_keys(_table(subset, where, name), where, name)
            subsets.append(_subset({**merged, **subset}, where, name, warned))
    layer = _run_layer(runs, name, warned)
    masks = {bool(s.pop("alpha_mask", False)) for s in subsets}
    if True in masks or any(s.get("mask_dir") for s in subsets):  # kohya's masked loss: alpha_mask, or the
        layer["data"]["masked_loss"] = True                         # conditioning_data_dir images as masks
        if len(masks) > 1:
            warned["alpha_mask"] = (f"alpha_mask is set for some subsets of {name} and not others: data.masked_loss "
                                    "is one switch for the run, so every image with an alpha channel trains masked")
    layer["data"]["subsets"] = subsets
    return layer


def _square(value):
    """[512, 512] as 512, so that two ways of writing one resolution agree."""
    return value[0] if isinstance(value, list) and len(value) == 2 and value[0] == value[1] else value


def _table(value, where: str, name: str) -> dict:
    if not isinstance(value, dict):
        raise SdtuneError(f"{where} of dataset config {name} must be a table, got {value!r}")
    return value


def _known(table: dict, allowed: set[str], where: str, name: str, warned: dict[str, str]) -> None:
    for key in table:
        if key not in allowed and key not in FATES:
            warned[key] = f"{key} in {where} of {name} is not a key of kohya's dataset config: ignored (a typo?)"


def _check_levels(merged: dict, where: str, name: str) -> None:
    for key in merged:
        if key in FATES and FATES[key].where == OWN:
            raise SdtuneError(f"{key} in {where} of {name}: it belongs to each [[datasets.subsets]] table, as in "
                              "kohya's sd-scripts")


def _check_subset_keys(subset: dict, where: str, name: str) -> None:
    """A dataset's key in a subset table is an error, as sd-scripts' schema makes it: it would be lost."""
    for key in subset:
        if key in FATES and FATES[key].where == DATASET:
            raise SdtuneError(f"{key} in {where} of {name}: it belongs to its [[datasets]] table (or [general]), as "
                              "in kohya's sd-scripts; move it there")


def _run_layer(runs: list[dict], name: str, warned: dict[str, str]) -> dict:
    """The [data] and [train] keys of the datasets, which must agree: sdtune draws every batch from one
    stream at one resolution and batch size."""
    for key in RUN_KEYS:
        values = {repr(run.get(key)) for run in runs}
        if len(values) > 1:
            raise SdtuneError(f"the datasets of {name} differ in {key} ({', '.join(sorted(values))}): sdtune trains "
                              f"all images in one stream with one {key}; give every [[datasets]] the same {key}, "
                              "or train them in separate runs")
    run = runs[0]
    if not isinstance(run.get("enable_bucket", False), bool):  # "false" would read as true
        raise SdtuneError(f"enable_bucket in {name} must be true or false, got {run['enable_bucket']!r}")
    layer: dict = {"data": {"buckets": run.get("enable_bucket", False)}}  # kohya's default: no buckets
    if "resolution" in run:
        layer["data"]["resolution"] = _resolution(run["resolution"], layer["data"]["buckets"], name, warned)
    for key, value in run.items():
        if key not in ("resolution", "enable_bucket"):
            section, _, field = FATES[key].key.partition(".")
            layer.setdefault(section, {})[field] = value
    return layer


def _resolution(value, buckets: bool, name: str, warned: dict[str, str]) -> int:
    """kohya's resolution (a side, or [width, height]) as sdtune's one side: buckets hold side x side pixels."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise SdtuneError(f"resolution in {name} must be a number or [width, height], got {value!r}")
    width, height = value
    side = math.isqrt(width * height)
    if width != height:
        if side * side != width * height or side % 8:
            raise SdtuneError(f"resolution = {value} in {name}: sdtune's buckets hold side x side pixels and "
                              f"{width}x{height} is no square of a multiple of 8; give a square resolution")
        if not buckets:
            warned["resolution"] = (f"resolution = {value} in {name} without enable_bucket: sdtune crops every "
                                    f"image {side}x{side} (the same area), not {width}x{height}")
    return side


def _warn(key: str, value, where: str, name: str, warned: dict[str, str]) -> bool:
    """True for a key of `where` (DATASET or SUBSET) that sdtune does not do, said once unless harmless."""
    fate = FATES.get(key)
    if fate is None or fate.where != where or fate.key or fate.refuse:
        return False
    if value != fate.harmless and key not in warned:
        warned[key] = f"{key} = {value!r} in {name} is not honoured: {fate.why}"
    return True


def _subset(merged: dict, where: str, name: str, warned: dict[str, str]) -> dict:
    """One `[[data.subsets]]` table from a kohya subset with what it inherits."""
    _known(merged, {"subsets"}, where, name, warned)
    table: dict = {}
    for key, value in merged.items():
        fate = FATES.get(key)
        if fate is None or fate.where == DATASET or _warn(key, value, SUBSET, name, warned):
            continue
        if fate.refuse:
            raise SdtuneError(f"{key} in {where} of {name}: {fate.why}; remove that subset")
        table["alpha_mask" if key == "alpha_mask" else fate.key] = value  # alpha_mask: data.masked_loss, after
    if "center_crop" in table:
        table["center_crop"] = not table["center_crop"]  # kohya's random_crop
    if "dir" not in table:
        raise SdtuneError(f"{where} of {name} has no image_dir: sdtune reads a subset's images from its folder "
                          "(a metadata_file's captions need it too)")
    _check_folder(table, where, name)
    return table


def _check_folder(table: dict, where: str, name: str) -> None:
    relative = "" if Path(table["dir"]).is_absolute() else f" (relative to the current folder, {Path.cwd()})"
    if not Path(table["dir"]).is_dir():
        raise SdtuneError(f"image_dir {table['dir']} of {where} in {name} is not a folder{relative}: fix the path")
    if table.get("metadata_file") and not Path(table["metadata_file"]).is_file():
        raise SdtuneError(f"metadata_file {table['metadata_file']} of {where} in {name} does not exist{relative}")
    if table.get("mask_dir") and not Path(table["mask_dir"]).is_dir():
        raise SdtuneError(f"conditioning_data_dir {table['mask_dir']} (the masks) of {where} in {name} is not a "
                          f"folder{relative}: fix the path")
    for key in ("dir", "metadata_file", "mask_dir"):  # the run folder's config.toml then resumes from any folder
        if table.get(key):
            table[key] = str(Path(table[key]).absolute())
