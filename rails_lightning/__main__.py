"""``python -m rails_lightning COMMAND``: ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI
subcommands; ``sweep``, ``report``, ``index`` and ``retrieve`` are plain commands.

Errors a user can fix (bad data, config, checkpoint; a diverged training; a failed sweep) are printed
as one line and exit with status 1; ``--debug`` anywhere on the command line, or
``RAILS_LIGHTNING_DEBUG=1``, shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from rails_lightning.commands import COMMANDS, PROG, overview
from rails_lightning.errors import UserError

DEBUG_FLAG = "--debug"


def _run(argv: list[str], command_line: bool) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        return 0
    command = argv[0]
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)} (see `{PROG} --help`)")
    if command == "sweep":
        from rails_lightning import sweep

        return sweep.main(argv[1:])
    if command == "report":
        from rails_lightning import reports

        return reports.main(argv[1:])
    if command in ("index", "retrieve"):
        from rails_lightning.serving import commands

        return (commands.index_main if command == "index" else commands.retrieve_main)(argv[1:])
    from rails_lightning import cli

    cli.main(None if command_line else argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get("RAILS_LIGHTNING_DEBUG", "") not in ("", "0")
    if DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        if command_line:
            sys.argv = [sys.argv[0], *argv]
    try:
        return _run(argv, command_line)
    except UserError as error:
        from rails_lightning.runs import remove_unused_run_dirs

        remove_unused_run_dirs()
        if debug:
            raise
        print(f"rails_lightning: error: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
