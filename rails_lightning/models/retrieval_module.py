"""The one retrieval LightningModule: item tower, query encoder, a pluggable similarity, the training loop.

Shape legend: B batch, L sequence length, D item dimension, M positions with a target (training
queries), R sampled negatives, N corpus size (item ids 1..N).

    history (B, L) --item tower--> (B, L, D) --query encoder--> states (B, L, D)
    states at the M target positions --similarity.query_representation--> queries
    item ids --item tower--> (.., D) --similarity.item_representation--> items
    softmax of the positives' similarity.score against the objective's negatives' (shared by the batch, drawn per
    query or per sequence: the similarity's one score function, queries and items laid out in groups)

Models differ only in their similarity (``DotProduct`` for the two-tower model, ``MixtureOfLogits``
for MoL), chosen with ``class_path``, and are trained with an objective (``rails_lightning.objectives``:
shared, per-query, mined negatives or the full softmax), chosen the same way. The evaluation callback talks to the module through
``encode_queries`` and the module's ``corpus_index`` (the corpus encoded once per change of the weights, with
the similarity's exact and approximate retrievers over it), which the mined-negatives objective shares.

Checkpoints describe themselves: the encoder and the similarity are stored as ``class_path`` +
``init_args`` (plain data), so ``RetrievalModule.load_from_checkpoint(path, weights_only=True)``
rebuilds the exact model without a config file.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from rails_lightning.data.batches import QueryBatch, TrainBatch
from rails_lightning.data.datamodule import InteractionDataModule
from rails_lightning.errors import ConfigError, TrainingDiverged
from rails_lightning.losses import sampled_softmax_loss
from rails_lightning.objectives import ObjectiveFactory, SharedNegatives, TrainingObjective, TrainingStep
from rails_lightning.models.factories import build_factory, describe
from rails_lightning.models.encoders import QueryEncoder, SASRecEncoder
from rails_lightning.models.former_layouts import rename_former_weights
from rails_lightning.models.item_towers import IdEmbedding, ItemTower
from rails_lightning.retrieval import CorpusIndex, SearchOptions, Shards, TopKRetriever
from rails_lightning.retrieval.corpus_index import ENCODE_BATCH_SIZE
from rails_lightning.similarity import DotProduct, Similarity

ItemTowerFactory = Callable[[int, int, int], ItemTower]  # (num_items, dim, num_item_features)
QueryEncoderFactory = Callable[[int, int, int], QueryEncoder]  # (dim, num_users, max_seq_len)
SimilarityFactory = Callable[[int, int], Similarity]  # (input_dim, num_users)


def _map_fields(representation: Any, function: Callable[[Tensor], Tensor]) -> Any:
    """``function`` of a representation: a tensor, or each field of a NamedTuple of tensors (MoL's)."""
    if isinstance(representation, Tensor):
        return function(representation)
    return type(representation)(*(function(field) for field in representation))


class RetrievalModule(pl.LightningModule):
    """A retrieval model: item tower + query encoder + similarity, trained with a softmax over the objective's negatives.

    Args:
        num_items: corpus size N (linked from the DataModule).
        num_users: number of users (linked from the DataModule).
        max_seq_len: history length (linked from the DataModule).
        num_item_features: width of the item feature vectors, 0 for none (linked from the DataModule).
        action_names: the action types events carry (linked from the DataModule; () for none). Each
            history position's input then adds a learned map of its signed action vector (2 x - 1: +1 for
            an action the event has, -1 for one it has not) to its item vector, for every query encoder.
        embed_actions: add that map of each history event's actions to its input (when the data has action
            types). False reads item ids alone (the "ids only" row of an ablation): the action types then only
            serve ``history_filter`` and the DataModule's target groups.
        history_filter: an action type (e.g. ``liked``): only the history events of that type reach the query
            encoder, in training, evaluation and serving; the others are removed from the history before it is
            encoded, as if they had never happened (every event is still a training and evaluation target).
            The history is the last ``max_seq_len`` events, of which the encoder sees those of the type; a query
            with none of them gets the encoder's empty-history state. None: the whole history.
        item_dim: item embedding dimension D (also the query encoder's width).
        item_tower: what turns an item id into its D-vector, chosen with ``class_path``
            (``rails_lightning.models.item_towers``): ``IdEmbedding`` (the default), ``ContentTower`` (the item's
            text, categories and numbers; serves items never seen in training), ``IdAndContent``; the query
            encoder reads histories through the same tower.
        query_encoder: the query tower, chosen with ``class_path`` (in Python: a class, a
            ``functools.partial`` of one, or a ``{"class_path", "init_args"}`` dict).
        similarity: how queries and items score, chosen with ``class_path``: ``DotProduct``
            (the two-tower model) or ``MixtureOfLogits`` (MoL); in Python as ``query_encoder``.
        objective: how each training query's negatives are drawn, chosen with ``class_path``
            (``rails_lightning.objectives``): ``SharedNegatives`` (uniform and in-batch negatives shared by
            the batch, the default), ``PerQueryNegatives``, ``FullSoftmax`` or ``MinedNegatives`` (hard
            negatives from the model's own corpus ranking); in Python as ``query_encoder``.
        target_fraction: the share of the batch's target positions, drawn at random every step,
            that enter the loss (each scored against its positive and the negatives); 1 for
            all. Below 1 it cuts the cost of a similarity that is expensive per (position,
            negative) pair, such as MoL, at the price of fewer training targets per step.
        temperature: softmax temperature applied to the scores.
        learn_temperature: learn the temperature (initialised at ``temperature``).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay of matrices and embeddings.
        decay_all_parameters: also decay biases, norm weights and scalars (by default they are not
            decayed, as transformer recipes do).
        betas: AdamW betas.
        warmup_steps: optimizer steps over which the learning rate rises linearly from ``learning_rate / warmup_steps``
            to ``learning_rate`` (0: none).
        final_learning_rate: None keeps ``learning_rate`` after the warm-up (a constant rate, the default); a value
            decays it along a half cosine to this rate at the trainer's last step (``max_epochs`` or ``max_steps``
            decide where that is).
    """

    def __init__(
        self,
        num_items: int,
        num_users: int = 1,
        max_seq_len: int = 50,
        num_item_features: int = 0,
        action_names: Sequence[str] = (),
        embed_actions: bool = True,
        history_filter: str | None = None,
        item_dim: int = 64,
        item_tower: ItemTowerFactory = partial(IdEmbedding),
        query_encoder: QueryEncoderFactory = partial(SASRecEncoder),
        similarity: SimilarityFactory = partial(DotProduct),
        objective: ObjectiveFactory = partial(SharedNegatives),
        target_fraction: float = 1.0,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-3,
        decay_all_parameters: bool = False,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 0,
        final_learning_rate: float | None = None,
    ) -> None:
        super().__init__()
        # (The factory defaults are partials, not bare classes: jsonargparse 4.53 drops a class_path that
        # equals a bare-class default when it comes from a config file.)
        if not 0.0 < target_fraction <= 1.0:
            raise ConfigError(f"target_fraction must be in (0, 1], got {target_fraction}")
        if warmup_steps < 0 or (final_learning_rate is not None and not 0.0 <= final_learning_rate <= learning_rate):
            raise ConfigError(f"warmup_steps must be >= 0 and final_learning_rate between 0 and learning_rate ({learning_rate}), "
                              f"got {warmup_steps} and {final_learning_rate}")
        if history_filter is not None and history_filter not in action_names:
            offered = f"its action types {list(action_names)}" if action_names else "no action types"
            raise ConfigError(f"--model.history_filter={history_filter!r} is not an action type of the data, which has {offered}")
        # The hyperparameters are the arguments, the factories as plain class_path specs.
        self.save_hyperparameters(
            {
                "num_items": num_items, "num_users": num_users, "max_seq_len": max_seq_len,
                "num_item_features": num_item_features, "action_names": list(action_names),
                "embed_actions": embed_actions, "history_filter": history_filter, "item_dim": item_dim,
                "item_tower": describe(item_tower),
                "query_encoder": describe(query_encoder), "similarity": describe(similarity),
                "objective": describe(objective), "target_fraction": target_fraction,
                "temperature": temperature, "learn_temperature": learn_temperature,
                "learning_rate": learning_rate, "weight_decay": weight_decay,
                "decay_all_parameters": decay_all_parameters, "betas": list(betas),
                "warmup_steps": warmup_steps, "final_learning_rate": final_learning_rate,
            }
        )
        self.num_items = num_items
        self.item_tower: ItemTower = build_factory(item_tower, ItemTower)(num_items, item_dim, num_item_features)
        self.query_encoder = build_factory(query_encoder, QueryEncoder)(item_dim, num_users, max_seq_len)
        self.similarity: Similarity = build_factory(similarity, Similarity)(item_dim, num_users)
        self.objective: TrainingObjective = build_factory(objective, TrainingObjective)(num_items)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self.action_names = tuple(action_names)
        self.action_embedding = nn.Linear(len(action_names), item_dim, bias=False) if action_names and embed_actions else None
        self.history_filter_bit = None if history_filter is None else self.action_names.index(history_filter)
        self._loaded_content = None  # the DataModule's item content the item tower holds, if any
        # (W,) the items training may see, the only negatives objectives draw (ObjectiveModel.training_item_ids):
        # set from the DataModule in `setup` (None: every item), never saved (a checkpoint serves every item).
        self.register_buffer("training_item_ids", None, persistent=False)
        self._loaded_query_texts = None  # the DataModule's query texts the query encoder holds, if any
        # The encoded corpus that evaluation and mining share; dropped whenever the weights change.
        self.corpus_index = CorpusIndex(self)

    @property
    def model_name(self) -> str:
        """``TwoTower`` or ``MoL``: the name of the model this similarity makes."""
        return self.similarity.model_name

    # ------------------------------------------------------------------ towers
    def item_vectors(self, item_ids: Tensor) -> Tensor:
        """The item tower's output (..., D), before the similarity's head."""
        return self.item_tower(item_ids)

    def history_inputs(self, input_ids: Tensor, actions: Tensor | None = None) -> Tensor:
        """(B, L) history item ids, (B, L) action bitmasks or None -> (B, L, D) query-encoder inputs: each item's
        vector, plus the learned map of its signed action vector when the model has action types."""
        x = self.item_vectors(input_ids)  # (B, L, D)
        if self.action_embedding is None:
            return x
        if actions is None:
            raise ConfigError(f"this model reads action types {list(self.action_names)}, and the batch carries none")
        bits = torch.arange(len(self.action_names), device=actions.device)
        signed = ((actions.unsqueeze(-1) >> bits) & 1).to(x.dtype) * 2 - 1  # (B, L, A): +1 has, -1 has not
        return x + self.action_embedding(signed) * (input_ids > 0).unsqueeze(-1)  # padding stays the item tower's

    def encode_sequence(
        self, user_ids: Tensor, input_ids: Tensor, timestamps: Tensor | None = None, actions: Tensor | None = None
    ) -> Tensor:
        """(B,), (B, L), (B, L) seconds or None, (B, L) action bitmasks or None -> (B, L, D) causal query states.

        With ``history_filter``, the state at position t is the encoder's state after the latest shown event at
        or before t, of the history with the hidden events taken out (so a hidden event changes no state)."""
        if self.history_filter_bit is None:
            return self.query_encoder(user_ids, self.history_inputs(input_ids, actions), input_ids > 0, timestamps)
        if actions is None:
            raise ConfigError(f"this model shows the query encoder only {self.hparams.history_filter!r} events, and the batch carries no actions")
        L = input_ids.shape[1]
        shown = (input_ids > 0) & ((actions >> self.history_filter_bit) & 1).bool()  # (B, L)
        # The shown events moved to the right end in their order, the hidden ones to the left as padding.
        order = torch.sort(shown.int(), dim=1, stable=True).indices  # (B, L)
        kept = shown.gather(1, order)  # (B, L): False, ..., True
        ids, acts = input_ids.gather(1, order) * kept, actions.gather(1, order) * kept  # (B, L)
        times = None if timestamps is None else timestamps.gather(1, order) * kept  # (B, L)
        states = self.query_encoder(user_ids, self.history_inputs(ids, acts), kept, times)  # (B, L, D)
        # Position t's state is the one after its latest shown event: index L - (shown events) + (shown up to t) - 1
        # of the compacted history, a padding position (the empty history's state) when none is shown yet.
        latest = L - shown.sum(1, keepdim=True) + shown.cumsum(1) - 1  # (B, L), >= 0
        return states.gather(1, latest[..., None].expand(-1, -1, states.shape[-1]))  # (B, L, D)

    def encode_queries(self, batch: QueryBatch) -> Any:
        """The query representation of each evaluation query (the last position of its history), in float32: under
        mixed precision the forward runs in autocast, the corpus is encoded outside it, and they must search together."""
        states = self.encode_sequence(batch.user_ids, batch.input_ids, batch.timestamps, batch.actions)[:, -1]  # (B, D)
        return _map_fields(self.similarity.query_representation(states, batch.user_ids), Tensor.float)

    def encode_texts(self, texts: list[str]) -> Any:
        """The query representations of texts typed at serving time (a text query tower's ``encode_texts``; no user:
        user index 0 stands in for a user-id component), in float32, as ``encode_queries`` gives them."""
        states = self.query_encoder.encode_texts(list(texts))  # (n, D)
        user_ids = torch.zeros(len(states), dtype=torch.long, device=states.device)
        return _map_fields(self.similarity.query_representation(states, user_ids), Tensor.float)

    def encode_items(self, item_ids: Tensor) -> Any:
        """Item ids (...,) -> the similarity's item representations."""
        return self.similarity.item_representation(self.item_vectors(item_ids))

    def encode_repeated_items(self, item_ids: Tensor) -> Any:
        """``encode_items`` of ids with many repeats (per-query negatives, (M, R_Q)): each distinct id is
        encoded once and the representations gathered, since a similarity's item head (MoL's MLP) costs
        more than the copy. The gather is ``index_select``: its backward (``index_add_``) is several times cheaper
        on a CPU than advanced indexing's (``index_put_``), which serialises over repeated indices."""
        distinct, where = torch.unique(item_ids, return_inverse=True)  # (U,), item_ids.shape
        rows = where.reshape(-1)

        def gather(field: Tensor) -> Tensor:  # (U, ...) -> (*item_ids.shape, ...)
            return field.index_select(0, rows).view(*where.shape, *field.shape[1:])

        return _map_fields(self.encode_items(distinct), gather)

    def encode_corpus(self, batch_size: int = ENCODE_BATCH_SIZE, start: int = 0, count: int | None = None) -> Any:
        """Item representations of the corpus rows ``start .. start + count`` (item ids ``start + 1 ..``; by default
        the whole corpus), ``batch_size`` items at a time. Rows past the corpus (a distributed run's last share,
        padded to equal size) are encoded as padding id 0."""
        count = self.num_items - start if count is None else count
        ids = torch.arange(start + 1, start + count + 1, device=self.device)
        ids = ids.masked_fill(ids > self.num_items, 0)
        parts = [self.encode_items(chunk) for chunk in ids.split(batch_size)]
        if isinstance(parts[0], Tensor):
            return torch.cat(parts)
        return type(parts[0])(*(torch.cat(fields) for fields in zip(*parts)))

    # ------------------------------------------------------------------ retrieval (the similarity's)
    def corpus_shards(self) -> Shards:
        """This process's share of a corpus encoding: under DDP each process encodes 1/W of the corpus (one
        process outside a trainer)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return Shards(0, 1, None)
        return Shards(self.global_rank, self.trainer.world_size, self.trainer.strategy.all_gather)

    def exact_retriever(self, items: Any, options: SearchOptions) -> TopKRetriever:
        """Exact top-k over the encoded corpus ``items``."""
        return self.similarity.exact_retriever(items, options)

    def approximate_retriever(self, items: Any, options: SearchOptions) -> TopKRetriever | None:
        """The similarity's approximate top-k over ``items``, or None."""
        return self.similarity.approximate_retriever(items, options)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if not isinstance(datamodule, InteractionDataModule):
            return
        allowed = datamodule.training_item_ids  # a cold split holds some items out of training
        self.training_item_ids = None if allowed is None else torch.as_tensor(allowed, device=self.device)
        if datamodule.item_features is not None:
            self.item_tower.load_item_features(datamodule.item_features)
            self.corpus_index.invalidate()
        if self.item_tower.reads_content:
            if datamodule.item_content is None:
                raise ConfigError(
                    f"{type(self.item_tower).__name__} reads item content and {datamodule.source.description} has none: "
                    "give the source an item table (InteractionLogSource(items=ItemTable(...))) or use MovieLensSource"
                )
            if datamodule.item_content is not self._loaded_content:  # fit, then test: the same content, featurised once
                self.item_tower.load_content(datamodule.item_content)
                self._loaded_content = datamodule.item_content
                self.corpus_index.invalidate()
        if self.query_encoder.reads_query_text:
            if datamodule.query_texts is None:
                raise ConfigError(
                    f"{type(self.query_encoder).__name__} reads query texts and {datamodule.source.description} has none: "
                    "use a source whose queries are texts (BeirSource) or a query encoder of histories (SASRecEncoder)"
                )
            if datamodule.query_texts is not self._loaded_query_texts:  # fit, then test: tokenised once
                self.query_encoder.load_query_texts(datamodule.query_texts)
                self._loaded_query_texts = datamodule.query_texts

    def teardown(self, stage: str) -> None:
        self.corpus_index.invalidate()  # the stage is over: hold no encoded corpus (the module may also change device)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self.corpus_index.invalidate()  # new weights
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_train_start(self) -> None:
        # Under DDP every process starts from the same seed (so the same initial weights); from here on each
        # draws its own negatives and dropout masks, reproducibly: the seed is (run seed, rank, step).
        if self.trainer.world_size > 1:
            torch.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)) + 1_000_003 * self.global_rank + self.global_step)

    def training_positions(self, target_ids: Tensor) -> Tensor:
        """(B, L) target ids -> (B, L) mask of the positions that enter this step's loss.

        Every position with a target, or with ``target_fraction`` < 1 a random share of them (at least one).
        """
        has_target = target_ids > 0  # (B, L)
        fraction = self.hparams.target_fraction
        if fraction >= 1.0:
            return has_target
        positions = has_target.flatten().nonzero().squeeze(1)  # (M,)
        kept = positions[torch.randperm(positions.numel(), device=positions.device)[: max(1, round(fraction * positions.numel()))]]
        return torch.zeros_like(has_target).flatten().index_fill_(0, kept, True).view_as(has_target)

    def on_train_epoch_start(self) -> None:
        self.objective.on_train_epoch_start(self)
        # The objective holds what it mines from; the steps hold no encoded corpus or index beside it.
        self.corpus_index.invalidate()

    def on_train_batch_end(self, outputs: Any, batch: TrainBatch, batch_idx: int) -> None:
        self.corpus_index.invalidate()  # the optimizer step changed the weights

    def training_step(self, batch: TrainBatch, batch_idx: int) -> Tensor:
        states = self.encode_sequence(batch.user_ids, batch.input_ids, batch.timestamps, batch.actions)  # (B, L, D)
        has_target = self.training_positions(batch.target_ids)  # (B, L), M positions
        positive_ids = batch.target_ids[has_target]  # (M,)
        negatives = self.objective.negatives(TrainingStep(self, batch, states, has_target, positive_ids))
        all_user_ids = batch.user_ids[:, None].expand_as(batch.target_ids)  # (B, L)
        if negatives.per_sequence is None:
            queries = self.similarity.query_representation(states[has_target], all_user_ids[has_target])  # M queries
        else:  # per-sequence negatives score every position of a sequence (padding too, dropped after scoring)
            every_position = self.similarity.query_representation(states, all_user_ids)  # (B, L) queries
            queries = _map_fields(every_position, lambda field: field[has_target])  # M queries
        inv_temperature = torch.exp(-self.log_temperature)
        single = _map_fields(queries, lambda field: field[:, None])  # M groups of one query
        positive_logits = self.similarity.score(single, self.encode_items(positive_ids[:, None]))[0][:, 0, 0] * inv_temperature  # (M,)
        # Shared negatives: one group of M queries; per-query ones: M groups of one query; per-sequence ones: B groups
        # of L positions. The similarity's auxiliary outputs (MoL's load balancing) come from the first part drawn.
        M = positive_ids.numel()
        logits, negative_ids, log_q, auxiliary = [], [], [], None
        if negatives.shared is not None:
            shared = _map_fields(queries, lambda field: field[None])  # one group of M queries
            scores, auxiliary = self.similarity.score(shared, self.encode_items(negatives.shared[None]), auxiliary=True)  # (1, M, R_S)
            logits.append(scores[0])
            negative_ids.append(negatives.shared)  # (R_S,): broadcast over the M queries, not copied M times
            log_q.append(negatives.shared_log_q)
        if negatives.per_query is not None:
            scores, part_auxiliary = self.similarity.score(single, self.encode_repeated_items(negatives.per_query), auxiliary=auxiliary is None)  # (M, 1, R_Q)
            auxiliary = part_auxiliary if auxiliary is None else auxiliary
            logits.append(scores[:, 0])
            negative_ids.append(negatives.per_query)
            log_q.append(negatives.per_query_log_q)
        if negatives.per_sequence is not None:
            scores, part_auxiliary = self.similarity.score(every_position, self.encode_repeated_items(negatives.per_sequence), auxiliary=auxiliary is None)  # (B, L, R_B)
            auxiliary = part_auxiliary if auxiliary is None else auxiliary
            logits.append(scores[has_target])
            rows = has_target.nonzero()[:, 0]  # (M,) the sequence of each query, in the mask's order
            negative_ids.append(negatives.per_sequence[rows])
            log_q.append(negatives.per_sequence_log_q[rows])
        if len(logits) == 1:  # one kind: ids and logQ as drawn; (M, R) copies of shared ones would cost M x R x 12 bytes
            negative_logits, all_negative_ids, all_log_q = logits[0], negative_ids[0], log_q[0]
        else:  # (M, R_S + R_Q + R_B)
            negative_logits = torch.cat(logits, 1)
            all_negative_ids = torch.cat([ids.expand(M, -1) for ids in negative_ids], 1)
            all_log_q = torch.cat([counts.expand(M, -1) for counts in log_q], 1)
        loss = sampled_softmax_loss(positive_logits, negative_logits * inv_temperature, positive_ids, all_negative_ids, all_log_q)
        batch_size = batch.input_ids.shape[0]
        self.log("train/softmax_loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in auxiliary.losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
            loss = loss + value
        for name, value in auxiliary.statistics.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if self.hparams.learn_temperature:
            self.log("train/temperature", self.log_temperature.exp(), batch_size=batch_size)
        if not torch.isfinite(loss):  # stop here: a NaN step would poison every later checkpoint
            raise TrainingDiverged(
                f"the training loss is {float(loss.detach())} at step {self.global_step} (epoch {self.current_epoch}); the usual cause "
                f"is a learning rate too high for this model (--model.learning_rate={self.hparams.learning_rate}) or a "
                "temperature too low; this step's weights were not saved"
            )
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
        rename_former_weights(checkpoint.get("state_dict", {}))  # a checkpoint of a former layout: today's names
        states = checkpoint.get("rng_states")
        if states and self._trainer is not None and self.trainer.state.fn == "fit":
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters as they are now (their device included), at ``learning_rate``."""
        hp = self.hparams
        trainable = [p for p in self.parameters() if p.requires_grad]
        # Matrices and embeddings are decayed; biases, norm weights and scalars (ndim < 2) are not.
        decayed = [p for p in trainable if hp.decay_all_parameters or p.ndim >= 2]
        kept = [p for p in trainable if not (hp.decay_all_parameters or p.ndim >= 2)]
        groups = [{"params": decayed, "weight_decay": hp.weight_decay}, {"params": kept, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.learning_rate, betas=tuple(hp.betas))

    def configure_optimizers(self) -> Any:
        """The optimizer alone at a constant rate; with a warm-up or a decay, also its per-step schedule."""
        optimizer = self.build_optimizer()
        hp = self.hparams
        warmup_steps, final_learning_rate = hp.warmup_steps, hp.final_learning_rate
        if not warmup_steps and final_learning_rate is None:
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if final_learning_rate is not None and not math.isfinite(total_steps):
            raise ConfigError("final_learning_rate decays the rate until the last step: give the trainer max_epochs or max_steps")
        factor = partial(learning_rate_factor, warmup_steps=warmup_steps, total_steps=int(min(total_steps, 2**62)),
                         final_fraction=None if final_learning_rate is None else final_learning_rate / hp.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, final_fraction: float | None) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a fraction of the base rate: linear warm-up to 1 over
    ``warmup_steps`` steps, then 1 (``final_fraction`` None) or a half cosine from 1 down to ``final_fraction`` at step
    ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if final_fraction is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))
