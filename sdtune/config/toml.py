"""A resolved config as TOML and back: `config.toml` in every output folder and checkpoint (`sdtune presets
NAME` prints it), and which keys `--resume` may change.

    text = to_toml(cfg, info)      # every key, its doc as a comment
    cfg = from_toml(text, "out/config.toml")
"""

from __future__ import annotations

import dataclasses
import json

import tomllib

from sdtune.config import FREE, NEUTRAL, SECTIONS, Config, PresetInfo, apply_layers


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def to_toml(cfg: Config, info: PresetInfo | None = None) -> str:
    lines = []
    if info is not None:
        lines += [f"# resolved from preset {info.name}; usable as --preset FILE", "[preset]",
                  f"card = {_toml_value(info.card)}",
                  f"vram_gib = {_toml_value(info.vram_gib)}", f"description = {_toml_value(info.description)}", ""]
    for name in SECTIONS:
        section, tables = getattr(cfg, name), []
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if value and isinstance(value, tuple) and dataclasses.is_dataclass(value[0]):
                tables += [(f"{name}.{f.name}", table) for table in value]  # after the section's plain keys
                continue
            lines.append(f"{f.name} = {_toml_value(value)}  # {f.metadata['doc']}")
        lines.append("")
        for where, table in tables:
            lines.append(f"[[{where}]]")
            lines += [f"{f.name} = {_toml_value(getattr(table, f.name))}  # {f.metadata['doc']}"
                      for f in dataclasses.fields(table) if getattr(table, f.name) is not None]
            lines.append("")
    return "\n".join(lines)


def resume_conflicts(saved: Config, now: Config) -> list[str]:
    """The keys `now` changes from `saved` (a checkpoint's config) that `--resume` may not change, each as
    "section.key: old -> new"; empty when the run may continue."""
    conflicts = []
    for name in SECTIONS:
        old, new = getattr(saved, name), getattr(now, name)
        for f in dataclasses.fields(old):
            before, after, rule = getattr(old, f.name), getattr(new, f.name), f.metadata["resume"]
            allowed = rule in (FREE, NEUTRAL) or (callable(rule) and rule(before, after))
            if before != after and not allowed:
                conflicts += _changes(f"{name}.{f.name}", before, after)
    return conflicts


def _changes(key: str, before, after) -> list[str]:
    """"key: old -> new"; for tables ([[data.subsets]]) each changed key of each table, by its number."""
    tables = [isinstance(v, tuple) and all(dataclasses.is_dataclass(t) for t in v) for v in (before, after)]
    if not all(tables):
        return [f"{key}: {before!r} -> {after!r}"]
    if len(before) != len(after):
        return [f"{key}: {len(before)} tables -> {len(after)}"]
    return [f"{key} {n} {f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
            for n, (old, new) in enumerate(zip(before, after, strict=True), 1) for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)]


def from_toml(text: str, source: str) -> Config:
    """Read a config.toml written by `to_toml` (a checkpoint's or an output folder's)."""
    data = tomllib.loads(text)
    data.pop("preset", None)
    return apply_layers(Config(), [(data, source)])
