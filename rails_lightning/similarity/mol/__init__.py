"""Mixture-of-Logits: heads (``heads``), the gate (``gate``, its arithmetic once in PyTorch), one scoring function
(``scoring``), the fused pair-gate kernel as a PyTorch operator (``kernel``), the exact and RAILS top-k routines
(``topk``) and the similarity (``model``).

Its modules import each other one way -- gate; heads and kernel; scoring and topk; model -- and never through this
package, whose names are re-exports for users."""

from rails_lightning.similarity.mol.heads import MoLItems, MoLQueries
from rails_lightning.similarity.mol.model import MixtureOfLogits

__all__ = ["MixtureOfLogits", "MoLQueries", "MoLItems"]
