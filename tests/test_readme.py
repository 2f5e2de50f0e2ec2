"""README's cheap commands run as written, so the page cannot drift from the CLI: every command's
``--help``, ``--print_config`` of every config stack it shows, its make targets and its links."""

import re
import shlex
from pathlib import Path

import pytest

from slit_lightning.cli.main import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def shell_lines() -> list[str]:
    """The command lines of README's bash blocks, comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.strip()]


def slit_lines() -> list[list[str]]:
    return [shlex.split(line)[1:] for line in shell_lines() if line.startswith("slit ")]


def subcommand(args: list[str]) -> list[str]:
    """The command (and sub-command) a README line runs: ``index build``, ``fit``, ..."""
    nested = {"data", "index", "bootstrap"}
    return args[:2] if args[0] in nested else args[:1]


def test_the_readme_shows_commands_and_every_one_exists():
    commands = {args[0] for args in slit_lines()}
    assert {"fit", "caption", "ask", "classify", "index", "export"} <= commands
    assert commands <= set(COMMANDS)


@pytest.mark.parametrize(
    "command", sorted({" ".join(subcommand(a)) for a in slit_lines()} | set(COMMANDS))
)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def config_stacks() -> list[list[str]]:
    """Every `slit fit` line of README whose configs are all named (no `...`)."""
    return [a for a in slit_lines() if a[0] == "fit" and "--config" in a and "..." not in a]


@pytest.mark.parametrize("args", config_stacks(), ids=lambda a: " ".join(a[2::2]))
def test_print_config_of_every_config_stack(args, capsys):
    from slit_lightning.cli.train import lightning_cli

    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert all((REPO / c).is_file() for c in configs), configs
    with pytest.raises(SystemExit) as done:
        lightning_cli([a if a not in configs else str(REPO / a) for a in args] + ["--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: slit_lightning.stages." in capsys.readouterr().out


def test_make_targets_and_links_exist():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    used = {shlex.split(line)[1] for line in shell_lines() if line.startswith("make ")}
    assert used and used <= targets
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links and [link for link in links if not (REPO / link).exists()] == []
