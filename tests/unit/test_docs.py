"""The docs stay true to the code: the generated references (docs/reference/config.md, cli.md) are what
docs/generate.py writes today, they name every config key and command-line option, and every link in
the READMEs, CONTRIBUTING.md and docs/ points at a file (and heading) that exists."""

import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

from typer.main import get_command

from sdtune.cli import app
from sdtune.config import SECTIONS, Config

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("generate", ROOT / "docs" / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_generated_references_are_current():
    for path, make in generate.GENERATED.items():
        assert path.is_file() and path.read_text(encoding="utf-8") == make(), (
            f"{path.relative_to(ROOT)} is stale: run {generate.REGENERATE}")


def test_config_reference_lists_every_key():
    text = generate.CONFIG_MD.read_text(encoding="utf-8")
    for section in SECTIONS:
        for f in dataclasses.fields(typing.get_type_hints(Config)[section]):
            assert f"`{section}.{f.name}`" in text, f"{section}.{f.name} is missing from docs/reference/config.md"


def test_cli_reference_lists_every_command_and_option():
    text = generate.CLI_MD.read_text(encoding="utf-8")
    for path, command in generate.commands(get_command(app), "sdtune"):
        assert f"## `{path}`" in text, f"{path} is missing from docs/reference/cli.md"
        for param in command.params:
            for option in param.opts:
                if option.startswith("--") and option != "--help":
                    assert re.search(rf"`{re.escape(option)}[ `]", text), f"{path} {option} missing from cli.md"


def markdown_files():
    pages = ["README.md", "CONTRIBUTING.md", "bench/README.md", "examples/README.md"]
    return [ROOT / page for page in pages] + sorted((ROOT / "docs").rglob("*.md"))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_resolve_to_files_and_headings():
    for page in markdown_files():
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)} links to {target}"
            assert file.exists(), f"{where}, which does not exist"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file), f"{where}: no such heading in {file.name}"


def test_readme_is_the_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 320, f"README.md has {lines} lines: move detail into docs/ (issue 27: about 300)"


def test_readme_names_every_shipped_preset():
    from sdtune.config import preset_names

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in preset_names():
        assert f"`{name}`" in readme, f"preset {name} is missing from README.md's presets table"
