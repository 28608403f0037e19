"""The eight commands of ``python -m rails_lightning``: what each does in one line, and one example.

``python -m rails_lightning --help`` lists them; every command's own ``--help`` starts with its line and
its example (``help_description``), so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import NamedTuple

PROG = "python -m rails_lightning"


class Command(NamedTuple):
    summary: str  # what it does, one line
    example: str  # one command line that works as shown (RUN_DIR: a run directory `fit` printed)


COMMANDS = {
    "fit": Command(
        "train a model, evaluate it on the full item corpus every epoch, test the best checkpoint",
        f"{PROG} fit --model=MoL --trainer.max_epochs=5",
    ),
    "validate": Command(
        "evaluate a checkpoint on the validation split (full corpus), writing RUN_DIR/validate.json",
        f"{PROG} validate --ckpt_path RUN_DIR/checkpoints/best.ckpt --run_dir RUN_DIR",
    ),
    "test": Command(
        "evaluate a checkpoint on the test split (full corpus), writing RUN_DIR/test.json",
        f"{PROG} test --ckpt_path RUN_DIR/checkpoints/best.ckpt --run_dir RUN_DIR",
    ),
    "predict": Command(
        "encode the test queries of a checkpoint's model (query vectors, for your own analysis)",
        f"{PROG} predict --ckpt_path RUN_DIR/checkpoints/best.ckpt",
    ),
    "sweep": Command(
        "run a W&B sweep file here, without a W&B server, and compare its trials",
        f"{PROG} sweep sweeps/mol_vs_dot.yaml --dry_run",
    ),
    "report": Command(
        "compare finished runs: a table and an HR@K plot, a leaderboard, or the reproduction table",
        f"{PROG} report runs/ --leaderboard",
    ),
    "index": Command(
        "export a trained model's item corpus as a serving index (embeddings, FAISS, ids, histories)",
        f"{PROG} index --ckpt_path RUN_DIR/checkpoints/best.ckpt --out my_index",
    ),
    "retrieve": Command(
        "show what an exported model retrieves for a user, a list of items or a query text",
        f"{PROG} retrieve --index my_index --user 42",
    ),
}


def help_description(name: str, details: str = "") -> str:
    """The start of every command's ``--help``: what it does, one example, then ``details``."""
    command = COMMANDS[name]
    text = f"{command.summary[0].upper()}{command.summary[1:]}.\n\nExample:\n  {command.example}"
    if details:
        text += "\n\n" + "\n".join(textwrap.fill(paragraph, 100) for paragraph in details.split("\n"))
    return text


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} COMMAND [OPTIONS]  (`{PROG} COMMAND --help` explains each option)",
        "",
        "Train and evaluate retrieval models with learned similarities (two-tower dot product, Mixture-of-Logits).",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
        "",
        f"Start with `{PROG} fit`: the embedded default (synthetic data, a two-tower model, a few minutes on a CPU).",
        f"Anywhere on the line, --debug shows the traceback of an error instead of its one-line message.",
    ]
    return "\n".join(lines)


def argument_parser(name: str, details: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a plain (non-Lightning) command: usage under ``python -m rails_lightning NAME``, and a
    ``--help`` that starts with what it does and its example, then ``details``."""
    return argparse.ArgumentParser(
        prog=f"{PROG} {name}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=help_description(name, details), epilog=epilog,
    )
