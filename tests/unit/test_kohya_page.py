"""docs/guide/kohya.md ("Coming from kohya") names only real sdtune keys and options, so the page cannot
drift from the code: every row of its tables maps an sd-scripts option to config keys (`section.key`,
`section.key=value`, `[[data.subsets]] key`) or command-line options (`--out`: `sdtune train`'s; `sdtune
sample --vae`), or says "not supported" / "not needed" / "automatic" and why. Each name is looked up in the
config dataclasses (a value is checked against the key's type and choices) and in the Typer app; every
config key the notes name is checked too, and the page's example command is loaded as `sdtune train`
would load it."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest
from typer.main import get_command

from sdtune.cli import app
from sdtune.config import SECTIONS, Config, DataConfig, _checked_values, load_config, parse_set
from sdtune.errors import SdtuneError

ROOT = Path(__file__).parents[2]
PAGE = ROOT / "docs" / "guide" / "kohya.md"
HEADER = "| sd-scripts | sdtune | notes |"
PLAIN = ("not supported", "not needed", "automatic")  # a row without an sdtune name says which, and why
CODE = re.compile(r"`([^`]+)`")
SUBSET = re.compile(r"\[\[data\.subsets\]\] (\w+)")
CONFIG_KEY = re.compile(rf"(?:{'|'.join(SECTIONS)})\.\w+(?:=\S+)?")


def table_rows(text: str) -> list[list[str]]:
    """The cells of every row under a `| sd-scripts | sdtune | notes |` header."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.strip() == HEADER:
            inside = True
        elif not line.startswith("|"):
            inside = False
        elif inside and not line.startswith("| ---"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
    return rows


def commands() -> dict[str, set[str]]:
    """`sdtune train`, `sdtune data check`, ...: each command's options."""
    found = {}

    def walk(group, prefix):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, f"{prefix} {name}")
            else:
                found[f"{prefix} {name}"] = {opt for param in command.params for opt in param.opts}
    walk(get_command(app), "sdtune")
    return found


def config_problem(token: str) -> str | None:
    """None when `section.key` exists (and `section.key=value` is a value it takes), else why not."""
    section, _, key = token.partition("=")[0].partition(".")
    if key not in {f.name for f in dataclasses.fields(typing.get_type_hints(Config)[section])}:
        return f"{token}: no config key {section}.{key}"
    if "=" in token:
        try:
            _checked_values(section, parse_set(token)[section], "docs/guide/kohya.md")
        except SdtuneError as exc:
            return f"{token}: {exc}"
    return None


def subset_fields() -> set[str]:
    subset = typing.get_args(typing.get_type_hints(DataConfig)["subsets"])[0]
    return {f.name for f in dataclasses.fields(subset)}


def name_problem(token: str, cli: dict[str, set[str]]) -> str | None:
    """None when a name in the sdtune column is a real config key, subset key, option or command."""
    if CONFIG_KEY.fullmatch(token):
        return config_problem(token)
    if match := SUBSET.fullmatch(token):
        return None if match[1] in subset_fields() else f"{token}: [[data.subsets]] has no key {match[1]}"
    if token.startswith("--"):
        return None if token in cli["sdtune train"] else f"{token}: not an option of sdtune train"
    words = token.split()
    for end in range(len(words), 1, -1):
        path = " ".join(words[:end])
        if path in cli:
            wrong = [w for w in words[end:] if w not in cli[path]]
            return f"{token}: {path} has no option {wrong[0]}" if wrong else None
    return f"{token}: not a config key, subset key, option or command"


def page_problems(text: str) -> list[str]:
    cli, problems = commands(), []
    rows = table_rows(text)
    for kohya, sdtune, notes in rows:
        names = CODE.findall(sdtune)
        if not names and not sdtune.startswith(PLAIN):
            problems.append(f"{kohya}: the sdtune cell names nothing and is not one of {PLAIN}: {sdtune!r}")
        if sdtune.startswith("not supported") and not notes:
            problems.append(f"{kohya}: not supported, but the notes do not say why")
        problems += [p for name in names if (p := name_problem(name, cli))]
    for token in CODE.findall(text):  # the notes and the prose name keys too
        if CONFIG_KEY.fullmatch(token) and (problem := config_problem(token)):
            problems.append(problem)
    return problems if rows else ["no table with the header " + HEADER]


def test_every_name_on_the_page_is_a_real_key_or_option():
    problems = page_problems(PAGE.read_text(encoding="utf-8"))
    assert not problems, "docs/guide/kohya.md:\n" + "\n".join(problems)


def test_the_page_covers_the_options_people_use():
    rows = table_rows(PAGE.read_text(encoding="utf-8"))
    kohya = " ".join(row[0] for row in rows)
    for option in ("--pretrained_model_name_or_path", "--dataset_config", "--network_dim", "--network_alpha",
                   "--min_snr_gamma", "--noise_offset", "--masked_loss", "--sample_prompts", "--log_with wandb",
                   "num_repeats", "is_reg", "--max_token_length", "--optimizer_type", "--mixed_precision"):
        assert f"`{option}" in kohya, f"docs/guide/kohya.md has no row for {option}"
    assert len(rows) >= 120


def test_the_check_catches_wrong_names():
    page = "\n".join([HEADER, "| --- | --- | --- |",
                      "| `--a` | `train.no_such_key` | |", "| `--b` | `memory.precision=fp8` | |",
                      "| `--c` | `[[data.subsets]] num_repeats` | |", "| `--d` | `--no-such-option` | |",
                      "| `--e` | `sdtune sample --no-such` | |", "| `--f` | maybe later | |",
                      "| `--g` | not supported | |", "Prose naming `lora.rankk`."])
    problems = "\n".join(page_problems(page))
    for part in ("no config key train.no_such_key", "memory.precision=fp8", "has no key num_repeats",
                 "--no-such-option: not an option", "sdtune sample has no option --no-such", "`--f`",
                 "`--g`: not supported, but", "no config key lora.rankk"):
        assert part in problems, f"{part!r} not reported in:\n{problems}"


def test_the_example_command_loads_as_sdtune_train_would():
    text = PAGE.read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S)[1]
    words = shlex.split(block[block.index("sdtune train"):].replace("\\\n", " "))
    options = dict(zip(words[2::2], words[3::2], strict=True))
    sets = [value for name, value in zip(words[2::2], words[3::2], strict=True) if name == "--set"]
    assert set(options) <= commands()["sdtune train"]
    cfg, _ = load_config(options["--preset"], sets)
    assert (cfg.train.method, cfg.lora.rank, cfg.lora.alpha, cfg.train.max_epochs) == ("lora", 16, 8.0, 10)


@pytest.mark.parametrize("page", ["README.md"])
def test_linked_from(page):
    assert "(docs/guide/kohya.md)" in (ROOT / page).read_text(encoding="utf-8")


def test_the_dataset_rows_agree_with_the_dataset_config_reader():
    """Each key of sd-scripts' dataset config has a row, and a key the reader honours (sdtune/config/dataset_toml.py)
    is mapped to the same sdtune key there as here."""
    from sdtune.config.dataset_toml import FATES

    rows = table_rows(PAGE.read_text(encoding="utf-8"))
    for key, fate in FATES.items():
        row = next((r for r in rows if re.search(rf"`(--)?{key}[`= ]", r[0])), None)
        assert row, f"docs/guide/kohya.md has no row for the dataset config key {key}"
        if fate.key:
            name = fate.key if "." in fate.key else f"[[data.subsets]] {fate.key}"
            assert re.search(rf"`{re.escape(name)}[`=]", row[1]), f"{key}: the reader maps it to {name}: {row[1]}"
