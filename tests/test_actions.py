"""Action types as data: from 0/1, list and text columns of a log, or from MovieLens ratings; carried through
the sequence store into the batches, aligned with the history items and never with a target."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from rails_lightning.data import InteractionDataModule, InteractionLogSource, MovieLensSource
from rails_lightning.data.actions import RATING_ACTIONS, actions_from_ratings, pack, unpack
from rails_lightning.errors import DataError


def test_pack_unpack_and_the_rating_rule():
    masks, names = actions_from_ratings(np.array([1, 2, 3, 4, 5]))
    assert names == RATING_ACTIONS == ("rated", "liked", "loved", "disliked")
    flags = unpack(masks, 4)
    assert flags.tolist() == [
        [True, False, False, True], [True, False, False, True], [True, False, False, False],
        [True, True, False, False], [True, True, True, False],
    ]
    np.testing.assert_array_equal(pack(flags), masks)


def _write_log(tmp_path, extra_header, extra_values, name="log.csv"):
    """6 users x 5 events; event (u, s) gets the extra columns' values extra_values(u, s)."""
    lines = ["user_id,item_id,timestamp," + extra_header]
    for user in range(6):
        for step in range(5):
            lines.append(f"{user},{(user + step) % 7 + 1},{step},{extra_values(user, step)}")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_flag_and_text_action_columns(tmp_path):
    path = _write_log(tmp_path, "liked,kinds", lambda u, s: f"{int(s % 2 == 0)},{'reply|repost' if s == 3 else ('reply' if s == 1 else '')}")
    log = InteractionLogSource(str(path), action_columns=["liked", "kinds"]).load()
    assert log.action_names == ("liked", "reply", "repost")
    flags = unpack(log.actions, 3)
    steps = log.order.astype(int)
    np.testing.assert_array_equal(flags[:, 0], steps % 2 == 0)
    np.testing.assert_array_equal(flags[:, 1], np.isin(steps, (1, 3)))
    np.testing.assert_array_equal(flags[:, 2], steps == 3)


def test_list_action_column_from_json_lines_and_parquet(tmp_path):
    rows = [{"user_id": u, "item_id": (u + s) % 7 + 1, "timestamp": s, "actions": ["like"] if s % 2 else []}
            for u in range(6) for s in range(5)]
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parquet = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        log = InteractionLogSource(str(path), action_columns=["actions"]).load()
        assert log.action_names == ("like",)
        np.testing.assert_array_equal(unpack(log.actions, 1)[:, 0], log.order.astype(int) % 2 == 1)


@pytest.mark.parametrize("header, values, message", [
    ("liked", lambda u, s: 2 if (u, s) == (1, 2) else 0, "log.csv, line 9: action column 'liked' must hold 0/1 flags, found 2"),
    ("liked,like", lambda u, s: "1,liked", "action type(s) ['liked'] come from more than one action column"),
])
def test_malformed_action_columns_are_one_line_errors(tmp_path, header, values, message):
    path = _write_log(tmp_path, header, values)
    with pytest.raises(DataError) as error:
        InteractionLogSource(str(path), action_columns=header.split(",")).load()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_action_column_is_a_one_line_error(tmp_path):
    path = _write_log(tmp_path, "liked", lambda u, s: 1)
    with pytest.raises(DataError, match=r"missing column\(s\) \['likes'\]; the file has"):
        InteractionLogSource(str(path), action_columns=["likes"]).load()


def test_batches_carry_the_history_actions_and_never_the_targets(tmp_path):
    """Each event's action is its own position in the user's sequence: training inputs and query histories
    carry the actions of their own items; the last event's (the test target's) action is in no input."""
    path = _write_log(tmp_path, "kinds", lambda u, s: f"step{s}")
    data = InteractionDataModule(InteractionLogSource(str(path), action_columns=["kinds"]), min_interactions=3, max_seq_len=8)
    data.setup("fit")
    names = data.action_names
    step_of_bit = {1 << j: int(name.removeprefix("step")) for j, name in enumerate(names)}
    train = next(iter(data.train_dataloader()))
    for inputs, actions in zip(train.input_ids.tolist(), train.actions.tolist()):
        kept = [(i, a) for i, a in zip(inputs, actions) if i > 0]
        assert [step_of_bit[a] for _, a in kept] == list(range(len(kept)))  # steps 0..2: the training part
        assert all(a == 0 for i, a in zip(inputs, actions) if i == 0)
    test = next(iter(data.test_dataloader()))
    for inputs, actions in zip(test.input_ids.tolist(), test.actions.tolist()):
        steps = [step_of_bit[a] for i, a in zip(inputs, actions) if i > 0]
        assert steps == [0, 1, 2, 3]  # the history; step 4 is the target and appears nowhere
    assert next(iter(data.val_dataloader())).actions.shape[1] == 8


def test_no_actions_means_no_action_tensors(tmp_path):
    path = _write_log(tmp_path, "extra", lambda u, s: 0)
    data = InteractionDataModule(InteractionLogSource(str(path)), min_interactions=3)
    data.setup("fit")
    assert data.action_names == () and next(iter(data.train_dataloader())).actions is None


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "u.data").exists(), reason="ML-100K files in ../shared/data are absent")
def test_movielens_ratings_become_actions():
    log = MovieLensSource("ml-100k", data_dir=str(SHARED_DATA / "ml-100k"), download=False, actions_from_ratings=True).load()
    flags = unpack(log.actions, 4)
    assert log.action_names == RATING_ACTIONS and flags[:, 0].all()
    assert 0.4 < flags[:, 1].mean() < 0.7 and 0.1 < flags[:, 3].mean() < 0.3  # liked (>= 4), disliked (<= 2)
    assert not (flags[:, 1] & flags[:, 3]).any()


def _action_data(tmp_path):
    path = _write_log(tmp_path, "kinds", lambda u, s: "like" if (u + s) % 2 else "skip")
    data = InteractionDataModule(InteractionLogSource(str(path), action_columns=["kinds"]), min_interactions=3, max_seq_len=8)
    data.setup("fit")
    return data


@pytest.mark.parametrize("encoder", ["SASRecEncoder", "HSTUEncoder", "MeanPoolEncoder"])
def test_a_targets_action_never_enters_its_query_and_history_actions_do(tmp_path, encoder):
    import torch

    from rails_lightning.models import RetrievalModule, encoders
    from rails_lightning.models.hstu import HSTUEncoder

    data = _action_data(tmp_path)
    cls = HSTUEncoder if encoder == "HSTUEncoder" else getattr(encoders, encoder)
    torch.manual_seed(0)
    model = RetrievalModule(data.num_items, data.num_users, data.max_seq_len, action_names=data.action_names,
                            item_dim=8, query_encoder=cls).eval()
    assert model.hparams.action_names == ["like", "skip"]
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        before = model.encode_queries(batch)
        # Flip the action of every test target (each user's last event) in the store: the queries stay the same.
        store = data.store
        store.actions[store.offsets[1:] - 1] ^= 0b11
        assert torch.equal(model.encode_queries(next(iter(data.test_dataloader()))), before)
        # Flip the actions of the history events instead: the queries change.
        store.actions[store.offsets[1:] - 2] ^= 0b11
        assert not torch.allclose(model.encode_queries(next(iter(data.test_dataloader()))), before)


def test_a_model_with_action_types_refuses_a_batch_without_them(tmp_path):
    import torch

    from rails_lightning.errors import ConfigError
    from rails_lightning.models import RetrievalModule

    data = _action_data(tmp_path)
    model = RetrievalModule(data.num_items, data.num_users, data.max_seq_len, action_names=data.action_names, item_dim=8)
    batch = next(iter(data.test_dataloader()))
    batch.actions = None
    with pytest.raises(ConfigError, match=r"reads action types \['like', 'skip'\]"):
        with torch.no_grad():
            model.encode_queries(batch)


@pytest.mark.slow
def test_fit_with_actions_from_the_command_line(tmp_path):
    """A real CLI fit on a log with an action column: the checkpoint carries the action vocabulary."""
    import os
    import subprocess
    import sys

    from rails_lightning.runs import RunRecord

    path = _write_log(tmp_path, "kinds", lambda u, s: "like" if (u + s) % 2 else "skip")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", "--data.source=InteractionLogSource", f"--data.source.path={path}",
         "--data.source.action_columns=[kinds]", "--data.min_interactions=3", "--model.item_dim=8",
         "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", f"--run_dir={run_dir}"],
        capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = RunRecord.read(run_dir).load_model()
    assert model.action_names == ("like", "skip") and model.action_embedding.weight.shape == (8, 2)
    # The serving index carries the vocabulary: a history may say what was done with each item.
    env = {**os.environ, "WANDB_MODE": "disabled"}

    def command(*args):
        return subprocess.run([sys.executable, "-m", "rails_lightning", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    index = tmp_path / "index"
    assert command("index", f"--ckpt_path={RunRecord.read(run_dir).checkpoint}", f"--out={index}").returncode == 0
    liked = command("retrieve", f"--index={index}", "--history", "1:like,2:like", "--json")
    skipped = command("retrieve", f"--index={index}", "--history", "1:skip,2:skip", "--json")
    assert liked.returncode == 0 and skipped.returncode == 0, liked.stderr[-2000:] + skipped.stderr[-2000:]
    assert json.loads(liked.stdout)["scores"] != json.loads(skipped.stdout)["scores"]  # the actions reach the query
    assert command("retrieve", f"--index={index}", "--user", "0", "--json").returncode == 0
    bad = command("retrieve", f"--index={index}", "--history", "1:loved")
    assert bad.returncode == 1 and "unknown action type(s) ['loved']; this model knows ['like', 'skip']" in bad.stderr


def test_target_groups_are_the_targets_of_an_action_type(tmp_path):
    """Query batches say which targets are of a reported action type; an unknown group is a one-line error."""
    from rails_lightning.errors import ConfigError

    path = _write_log(tmp_path, "kinds", lambda u, s: "like" if (u + s) % 2 else "skip")
    data = InteractionDataModule(InteractionLogSource(str(path), action_columns=["kinds"]), min_interactions=3,
                                 max_seq_len=8, target_groups=["skip", "like"])
    data.setup("fit")
    assert data.target_group_names == ("skip", "like")
    batch = next(iter(data.test_dataloader()))
    # The test target is each user's last event, step 4: liked when (u + 4) is odd.
    users = batch.user_ids.numpy()
    expected_like = (data.store.user_raw_ids[users] + 4) % 2 == 1
    assert batch.target_groups.tolist() == [[0b10] if liked else [0b01] for liked in expected_like]
    with pytest.raises(ConfigError, match=r"--data.target_groups='loved' is not a group of .*action types \['like', 'skip'\]"):
        InteractionDataModule(InteractionLogSource(str(path), action_columns=["kinds"]), min_interactions=3,
                              target_groups=["loved"]).setup("fit")


def test_group_metrics_equal_the_metrics_of_the_groups_queries_alone(tmp_path):
    """A real validation: val/like/... equals the metrics of the same model's rankings computed here, by brute
    force over the corpus, for the queries whose target is liked, their other targets dropped."""
    import lightning.pytorch as pl
    import torch

    from rails_lightning.callbacks import CorpusEvaluation
    from rails_lightning.models import RetrievalModule

    lines = ["user_id,item_id,timestamp,kinds"]
    rng = np.random.default_rng(0)
    for user in range(40):
        for step in range(int(rng.integers(4, 9))):
            lines.append(f"{user},{int(rng.integers(1, 30))},{step},{'like' if rng.random() < 0.5 else 'skip'}")
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    data = InteractionDataModule(InteractionLogSource(str(path), action_columns=["kinds"]), min_interactions=3,
                                 max_seq_len=8, eval_batch_size=7, target_groups=["like"], split="temporal",
                                 val_fraction=0.3, test_fraction=0.2)
    torch.manual_seed(0)
    model = RetrievalModule(data.num_items, data.num_users, data.max_seq_len, action_names=data.action_names, item_dim=8)
    evaluation = CorpusEvaluation(ks=(1, 5, 10))
    trainer = pl.Trainer(max_epochs=1, callbacks=[evaluation], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.validate(model, datamodule=data)
    got = evaluation.last_metrics
    # Brute force: every query's full ranking, its history excluded.
    model.eval()
    hits = {k: [] for k in (1, 5, 10)}
    with torch.no_grad():
        items = model.encode_corpus()  # (N, D)
        for batch in data.val_dataloader():
            scores = model.encode_queries(batch) @ items.T  # (B, N)
            for row in range(len(scores)):
                excluded = batch.exclude_items[batch.exclude_offsets[row]:batch.exclude_offsets[row + 1]]
                ranked = [i + 1 for i in torch.argsort(scores[row], descending=True, stable=True).tolist() if i + 1 not in set(excluded.tolist())]
                liked = {t for t, g in zip(batch.targets[row].tolist(), batch.target_groups[row].tolist()) if t > 0 and g & 1}
                if liked:
                    for k in hits:
                        hits[k].append(len(liked & set(ranked[:k])) / len(liked))
    assert len(hits[10]) > 3
    for k in (1, 5, 10):
        assert got[f"val/like/recall@{k}"] == pytest.approx(np.mean(hits[k]), abs=1e-9)
    assert "val/like/ndcg@10" in got and got["val/like/hr@10"] >= got["val/like/recall@10"]
    assert "val/skip/hr@10" not in got


def _encoder_class(name):
    from rails_lightning.models import encoders
    from rails_lightning.models.hstu import HSTUEncoder

    return partial(HSTUEncoder, time_bias_buckets=64) if name == "HSTUEncoder" else getattr(encoders, name)


@pytest.mark.parametrize("encoder", ["SASRecEncoder", "HSTUEncoder", "MeanPoolEncoder"])
def test_a_history_filter_encodes_the_history_as_if_the_hidden_events_never_happened(encoder):
    """history_filter="liked": every position's state equals the unfiltered model's state (same weights) after the
    latest liked event of the history with the other events taken out; changing a hidden event changes nothing,
    while making it liked does."""
    import torch

    from rails_lightning.models import RetrievalModule

    names, L = ("liked", "seen"), 8
    torch.manual_seed(0)
    common = dict(num_items=30, num_users=4, max_seq_len=L, action_names=names, item_dim=8, query_encoder=_encoder_class(encoder))
    filtered = RetrievalModule(**common, history_filter="liked").eval()
    whole = RetrievalModule(**common).eval()
    whole.load_state_dict(filtered.state_dict())
    rng = np.random.default_rng(0)
    user_ids = torch.arange(3)
    input_ids = torch.from_numpy(rng.integers(1, 31, (3, L)))
    input_ids[0, :2] = 0  # left padding
    actions = torch.from_numpy(rng.integers(0, 4, (3, L))) * (input_ids > 0)
    actions[2] = 0b10  # nothing liked: the empty history
    timestamps = torch.cumsum(torch.from_numpy(rng.integers(1, 10_000, (3, L))), 1) * (input_ids > 0)
    with torch.no_grad():
        states = filtered.encode_sequence(user_ids, input_ids, timestamps, actions)  # (B, L, D)
        for row in range(3):
            shown = [t for t in range(L) if input_ids[row, t] > 0 and actions[row, t] & 1]
            compact = [torch.zeros(L, dtype=torch.long) for _ in range(3)]
            for values, out in zip((input_ids, timestamps, actions), compact):  # encode_sequence's order
                out[L - len(shown):] = values[row, shown]
            expected = whole.encode_sequence(user_ids[row:row + 1], *(v[None] for v in compact))[0]  # (L, D)
            for t in range(L):
                latest = L - len(shown) + sum(s <= t for s in shown) - 1
                torch.testing.assert_close(states[row, t], expected[latest], rtol=1e-5, atol=1e-6)
        hidden = (input_ids > 0) & (actions & 1 == 0)  # (B, L)
        changed_ids = torch.where(hidden, (input_ids % 30) + 1, input_ids)
        changed_actions = torch.where(hidden, actions ^ 0b10, actions)
        changed_times = torch.where(hidden, timestamps + 7, timestamps)
        assert torch.equal(filtered.encode_sequence(user_ids, changed_ids, changed_times, changed_actions), states)
        liked_now = torch.where(hidden, actions | 1, actions)
        assert not torch.allclose(filtered.encode_sequence(user_ids, input_ids, timestamps, liked_now)[:, -1], states[:, -1])


def test_action_options_of_the_model(tmp_path):
    """embed_actions=False reads ids alone (no action parameters; actions change nothing); history_filter must
    name one of the data's action types."""
    import torch

    from rails_lightning.errors import ConfigError
    from rails_lightning.models import RetrievalModule

    data = _action_data(tmp_path)
    torch.manual_seed(0)
    ids_only = RetrievalModule(data.num_items, data.num_users, data.max_seq_len, action_names=data.action_names,
                               embed_actions=False, item_dim=8).eval()
    assert ids_only.action_embedding is None and ids_only.hparams.action_names == ["like", "skip"]
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        before = ids_only.encode_queries(batch)
        batch.actions = batch.actions ^ 0b11
        assert torch.equal(ids_only.encode_queries(batch), before)
    with pytest.raises(ConfigError, match=r"--model.history_filter='loved' is not an action type of the data, which has its action types \['like', 'skip'\]"):
        RetrievalModule(data.num_items, action_names=data.action_names, history_filter="loved")
    with pytest.raises(ConfigError, match="which has no action types"):
        RetrievalModule(data.num_items, history_filter="liked")


def test_shuffled_history_actions_keep_the_logged_target_groups(tmp_path):
    """shuffle_history_actions: the query encoder is shown the same action masks permuted across all events (by
    its seed), while the target groups, and so the evaluation, stay those of the logged actions."""
    from rails_lightning.errors import ConfigError

    path = _write_log(tmp_path, "kinds", lambda u, s: ["like", "skip", "like|share"][(u * 5 + s) % 3])

    def data(**options):
        module = InteractionDataModule(InteractionLogSource(str(path), action_columns=["kinds"]), min_interactions=3,
                                       max_seq_len=8, target_groups=["like", "skip"], **options)
        module.setup("fit")
        return module

    logged, shuffled, again = data(), data(shuffle_history_actions=True), data(shuffle_history_actions=True)
    assert sorted(shuffled.history_actions.tolist()) == sorted(logged.store.actions.tolist())
    assert (shuffled.history_actions != logged.store.actions).mean() > 0.3
    np.testing.assert_array_equal(again.history_actions, shuffled.history_actions)  # the seed's draw
    assert not np.array_equal(data(shuffle_history_actions=True, action_shuffle_seed=1).history_actions, shuffled.history_actions)
    np.testing.assert_array_equal(shuffled.store.actions, logged.store.actions)  # the log itself is untouched
    for stage in ("val", "test"):
        a, b = next(iter(logged.query_loader(stage))), next(iter(shuffled.query_loader(stage)))
        assert torch_equal(a.input_ids, b.input_ids) and torch_equal(a.targets, b.targets)
        assert torch_equal(a.target_groups, b.target_groups) and not torch_equal(a.actions, b.actions)
    rows = [{u: (i, a) for u, i, a in zip(batch.user_ids.tolist(), batch.input_ids.tolist(), batch.actions.tolist())}
            for batch in (next(iter(m.train_dataloader())) for m in (logged, shuffled))]  # user -> (inputs, actions)
    assert rows[0].keys() == rows[1].keys() and all(rows[0][u][0] == rows[1][u][0] for u in rows[0])
    assert any(rows[0][u][1] != rows[1][u][1] for u in rows[0])
    no_actions = InteractionDataModule(InteractionLogSource(str(path)), min_interactions=3, shuffle_history_actions=True)
    with pytest.raises(ConfigError, match="--data.shuffle_history_actions: .* has no action types to shuffle"):
        no_actions.setup("fit")


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
@pytest.mark.filterwarnings("ignore:There is a wandb run")
def test_ablation_table_over_tiny_real_runs(tmp_path, monkeypatch):
    """Four tiny fits through the CLI (two variants x two seeds, target groups on a temporal split); `report --table
    --metrics` over them has a row per variant with the group metrics as mean ± std over the seeds."""
    import math

    from rails_lightning.__main__ import main as command_main
    from rails_lightning.cli import main
    from rails_lightning.runs import RunRecord

    lines = ["user_id,item_id,timestamp,kinds"]
    rng = np.random.default_rng(0)
    for user in range(60):
        for step in range(12):
            item = int(rng.integers(1, 40))
            lines.append(f"{user},{item},{user * 7 + step * 100},{'like' if item % 3 else 'skip'}")
    log = tmp_path / "log.csv"
    log.write_text("\n".join(lines) + "\n")
    common = ["fit", "--data.source=InteractionLogSource", f"--data.source.path={log}", "--data.source.action_columns=[kinds]",
              "--data.split=temporal", "--data.val_fraction=0.2", "--data.test_fraction=0.2", "--data.target_groups=[like, skip]",
              "--data.min_interactions=3", "--data.max_seq_len=8", "--model.item_dim=8", "--trainer.max_epochs=2",
              "--trainer.enable_progress_bar=false"]
    variants = {"ids": ["--model.embed_actions=false"], "liked": ["--model.embed_actions=false", "--model.history_filter=like"]}
    monkeypatch.setenv("WANDB_MODE", "disabled")
    runs = {}
    for variant, options in variants.items():
        for seed in (0, 1):
            runs[variant, seed] = tmp_path / "runs" / f"{variant}-{seed}"
            main([*common, *options, f"--seed_everything={seed}", f"--run_dir={runs[variant, seed]}"])
    keys = ["test/hr@10", "test/like/hr@10", "test/skip/recall@10"]
    records = {name: RunRecord.read(path) for name, path in runs.items()}
    assert all(key in record.test for record in records.values() for key in keys)
    assert command_main(["report", "--table", str(tmp_path / "runs"), "--metrics", *keys, "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "results_table.md").read_text()
    table = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0][:5] == ["config", "seeds", *keys]
    rows = {("liked" if "history_filter=like" in row[0] else "ids"): row for row in table[1:]}
    assert len(table) == 3 and set(rows) == {"ids", "liked"}
    for variant, row in rows.items():
        assert row[1] == "2"
        for column, key in enumerate(keys, start=2):
            values = [records[variant, seed].test[key] for seed in (0, 1)]
            mean = sum(values) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in values))  # sample std of two values
            assert row[column] == f"{mean:.4f} ± {std:.4f}", (variant, key)
