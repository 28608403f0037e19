"""Errors a user can fix. The command line prints them as one line (cause, file, what to do) and
exits with status 1; set ``RAILS_LIGHTNING_DEBUG=1`` (or pass ``--debug``) to see the traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a failed run that the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
    """A config file or command-line option that cannot be used."""


class DataError(UserError, ValueError):
    """Bad interaction or item data; the message names the file (and line) and what was wrong."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded safely, or is missing."""


class TrainingDiverged(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


class SweepError(UserError):
    """A sweep that cannot run, or whose every trial failed."""
