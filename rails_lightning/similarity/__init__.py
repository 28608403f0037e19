"""Similarities: how a query and an item score. One is chosen per ``RetrievalModule`` with ``class_path``."""

from rails_lightning.similarity.base import Auxiliary, Similarity, with_group_dim
from rails_lightning.similarity.dot_product import DotProduct
from rails_lightning.similarity.mol import MixtureOfLogits, MoLItems, MoLQueries

__all__ = ["Similarity", "Auxiliary", "DotProduct", "MixtureOfLogits", "MoLQueries", "MoLItems", "with_group_dim"]
