"""From a trained model to answers: an exported serving index and the retrieval on top of it."""

from rails_lightning.serving.index import ServingIndex, add_items, compact, export_index

__all__ = ["ServingIndex", "export_index", "add_items", "compact"]
