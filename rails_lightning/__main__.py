"""``python -m rails_lightning COMMAND``: ``sweep`` and ``report`` are plain commands, every other
command is a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "sweep":
        from rails_lightning import sweep

        return sweep.main(argv[1:])
    if argv and argv[0] == "report":
        from rails_lightning import report

        return report.main(argv[1:])
    from rails_lightning import cli

    cli.main(None if command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
