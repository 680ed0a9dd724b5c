"""README documents every user-visible option: each config key and each command-line option."""

import dataclasses
import re
import typing
from pathlib import Path

from typer.main import get_command

from sdtune.cli import app
from sdtune.config import SECTIONS, Config

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_lists_every_config_key():
    for section in SECTIONS:
        for f in dataclasses.fields(typing.get_type_hints(Config)[section]):
            assert f"`{section}.{f.name}`" in README, f"{section}.{f.name} is missing from README"


def test_readme_lists_every_command_option():
    for name, command in get_command(app).commands.items():
        assert f"sdtune {name}" in README
        for param in command.params:
            for option in param.opts:
                if option.startswith("--") and option != "--help":
                    assert re.search(rf"`{re.escape(option)}[ `]", README), f"{name} {option} missing from README"
