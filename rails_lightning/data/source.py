"""The interface of every interaction source (synthetic, MovieLens, any log file).

A source is chosen in YAML with ``class_path`` and hands the DataModule an ``InteractionLog``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from rails_lightning.data.sequences import InteractionLog


class InteractionSource(ABC):
    """Base class of every source: ``load()`` returns the raw interaction log."""

    @abstractmethod
    def load(self) -> InteractionLog: ...

    @property
    def description(self) -> str:
        return type(self).__name__
