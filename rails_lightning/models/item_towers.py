"""Item towers: what turns an item into the vector (..., D) that the query encoder reads in histories and the
similarity's item head takes as the candidate.

Shape legend: N corpus size (item ids 1..N, 0 is padding), D item dimension, T text-vector width,
V categorical values kept per item (hashed buckets, 0 = none), K numeric columns.

* ``IdEmbedding``: a learned vector per item id (plus a linear map of fixed item features such as genre
  flags, when the DataModule gives them). The default; an item it never saw has no vector.
* ``ContentTower``: the item's content alone. Its text (the chosen text columns joined) becomes a vector
  by a frozen featuriser (computed once per corpus, cached on disk); its categorical values are hashed into
  ``category_buckets`` rows of an embedding table (a value never seen in training still has a row) and
  averaged; its numbers are standardised with the corpus's mean and spread (missing: 0, with a flag). The
  concatenation goes through a two-layer MLP to D. An item that arrives after training is encoded from its
  metadata alone (``encode_content``). With ``residual`` the item vector is the text vector plus the MLP's
  output, whose last layer starts at zero: training starts from the featuriser's own vectors.
* ``IdAndContent``: the sum of the two; during training the id part of each item occurrence is dropped
  with probability ``id_dropout``, so that the content path alone learns to place an item, as it must for
  a new one.

Content towers keep the corpus's features as buffers, filled from the DataModule's ``item_content`` by
``load_content`` before training and saved with the weights, so that a checkpoint alone serves its corpus.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from rails_lightning.data.item_content import ItemContent
from rails_lightning.data.text_features import DEFAULT_CACHE_DIR, HashedWordNgrams, TextFeaturizer, embed_texts
from rails_lightning.errors import ConfigError
from rails_lightning.models.factories import build_factory

TextFeaturizerFactory = Callable[[], TextFeaturizer]


class ItemTower(nn.Module):
    """Item ids (...,) -> item vectors (..., D). Built by the model as ``tower(num_items, dim, num_item_features)``.

    ``reads_content``: the tower needs the corpus's item content (``load_content``) and can encode an item
    from its content alone (``encode_content``)."""

    reads_content = False

    def __init__(self, num_items: int, dim: int, num_item_features: int = 0) -> None:
        super().__init__()
        self.num_items, self.dim = num_items, dim

    @property
    def text_vectors(self) -> Tensor | None:
        """(N + 1, T) the frozen text vectors of the corpus's items (row 0: padding) the tower reads; None for a
        tower that reads no text."""
        return None

    def load_item_features(self, features: Tensor) -> None:
        """Keep fixed (N + 1, F) item features (e.g. genre flags) where the tower maps them; others ignore them."""

    def load_content(self, content: ItemContent) -> None:
        """Keep the features of the corpus's items 0..N (``content`` aligned with the model's item ids)."""

    def encode_content(self, content: ItemContent) -> Tensor:
        """(n, D) vectors of items given only by their content (items the model never saw)."""
        raise ConfigError(f"{type(self).__name__} encodes item ids only; new items need a content tower (ContentTower, IdAndContent)")


class IdEmbedding(ItemTower):
    """A learned D-vector per item id, plus a linear map of fixed item features (e.g. genre flags).

    Args:
        init_std: the embeddings start N(0, init_std^2); the padding row is zero.
    """

    def __init__(self, num_items: int, dim: int, num_item_features: int = 0, init_std: float = 0.02) -> None:
        super().__init__(num_items, dim, num_item_features)
        self.embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=init_std)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.feature_projection = nn.Linear(num_item_features, dim, bias=False) if num_item_features else None
        # Filled from the DataModule in the model's `setup`, saved in checkpoints with the weights.
        self.register_buffer("item_features", torch.zeros(num_items + 1, num_item_features))

    def load_item_features(self, features: Tensor) -> None:
        if features.shape != self.item_features.shape:
            raise ConfigError(
                f"the data's item features are {tuple(features.shape)} but the model was built for {tuple(self.item_features.shape)} "
                "(num_items + 1, num_item_features): build the model from this data (the CLI links them) or use a checkpoint trained on it"
            )
        self.item_features.copy_(features)

    def forward(self, item_ids: Tensor) -> Tensor:
        x = self.embedding(item_ids)  # (..., D)
        if self.feature_projection is not None:
            x = x + self.feature_projection(self.item_features[item_ids])
        return x


def _category_bucket(column: str, value: str, buckets: int) -> int:
    """A stable bucket in 1..buckets for a (column, value) pair: the same in every process and run."""
    digest = hashlib.blake2b(f"{column}={value}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % buckets


class ContentTower(ItemTower):
    """Text vector + averaged categorical embeddings + standardised numbers -> MLP -> D.

    Args:
        text_columns: text columns of the item content, joined (". ") into the text of an item; () for none.
        categorical_columns: categorical columns (single or multi-valued); () for none.
        numeric_columns: numeric columns; () for none.
        text_featurizer: the frozen featuriser of the text (``class_path`` of a
            ``rails_lightning.data.text_features.TextFeaturizer``: ``HashedWordNgrams``, dependency-free, the
            default (None: it, with its defaults); ``PretrainedSentenceEncoder``, all-MiniLM-L6-v2).
        text_cache_dir: where the corpus's text vectors are cached (None: recompute every time).
        category_buckets: rows of the categorical embedding table; values are hashed into them.
        max_categories: categorical values kept per item (over all categorical columns, in column order).
        category_dim: width of the categorical embeddings.
        hidden_dim: the MLP's hidden width.
        dropout: dropout after the MLP's hidden layer while training.
        residual: the item vector is the text vector + the MLP's output, the MLP's last layer initialised to
            zero, so that at initialisation an item's vector is its featuriser's vector (with a pretrained
            sentence encoder on both sides, a ``DotProduct`` model starts as that encoder's zero-shot cosine).
            Needs text columns and D equal to the featuriser's width (384 for ``PretrainedSentenceEncoder``).
    """

    reads_content = True

    def __init__(
        self,
        num_items: int,
        dim: int,
        num_item_features: int = 0,
        text_columns: Sequence[str] = ("title",),
        categorical_columns: Sequence[str] = (),
        numeric_columns: Sequence[str] = (),
        text_featurizer: TextFeaturizerFactory | None = None,
        text_cache_dir: str | None = DEFAULT_CACHE_DIR,
        category_buckets: int = 4096,
        max_categories: int = 16,
        category_dim: int = 32,
        hidden_dim: int = 256,
        dropout: float = 0.1,
        residual: bool = False,
    ) -> None:
        super().__init__(num_items, dim, num_item_features)
        if not (text_columns or categorical_columns or numeric_columns):
            raise ConfigError("ContentTower needs at least one of text_columns, categorical_columns, numeric_columns")
        if residual and not text_columns:
            raise ConfigError("ContentTower(residual=True) adds the text vector to the MLP's output: give text_columns")
        self.text_columns, self.categorical_columns = list(text_columns), list(categorical_columns)
        self.numeric_columns = list(numeric_columns)
        # (None, not a partial, as the default: a resolved config can write None, and no partial of a class.)
        featurizer = HashedWordNgrams if text_featurizer is None else build_factory(text_featurizer, TextFeaturizer)
        self.featurizer = featurizer() if self.text_columns else None
        self.text_cache_dir = text_cache_dir
        self.category_buckets, self.max_categories = category_buckets, max_categories
        T = self.featurizer.dim if self.featurizer is not None else 0
        V = max_categories if self.categorical_columns else 0
        K = len(self.numeric_columns)
        # The corpus's features (row 0: padding), filled by `load_content`, saved with the weights.
        self.register_buffer("text", torch.zeros(num_items + 1, T))
        self.register_buffer("categories", torch.zeros(num_items + 1, V, dtype=torch.long))
        self.register_buffer("numbers", torch.zeros(num_items + 1, 2 * K))  # standardised values, presence flags
        self.register_buffer("numeric_mean", torch.zeros(K))
        self.register_buffer("numeric_std", torch.ones(K))
        self.category_embedding = nn.EmbeddingBag(category_buckets + 1, category_dim, mode="mean", padding_idx=0) if V else None
        in_dim = T + (category_dim if V else 0) + 2 * K
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim))
        self.residual = residual
        if residual:
            if T != dim:
                raise ConfigError(
                    f"ContentTower(residual=True) adds the {T}-d text vector to the MLP's output: the model's item_dim "
                    f"must be {T} (the text featuriser's width), got {dim}"
                )
            nn.init.zeros_(self.mlp[-1].weight)  # the correction starts at zero: the item starts as its text vector
            nn.init.zeros_(self.mlp[-1].bias)

    # ------------------------------------------------------------------ content -> features
    def _check_columns(self, content: ItemContent) -> None:
        for kind, wanted, present in (
            ("text", self.text_columns, content.text), ("categorical", self.categorical_columns, content.categorical),
            ("numeric", self.numeric_columns, content.numeric),
        ):
            missing = [c for c in wanted if c not in present]
            if missing:
                raise ConfigError(f"ContentTower: no {kind} column(s) {missing} in the item content (it has {sorted(present)})")

    def _texts(self, content: ItemContent) -> list[str]:
        return [". ".join(part for part in parts if part) for parts in zip(*(content.text[c] for c in self.text_columns))]

    def _features(self, content: ItemContent) -> tuple[Tensor, Tensor, Tensor]:
        """Content of n items -> text vectors (n, T), category buckets (n, V), numbers and flags (n, 2 K)."""
        self._check_columns(content)
        n = len(content)
        if self.featurizer is not None:
            text = torch.from_numpy(embed_texts(self.featurizer, self._texts(content), self.text_cache_dir))
        else:
            text = torch.zeros(n, 0)
        categories = torch.zeros(n, self.categories.shape[1], dtype=torch.long)
        if self.categorical_columns:
            for row, values in enumerate(zip(*(content.categorical[c] for c in self.categorical_columns))):
                buckets = [_category_bucket(c, v, self.category_buckets) for c, vs in zip(self.categorical_columns, values) for v in vs]
                buckets = buckets[: self.max_categories]
                categories[row, : len(buckets)] = torch.tensor(buckets, dtype=torch.long)
        raw = torch.from_numpy(np.stack([content.numeric[c] for c in self.numeric_columns], axis=1) if self.numeric_columns
                               else np.zeros((n, 0))).float()  # (n, K), NaN where missing
        present = ~raw.isnan()
        standardised = torch.where(present, (raw - self.numeric_mean.cpu()) / self.numeric_std.cpu(), torch.zeros_like(raw))
        return text, categories, torch.cat([standardised, present.float()], dim=1)

    def load_content(self, content: ItemContent) -> None:
        if len(content) != self.num_items + 1:
            raise ConfigError(f"ContentTower: item content for {len(content) - 1} items, the model has {self.num_items}")
        if self.numeric_columns:  # the corpus's statistics standardise every later item too
            raw = np.stack([content.numeric[c] for c in self.numeric_columns], axis=1)[1:]  # (N, K)
            mean = np.nan_to_num(np.nanmean(raw, axis=0)) if np.isfinite(raw).any() else np.zeros(raw.shape[1])
            std = np.nan_to_num(np.nanstd(raw, axis=0), nan=1.0)
            self.numeric_mean.copy_(torch.from_numpy(mean).float())
            self.numeric_std.copy_(torch.from_numpy(np.where(std > 0, std, 1.0)).float())
        text, categories, numbers = self._features(content)
        for buffer, value in ((self.text, text), (self.categories, categories), (self.numbers, numbers)):
            buffer.copy_(value.to(buffer.device))

    @property
    def text_vectors(self) -> Tensor | None:
        return self.text if self.featurizer is not None else None

    # ------------------------------------------------------------------ features -> vectors
    def _vectors(self, text: Tensor, categories: Tensor, numbers: Tensor) -> Tensor:
        """(..., T), (..., V), (..., 2 K) -> (..., D)."""
        parts = [text, numbers]
        if self.category_embedding is not None:
            flat = categories.reshape(-1, categories.shape[-1])  # (n, V)
            parts.insert(1, self.category_embedding(flat).view(*categories.shape[:-1], -1))  # (..., category_dim)
        mapped = self.mlp(torch.cat(parts, dim=-1))  # (..., D)
        return text + mapped if self.residual else mapped

    def forward(self, item_ids: Tensor) -> Tensor:
        vectors = self._vectors(self.text[item_ids], self.categories[item_ids], self.numbers[item_ids])  # (..., D)
        return vectors * (item_ids > 0).unsqueeze(-1)  # padding stays zero

    def encode_content(self, content: ItemContent) -> Tensor:
        text, categories, numbers = (t.to(self.text.device) for t in self._features(content))
        return self._vectors(text, categories, numbers)  # (n, D)


class IdAndContent(ContentTower):
    """``IdEmbedding`` + ``ContentTower``; while training, the id part of each item occurrence is zeroed
    with probability ``id_dropout`` (not rescaled), so that the content part alone learns to place an item.
    The id part starts at zero: an item that training never touches (a cold-start item, which no history,
    target or negative holds) keeps a zero id vector, so it is placed by its content alone, as a new item
    (``encode_content``) is, instead of by a random untrained id vector.

    Args:
        id_dropout: probability of dropping the id part of an item occurrence while training.
        **kwargs: the content part's options, as ``ContentTower`` takes them.
    """

    def __init__(self, num_items: int, dim: int, num_item_features: int = 0, id_dropout: float = 0.5, **kwargs) -> None:
        super().__init__(num_items, dim, num_item_features, **kwargs)
        if not 0.0 <= id_dropout < 1.0:
            raise ConfigError(f"id_dropout must be in [0, 1), got {id_dropout}")
        self.id_dropout = id_dropout
        self.ids = IdEmbedding(num_items, dim, num_item_features, init_std=0.0)

    def load_item_features(self, features: Tensor) -> None:
        self.ids.load_item_features(features)

    def forward(self, item_ids: Tensor) -> Tensor:
        ids = self.ids(item_ids)  # (..., D)
        if self.training and self.id_dropout:
            keep = torch.rand(item_ids.shape, device=item_ids.device) >= self.id_dropout  # (...,)
            ids = ids * keep.unsqueeze(-1)
        return ids + super().forward(item_ids)
