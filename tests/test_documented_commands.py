"""Every ``python -m rails_lightning ...`` command line shown to a user parses with the current CLI.

Collected from README.md, docs/, benchmarks/RESULTS.md (the docs include it), the comments of configs/ and
sweeps/, and the examples of ``--help``; each is parsed by the parser of its command (the Lightning
subcommands through ``cli.parse_command_line``: nothing loaded, instantiated or trained). A renamed or
removed option then fails here instead of leaving stale instructions behind.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

from conftest import REPO
from rails_lightning import reports, sweep
from rails_lightning.cli import SUBCOMMANDS, parse_command_line
from rails_lightning.commands import COMMANDS, PROG
from rails_lightning.serving.commands import build_index_parser, build_retrieve_parser

PLAIN_PARSERS = {
    "sweep": sweep.build_parser,
    "report": reports.build_parser,
    "index": build_index_parser,
    "retrieve": build_retrieve_parser,
}
#: Words that stand for "more of the same".
ELLIPSES = {"...", "…"}
#: A one-letter capital option value is a number the reader picks (``--seed_everything=S`` for S in 0 1 2).
NUMBER_PLACEHOLDER = re.compile(r"^(--[\w.]+=)[A-Z]$")


def _documents() -> list[Path]:
    docs = [REPO / "README.md", REPO / "benchmarks" / "RESULTS.md", *sorted((REPO / "docs").rglob("*.md"))]
    return [*docs, *sorted((REPO / "configs").rglob("*.yaml")), *sorted((REPO / "sweeps").glob("*.yaml"))]


def _logical_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) with backslash continuations joined; in YAML files, comment text only."""
    out, pending, start = [], "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if path.suffix == ".yaml":
            if "#" not in line:
                continue
            line = line.split("#", 1)[1]
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def _commands_in(text: str) -> list[str]:
    """The command lines that start with ``python -m rails_lightning`` in a line of text: inside inline code
    (`...`) when the line has some, else the rest of the line; shell separators and comments end them."""
    spans = re.findall(r"`([^`]*python -m rails_lightning[^`]*)`", text) or [text]
    found = []
    for span in spans:
        for match in re.finditer(re.escape(PROG), span):
            command = re.split(r"\s(?:&&|\|\||\||;|#)\s|\s#|`|\)\s*$", span[match.start():])[0]
            found.append(command.strip().rstrip(".,;:)"))
    return found


def collect() -> list[tuple[str, str]]:
    """(where, command line) for every documented command."""
    commands = []
    for path in _documents():
        for number, line in _logical_lines(path):
            for command in _commands_in(line):
                commands.append((f"{path.relative_to(REPO)}:{number}", command))
    commands += [(f"rails_lightning/commands.py:{name}", entry.example) for name, entry in COMMANDS.items()]
    return commands


def _arguments(command: str) -> list[str]:
    """The words after ``python -m rails_lightning``, with placeholders (<...>, ..., …) filled or dropped."""
    command = re.sub(r"<[^<>]*>", "PLACEHOLDER", command)
    words = [NUMBER_PLACEHOLDER.sub(r"\g<1>0", word) for word in shlex.split(command[len(PROG):])]
    return [word for word in words if word not in ELLIPSES and not word.startswith("${")]


def check(command: str) -> None:
    """Raise (``ConfigError`` or ``SystemExit``) when the command does not parse; files under configs/ and
    sweeps/ that it names must exist."""
    args = _arguments(command)
    for word in args:
        value = word.split("=", 1)[-1]
        if re.fullmatch(r"(configs|sweeps)/[\w./-]+\.ya?ml", value):
            assert (REPO / value).is_file(), f"{value} does not exist"
    if not args or args[0] in ("--help", "-h"):
        return
    name, rest = args[0], args[1:]
    assert name in COMMANDS, f"unknown command {name!r}"
    if "--help" in rest or "-h" in rest or any(word.endswith(".help") for word in rest):
        return  # help of an option or a class: shown, not parsed
    if name == "sweep" and "--" in rest:  # what follows `--` is added to every trial's fit command
        rest, extra = rest[: rest.index("--")], rest[rest.index("--") + 1 :]
        parse_command_line(["fit", *extra])
    if name in SUBCOMMANDS:
        parse_command_line([name, *rest])
    else:
        PLAIN_PARSERS[name]().parse_args(rest)


COMMAND_LINES = collect()


def test_the_documents_show_commands():
    """The collector finds what it should: every command is shown somewhere, and the README's main job."""
    shown = {_arguments(command)[0] for _, command in COMMAND_LINES if _arguments(command)}
    assert set(COMMANDS) <= shown
    readme = [command for where, command in COMMAND_LINES if where.startswith("README.md")]
    assert f"{PROG} fit" in readme


@pytest.mark.parametrize("where, command", COMMAND_LINES, ids=[f"{w} {c[len(PROG):][:60]}" for w, c in COMMAND_LINES])
def test_documented_command_parses(where, command, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name files relative to the repository root
    monkeypatch.setenv("WANDB_MODE", "disabled")
    try:
        check(command)
    except SystemExit as stop:  # argparse's way of refusing a command line
        if stop.code not in (0, None):
            pytest.fail(f"{where}: `{command}` does not parse (exit {stop.code})")


def test_a_renamed_option_is_caught():
    """The check can fail: an option spelled as before a rename, in each kind of command."""
    from rails_lightning.errors import ConfigError

    with pytest.raises(ConfigError):
        check(f"{PROG} fit --model.init_args.item_dim=32")  # the spelling before the similarity became a class
    with pytest.raises(SystemExit):
        check(f"{PROG} retrieve --index my_index --user 42 --exclude_history")
    with pytest.raises(AssertionError):
        check(f"{PROG} fit --config configs/ml-1m/no_such_config.yaml")
