"""Run configuration: frozen dataclasses, preset overlays, `--set` overrides, validation, TOML dump.

A preset (`sdtune/config/presets/NAME.toml`, or any path to a `.toml` file) overlays the defaults of the
sections (`sdtune.config.sections`: `[model] [data] [train] [lora] [embedding] [memory] [output]`), plus a `[preset]`
table that describes the card it is for. `--set section.key=value` overrides are applied last. Every
field's docstring (its `doc` metadata) is both the schema's help and the comment written beside the key in
`config.toml`.

    cfg, info = load_config("rtx3050", ["train.max_steps=100"])
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import tomllib

from sdtune.config.rules import SECTIONS, check
from sdtune.config.sections import (
    FIXED,
    FREE,
    NEUTRAL,
    DataConfig,
    EmbeddingConfig,
    LoraConfig,
    MemoryConfig,
    ModelConfig,
    OutputConfig,
    SubsetConfig,
    TrainConfig,
    doc,
    require,
)
from sdtune.errors import SdtuneError

__all__ = ["FIXED", "FREE", "NEUTRAL", "SECTIONS", "Config", "DataConfig", "EmbeddingConfig", "LoraConfig",
           "MemoryConfig", "ModelConfig", "OutputConfig", "PresetInfo", "SubsetConfig", "TrainConfig", "apply_layers",
           "doc", "load_config", "parse_set", "preset_names", "preset_path", "read_preset"]

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        check(self)  # the rules that tie keys of two sections (sdtune.config.rules)

    @property
    def prior_preservation(self) -> bool:
        """DreamBooth prior preservation: each batch pairs instance images with class images."""
        return bool(self.data.class_dir) or any(s.is_reg for s in self.data.subsets)


@dataclass(frozen=True, kw_only=True)
class PresetInfo:
    """The `[preset]` table: what the plan is for. Shown by `sdtune presets`, not used by training."""

    name: str
    card: str = ""
    vram_gib: float = 0.0
    description: str = ""


# ---------------------------------------------------------------------------------------------------------
# Type checking of raw TOML values against the dataclass fields


def _coerce(value, kind, where: str):
    origin = typing.get_origin(kind)
    if origin is types.UnionType:  # `str | None`: a subset's override; TOML has no null, so it is the type
        kind, origin = typing.get_args(kind)[0], None
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(kind)[0]):
        return _tables(value, typing.get_args(kind)[0], where)
    if origin is Literal:
        choices = typing.get_args(kind)
        require(value in choices, f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is tuple:
        require(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
                 f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    require(ok, f"{where} must be {_TYPE_WORDS[kind]}, got {value!r}")
    return value


def _tables(value, kind, where: str) -> tuple:
    """An array of TOML tables (`[[data.subsets]]`) as a tuple of `kind`, every key known and typed."""
    require(isinstance(value, (list, tuple)), f"{where} must be an array of tables ([[...]]), got {value!r}")
    hints, names = typing.get_type_hints(kind), [f.name for f in dataclasses.fields(kind)]
    tables = []
    for n, table in enumerate(value, 1):
        if isinstance(table, kind):
            tables.append(table)
            continue
        require(isinstance(table, dict), f"{where} must be an array of tables ([[...]]), got {table!r}")
        for key in table:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            require(key in names, f"unknown key '{key}' in table {n} of {where}{hint}")
        tables.append(kind(**{key: _coerce(v, hints[key], f"{where} (table {n}) {key}") for key, v in table.items()}))
    return tuple(tables)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _section_type(name: str, source: str) -> type:
    if name not in SECTIONS:
        close = difflib.get_close_matches(name, SECTIONS, n=1)
        hint = f"; did you mean [{close[0]}]?" if close else f"; sections are {', '.join(SECTIONS)}"
        raise SdtuneError(f"unknown section [{name}] in {source}{hint}")
    return typing.get_type_hints(Config)[name]


def _checked_values(name: str, values, source: str) -> dict:
    """`values` of section `name` with every key known and every value of the field's type."""
    require(isinstance(values, dict), f"[{name}] in {source} must be a table of keys")
    kind = _section_type(name, source)
    hints, names = typing.get_type_hints(kind), [f.name for f in dataclasses.fields(kind)]
    checked = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{name}.{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise SdtuneError(f"unknown key '{name}.{key}' in {source}{hint}")
        checked[key] = _coerce(value, hints[key], f"{name}.{key} in {source}")
    return checked


def apply_layers(cfg: Config, layers: list[tuple[dict, str]]) -> Config:
    """Overlay TOML-shaped dicts ({section: {key: value}}, each with its source for error messages) on
    `cfg`. Keys and types are checked layer by layer; cross-key rules once, on the final values, so the
    order of `--set` items never matters."""
    changes: dict[str, dict] = {}
    for data, source in layers:
        for name, values in data.items():
            changes.setdefault(name, {}).update(_checked_values(name, values, source))
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in changes.items()})


def parse_set(item: str) -> dict:
    """`section.key=value` into {section: {key: value}}; value is TOML, or a bare string; a list key given
    one value (`output.sample_prompts=a photo of sks dog`) gets a one-item list."""
    path, sep, text = item.partition("=")
    section, dot, key = path.strip().partition(".")
    require(sep == "=" and dot == "." and section and key,
             f"--set '{item}' is not of the form section.key=value (for example train.max_steps=100)")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    kind = typing.get_type_hints(Config).get(section)
    hint = typing.get_type_hints(kind).get(key) if kind is not None else None
    if hint is str and not isinstance(value, str):
        value = text  # a path like 123 or a word like true stays text
    elif typing.get_origin(hint) is tuple and not isinstance(value, list):
        value = [value if isinstance(value, str) else text]  # one prompt, commas and all, is a one-item list
    return {section: {key: value}}


# ---------------------------------------------------------------------------------------------------------
# Presets


def preset_names() -> list[str]:
    """The shipped presets, numbers in their numeric order (sdxl-8gb before sdxl-12gb)."""
    return sorted((p.stem for p in PRESET_DIR.glob("*.toml")),
                  key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def preset_path(name: str) -> Path:
    if name.endswith(".toml"):
        path = Path(name)
        require(path.is_file(), f"preset file {name} does not exist")
        return path
    path = PRESET_DIR / f"{name}.toml"
    require(path.is_file(), f"unknown preset '{name}'; choose one of {', '.join(preset_names())} "
                             "or pass a path to a .toml file")
    return path


def read_preset(name: str) -> tuple[dict, PresetInfo]:
    path = preset_path(name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SdtuneError(f"{path} is not valid TOML: {exc}") from None
    meta = data.pop("preset", {})
    allowed = {f.name for f in dataclasses.fields(PresetInfo)} - {"name"}
    for key in meta:
        require(key in allowed, f"unknown key 'preset.{key}' in {path.name}; known: {', '.join(sorted(allowed))}")
    return data, PresetInfo(name=path.stem, **meta)


def _method_layer(layers: list[tuple[dict, str]], preset: str) -> list[tuple[dict, str]]:
    """The layer in which the preset's levers that the run's method cannot use give way to it (`GIVE_WAY`),
    each said once; none where the plan serves the method as it is."""
    from sdtune.config.rules import GIVE_WAY

    defaults = Config()
    sections = {name: {f.name: getattr(getattr(defaults, name), f.name)
                       for f in dataclasses.fields(getattr(defaults, name))} for name in SECTIONS}
    given = set()
    for data, source in layers:
        for name, values in data.items():
            sections.setdefault(name, {}).update(values)
            given |= {f"{name}.{key}" for key in values} if source.startswith("--set") else set()
    view = SimpleNamespace(**{name: SimpleNamespace(**values) for name, values in sections.items()})
    out: dict[str, dict] = {}
    for rule in GIVE_WAY:
        name, _, key = rule.key.partition(".")
        if rule.key not in given and sections[name][key] != rule.value and rule.needs(view):
            out.setdefault(name, {})[key] = rule.value
            _say_once(f"{rule.key}={_shown(rule.value)} for this run, not {_shown(sections[name][key])} as the preset "
                      f"{preset} plans: {rule.why}")
    return [(out, "the method's needs")] if out else []


def _shown(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@functools.cache
def _say_once(line: str) -> None:
    logging.getLogger(__name__).info(line)


def load_config(preset: str, overrides: list[str] | tuple[str, ...] = (),
                dataset: str | Path | None = None) -> tuple[Config, PresetInfo]:
    """Defaults, then the preset, then kohya's `dataset` config file if given (`sdtune.config.dataset_toml`),
    then each `--set`: the resolved, validated config."""
    data, info = read_preset(preset)
    layers = [(data, preset_path(preset).name)]
    if dataset is not None:
        from sdtune.config.dataset_toml import dataset_layer

        layers.append(dataset_layer(dataset))
    layers += [(parse_set(item), f"--set {item}") for item in overrides]
    cfg = apply_layers(Config(), layers + _method_layer(layers, preset))
    if cfg.lora.init_from:  # rank, alpha, target and text_encoder follow the file, and the plan gives way to them
        from sdtune.config.lora_file import file_layer

        layers = [*layers, file_layer(cfg.lora, layers)]
        cfg = apply_layers(Config(), layers + _method_layer(layers, preset))
    return cfg, info
