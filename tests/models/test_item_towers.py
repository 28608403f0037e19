"""Item towers: the id embedding (today's default), the content tower (text, hashed categories, standardised
numbers), their sum with id dropout; new items encoded from content alone."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from rails_lightning.data.item_content import ItemContent
from rails_lightning.data.text_features import HashedWordNgrams
from rails_lightning.errors import ConfigError
from rails_lightning.models.item_towers import ContentTower, IdAndContent, IdEmbedding

N, D = 4, 8


def _content(n=N, with_padding=True):
    titles = ["space opera", "space western", "romantic comedy", "romantic drama", "space comedy"][:n]
    genres = [("SciFi",), ("SciFi", "Western"), ("Comedy", "Romance"), ("Drama", "Romance"), ("SciFi", "Comedy")][:n]
    years = np.array([1977.0, np.nan, 1999.0, 2001.0, 2010.0][:n])
    content = ItemContent(raw_ids=np.arange(100, 100 + n), text={"title": titles}, categorical={"genres": genres},
                          numeric={"year": years})
    if not with_padding:
        return content
    aligned, _ = content.aligned(np.concatenate([[-1], content.raw_ids]))  # row 0: padding
    return aligned


def _tower(cls=ContentTower, **options):
    torch.manual_seed(0)
    return cls(N, D, text_columns=["title"], categorical_columns=["genres"], numeric_columns=["year"],
               text_featurizer=partial(HashedWordNgrams, dim=64), text_cache_dir=None, dropout=0.0, **options)


def test_id_embedding_is_a_vector_per_id_with_a_zero_padding_row():
    tower = IdEmbedding(N, D)
    assert tower(torch.tensor([0])).abs().sum() == 0
    assert tower(torch.tensor([[1, 2], [3, 4]])).shape == (2, 2, D)
    with pytest.raises(ConfigError, match="new items need a content tower"):
        tower.encode_content(_content(with_padding=False))


def test_content_tower_reads_the_corpus_content_and_encodes_new_items_alike():
    tower = _tower().eval()
    tower.load_content(_content())
    assert tower.numeric_mean.item() == pytest.approx(np.nanmean([1977, 1999, 2001]))
    corpus = tower(torch.arange(0, N + 1))  # (N + 1, D)
    assert corpus[0].abs().sum() == 0 and corpus[1:].abs().sum() > 0
    # The same items given as content only (as new items are): the same vectors.
    again = tower.encode_content(_content(with_padding=False))
    torch.testing.assert_close(again, corpus[1:])
    # Content decides: items sharing words and genres are closer than items sharing none.
    unit = torch.nn.functional.normalize(corpus[1:], dim=-1)
    assert unit[0] @ unit[1] > unit[0] @ unit[3]


def test_an_unseen_category_still_has_a_row_and_missing_columns_fail_clearly():
    tower = _tower().eval()
    tower.load_content(_content())
    new = ItemContent(raw_ids=np.array([7]), text={"title": ["space noir"]}, categorical={"genres": [("Noir",)]},
                      numeric={"year": np.array([np.nan])})
    assert torch.isfinite(tower.encode_content(new)).all()
    with pytest.raises(ConfigError, match=r"no categorical column\(s\) \['genres'\]"):
        tower.encode_content(ItemContent(raw_ids=np.array([7]), text={"title": ["x"]}, numeric={"year": np.array([1.0])}))
    with pytest.raises(ConfigError, match="item content for 5 items, the model has 4"):
        tower.load_content(_content(n=5))


def test_content_tower_learns_through_every_part():
    tower = _tower().train()
    tower.load_content(_content())
    tower(torch.arange(1, N + 1)).square().sum().backward()
    assert tower.category_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in tower.mlp.parameters())


def test_id_and_content_drops_the_id_part_in_training_only():
    tower = _tower(IdAndContent, id_dropout=0.5)
    tower.load_content(_content())
    assert (tower.ids.embedding.weight == 0).all()  # the id part starts at zero: untrained items are content only
    with torch.no_grad():
        tower.ids.embedding.weight[1:].normal_()  # as if trained
    ids = torch.arange(1, N + 1).repeat(64)  # (256,)
    content_only = ContentTower.forward(tower.eval(), ids)
    with torch.no_grad():
        full = tower.eval()(ids)
        trained = tower.train()(ids)
    # Evaluation: id + content everywhere; training: about half the occurrences are content only.
    assert not torch.isclose(full, content_only).all(dim=-1).any()
    dropped = torch.isclose(trained, ContentTower.forward(tower, ids)).all(dim=-1).float().mean()
    assert 0.35 < dropped < 0.65
    torch.testing.assert_close(tower.eval().encode_content(_content(with_padding=False)), content_only[:N])
    with pytest.raises(ConfigError, match="id_dropout"):
        _tower(IdAndContent, id_dropout=1.0)


CLUSTERS = {"space": "SciFi", "romance": "Romance", "crime": "Crime", "cartoon": "Animation"}


def _content_log(folder, users_per_cluster=20, items_per_cluster=10, length=8):
    """A log where each user watches one cluster's items, and an item table whose titles and genres name the
    cluster; plus a table of one new item of the "space" cluster that no one watched."""
    import random

    rng = random.Random(0)
    log, table = ["user_id,item_id,timestamp"], ["item_id,title,genres"]
    for c, (word, genre) in enumerate(CLUSTERS.items()):
        items = [100 * (c + 1) + j for j in range(items_per_cluster)]
        table += [f"{i},{word} story {j},{genre}" for j, i in enumerate(items)]
        for u in range(users_per_cluster):
            for t, item in enumerate(rng.sample(items, length)):
                log.append(f"{c * users_per_cluster + u},{item},{t}")
    (folder / "log.csv").write_text("\n".join(log) + "\n")
    (folder / "items.csv").write_text("\n".join(table) + "\n")
    (folder / "new_items.csv").write_text("item_id,title,genres\n999,space story new,SciFi\n")
    return [100 + j for j in range(5)]  # a history of "space" items


@pytest.mark.slow
def test_a_content_tower_serves_an_item_it_never_saw(tmp_path):
    """Fit with a content tower, export, add an item only its metadata describes, retrieve it for a history
    of its kind."""
    import json
    import os
    import subprocess
    import sys

    history = _content_log(tmp_path)
    config = tmp_path / "content.yaml"
    config.write_text(f"""
data:
  min_interactions: 3
  max_seq_len: 8
  source:
    class_path: rails_lightning.data.InteractionLogSource
    init_args:
      path: {tmp_path / 'log.csv'}
      items:
        class_path: rails_lightning.data.ItemTable
        init_args: {{path: {tmp_path / 'items.csv'}, text_columns: [title], categorical_columns: [genres]}}
model:
  item_dim: 16
  item_tower:
    class_path: rails_lightning.models.item_towers.ContentTower
    init_args: {{text_columns: [title], categorical_columns: [genres], text_cache_dir: null, hidden_dim: 32}}
  objective:
    class_path: rails_lightning.objectives.SharedNegatives
    init_args: {{num_negatives: 32}}
trainer:
  max_epochs: 8
  enable_progress_bar: false
""")
    env = {**os.environ, "WANDB_MODE": "disabled"}

    def run(*args):
        result = subprocess.run([sys.executable, "-m", "rails_lightning", *args], capture_output=True, text=True,
                                env=env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run("fit", "--config", str(config), f"--run_dir={tmp_path / 'run'}")
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    run("index", f"--ckpt_path={checkpoint}", f"--out={tmp_path / 'index'}")
    run("index", "--add", f"--ckpt_path={checkpoint}", f"--out={tmp_path / 'index'}", f"--item_table={tmp_path / 'new_items.csv'}")
    answer = json.loads(run("retrieve", f"--index={tmp_path / 'index'}", "--history", ",".join(map(str, history)),
                            "--exclude-history", "-k", "6", "--json"))
    assert 999 in answer["items"] or "999" in answer["items"], answer
    assert answer["titles"][[str(i) for i in answer["items"]].index("999")] == "space story new"
