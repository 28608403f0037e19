"""The contract every retrieval model shares, and the training loop on top of it.

Shape legend: B batch, L sequence length, D item dimension, M positions with a
target (training queries), R sampled negatives, N corpus size (item ids 1..N).

A subclass decides what a query and an item *are* (a vector for the dot product,
component embeddings plus gate inputs for Mixture-of-Logits) and how they score:

* ``query_representation(states)``  encoder states (..., D) -> query representation
* ``item_representation(item_ids)``  item ids (...,) -> item representation
* ``score_pairs(q, x)``              M queries x their M items -> (M,)
* ``score_cross(q, x)``              M queries x R shared items -> ((M, R), aux losses)
* ``build_retriever(items)``         the top-k routine the corpus callback uses

and optionally:

* ``represent_queries(states, user_ids)``  the same with the matching user ids (...,), for
  models with a user-id component (default: ``query_representation(states)``)
* ``build_approximate_retriever(items)``   a fast approximate top-k the callback evaluates
  next to the exact one (default: None)

Everything else (item tower, query encoder, negatives, loss, optimiser, the
evaluation hooks) lives here, so models differ only in their similarity.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from rails_lightning.data.batches import QueryBatch, TrainBatch
from rails_lightning.losses import sampled_softmax_loss
from rails_lightning.models.encoders import QueryEncoder, SASRecEncoder
from rails_lightning.retrieval.topk import TopKRetriever

QueryEncoderFactory = Callable[[int, int, int], QueryEncoder]


class RetrievalModule(pl.LightningModule):
    """Base LightningModule of every retrieval model.

    Args:
        num_items: corpus size N (linked from the DataModule).
        num_users: number of users (linked from the DataModule).
        max_seq_len: history length (linked from the DataModule).
        num_item_features: width of the item feature vectors, 0 for none (linked from the DataModule).
        item_dim: item embedding dimension D (also the query encoder's width).
        query_encoder: the query tower, chosen with ``class_path``.
        num_negatives: negatives drawn uniformly from the corpus, shared by the whole batch.
        num_in_batch_negatives: negatives drawn from the batch's own positives (popularity-distributed), shared.
        logq_correction: subtract the log expected count of each negative (needed for in-batch negatives).
        temperature: softmax temperature applied to the scores.
        learn_temperature: learn the temperature (initialised at ``temperature``).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
    """

    def __init__(
        self,
        num_items: int,
        num_users: int = 1,
        max_seq_len: int = 50,
        num_item_features: int = 0,
        item_dim: int = 64,
        query_encoder: QueryEncoderFactory = SASRecEncoder,
        num_negatives: int = 128,
        num_in_batch_negatives: int = 0,
        logq_correction: bool = True,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
    ) -> None:
        super().__init__()
        # The encoder factory is a callable, not data: the saved run config (config.yaml) rebuilds it.
        self.save_hyperparameters(ignore=["query_encoder"])
        if num_negatives + num_in_batch_negatives <= 0:
            raise ValueError("need at least one negative: set num_negatives or num_in_batch_negatives > 0")
        self.num_items = num_items
        # Item tower: id embedding (+ a linear map of the item features, e.g. genres).
        self.item_embedding = nn.Embedding(num_items + 1, item_dim, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.item_feature_projection = nn.Linear(num_item_features, item_dim, bias=False) if num_item_features else None
        # Filled from the DataModule in `setup`, saved in checkpoints with the weights.
        self.register_buffer("item_features", torch.zeros(num_items + 1, num_item_features))
        self.query_encoder = query_encoder(item_dim, num_users, max_seq_len)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)

    # ------------------------------------------------------------------ what subclasses define
    def query_representation(self, states: Tensor) -> Any:
        raise NotImplementedError

    def item_representation(self, item_ids: Tensor) -> Any:
        raise NotImplementedError

    def score_pairs(self, queries: Any, items: Any) -> Tensor:
        raise NotImplementedError

    def score_cross(self, queries: Any, items: Any) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def build_retriever(self, items: Any) -> TopKRetriever:
        raise NotImplementedError

    def represent_queries(self, states: Tensor, user_ids: Tensor) -> Any:
        """Query representation of states (..., D) whose user ids are (...,); ignores the ids by default."""
        return self.query_representation(states)

    def build_approximate_retriever(self, items: Any) -> TopKRetriever | None:
        """An approximate top-k to evaluate against ``build_retriever``'s exact one; None by default."""
        return None

    # ------------------------------------------------------------------ towers
    def item_vectors(self, item_ids: Tensor) -> Tensor:
        """The item tower's raw output (..., D), before any model-specific head."""
        x = self.item_embedding(item_ids)
        if self.item_feature_projection is not None:
            x = x + self.item_feature_projection(self.item_features[item_ids])
        return x

    def encode_sequence(self, user_ids: Tensor, input_ids: Tensor) -> Tensor:
        """(B,), (B, L) -> (B, L, D) causal query states."""
        return self.query_encoder(user_ids, self.item_vectors(input_ids), input_ids > 0)

    def encode_queries(self, batch: QueryBatch) -> Any:
        """The query representation of each evaluation query (the last position)."""
        return self.represent_queries(self.encode_sequence(batch.user_ids, batch.input_ids)[:, -1], batch.user_ids)

    def encode_items(self, item_ids: Tensor) -> Any:
        return self.item_representation(item_ids)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        features = getattr(datamodule, "item_features", None)
        if features is not None and features.shape == self.item_features.shape:
            self.item_features.copy_(features)

    def sample_negatives(self, positive_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Negatives shared by the batch and the log of their expected counts: (R,), (R,)."""
        device, hp = positive_ids.device, self.hparams
        ids, log_counts = [], []
        if hp.num_negatives:
            ids.append(torch.randint(1, self.num_items + 1, (hp.num_negatives,), device=device))
            log_counts.append(torch.full((hp.num_negatives,), math.log(hp.num_negatives / self.num_items), device=device))
        if hp.num_in_batch_negatives:
            pick = torch.randint(0, positive_ids.numel(), (hp.num_in_batch_negatives,), device=device)
            sampled = positive_ids[pick]
            frequency = torch.bincount(positive_ids, minlength=self.num_items + 1)[sampled] / positive_ids.numel()
            ids.append(sampled)
            log_counts.append(torch.log(frequency * hp.num_in_batch_negatives))
        return torch.cat(ids), torch.cat(log_counts)

    def training_step(self, batch: TrainBatch, batch_idx: int) -> Tensor:
        states = self.encode_sequence(batch.user_ids, batch.input_ids)  # (B, L, D)
        has_target = batch.target_ids > 0  # (B, L)
        user_ids = batch.user_ids[:, None].expand_as(batch.target_ids)[has_target]  # (M,)
        queries = self.represent_queries(states[has_target], user_ids)  # M queries
        positive_ids = batch.target_ids[has_target]  # (M,)
        negative_ids, log_counts = self.sample_negatives(positive_ids)  # (R,), (R,)
        inv_temperature = torch.exp(-self.log_temperature)
        positive_logits = self.score_pairs(queries, self.item_representation(positive_ids)) * inv_temperature
        negative_scores, aux_losses = self.score_cross(queries, self.item_representation(negative_ids))
        loss = sampled_softmax_loss(
            positive_logits,
            negative_scores * inv_temperature,
            positive_ids,
            negative_ids,
            log_counts if self.hparams.logq_correction else None,
        )
        batch_size = batch.input_ids.shape[0]
        self.log("train/softmax_loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in aux_losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
            if name.endswith("_loss"):
                loss = loss + value
        if self.hparams.learn_temperature:
            self.log("train/temperature", self.log_temperature.exp(), batch_size=batch_size)
        return loss

    # The corpus-evaluation callback turns these query representations into metrics.
    def validation_step(self, batch: QueryBatch, batch_idx: int) -> Any:
        return self.encode_queries(batch)

    def test_step(self, batch: QueryBatch, batch_idx: int) -> Any:
        return self.encode_queries(batch)

    def predict_step(self, batch: QueryBatch, batch_idx: int) -> Any:
        return self.encode_queries(batch)

    # Random states travel with the checkpoint, so a resumed run draws the same batches,
    # negatives and dropout masks as an uninterrupted one.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.AdamW(self.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=hp.betas)

    def encode_corpus(self, chunk_size: int = 65536) -> Any:
        """Item representations of the whole corpus (ids 1..N), encoded in chunks."""
        ids = torch.arange(1, self.num_items + 1, device=self.device)
        parts = [self.item_representation(chunk) for chunk in ids.split(chunk_size)]
        if isinstance(parts[0], Tensor):
            return torch.cat(parts)
        return type(parts[0])(*(torch.cat(fields) for fields in zip(*parts)))
