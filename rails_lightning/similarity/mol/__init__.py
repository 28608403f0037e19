"""Mixture-of-Logits: heads (``heads``), the gate (``gate``, its arithmetic once in PyTorch), one scoring function
(``scoring``), the fused pair-gate kernel as a PyTorch operator (``kernel``) and the similarity (``model``); its top-k
routines are ``rails_lightning.retrieval.mol_topk``."""

from rails_lightning.similarity.mol.heads import MoLItems, MoLQueries
from rails_lightning.similarity.mol.model import MixtureOfLogits

__all__ = ["MixtureOfLogits", "MoLQueries", "MoLItems"]
