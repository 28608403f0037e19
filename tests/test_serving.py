"""From a trained model to answers: `index` exports, `retrieve` answers (dot product and MoL), the answers
equal the model's own exact top-k, and `report --leaderboard` ranks a sweep's runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_CLI_ARGS
from rails_lightning.__main__ import main as command_main
from rails_lightning.models import RetrievalModule
from rails_lightning.retrieval import SearchOptions
from rails_lightning.runs import RunRecord
from rails_lightning.serving import ServingIndex

SMALL_MOL = ["--model=MoL", *(f"--model.similarity.init_args.{k}={v}" for k, v in
                              (("num_query_components", 2), ("num_item_components", 2), ("component_dim", 16)))]


def _run(args, cwd):
    result = subprocess.run([sys.executable, "-m", "rails_lightning", *args], capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module", params=["TwoTower", "MoL"])
def exported(request, tmp_path_factory):
    """A tiny fitted run of the model and its exported index: (run directory, index directory)."""
    root = tmp_path_factory.mktemp(request.param)
    run_dir = root / "run"
    _run(["fit", *TINY_CLI_ARGS, *(SMALL_MOL if request.param == "MoL" else []), f"--run_dir={run_dir}"], root)
    record = RunRecord.read(run_dir)
    _run(["index", f"--ckpt_path={record.checkpoint}", f"--out={root / 'index'}"], root)
    return run_dir, root / "index"


@pytest.mark.slow
def test_index_files_are_plain_formats(exported):
    _, index_dir = exported
    names = {p.name for p in index_dir.iterdir()}
    assert {"manifest.json", "index.safetensors", "ids.json"} <= names
    assert not any(name.endswith((".pt", ".pkl", ".ckpt")) for name in names)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["corpus_size"] == len(json.loads((index_dir / "ids.json").read_text())["rows"])
    assert ("items.faiss" in names) == (manifest["model"] == "TwoTower")


@pytest.mark.slow
def test_retrieve_prints_ten_items_with_scores_and_latency(exported, tmp_path):
    run_dir, index_dir = exported
    user = json.loads((index_dir / "ids.json").read_text())["users"][5]
    table = _run(["retrieve", f"--index={index_dir}", f"--user={user}"], tmp_path).stdout
    assert table.splitlines()[0].split() == ["rank", "item", "score", "title"] and "10 items in" in table
    answer = json.loads(_run(["retrieve", f"--index={index_dir}", f"--user={user}", "--json", "--exclude-history"], tmp_path).stdout)
    assert len(answer["items"]) == 10 and answer["latency_ms"] > 0
    assert answer["scores"] == sorted(answer["scores"], reverse=True)
    history = ServingIndex(index_dir).user_history(str(user))
    raw_history = {json.loads((index_dir / "ids.json").read_text())["model_items"][i - 1] for i in history.tolist()}
    assert not set(answer["items"]) & raw_history


@pytest.mark.slow
def test_interactive_retrieve_survives_bad_queries(exported, tmp_path):
    """A prompt per query; an unknown user, an unknown item or a bare `user` prints one error line and the
    session goes on to the next query."""
    _, index_dir = exported
    ids = json.loads((index_dir / "ids.json").read_text())
    user, item = ids["users"][5], ids["model_items"][3]
    queries = ["user 999999", "no-such-item", "user", f"user {user}", f"{item}", ""]
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "retrieve", f"--index={index_dir}", "--interactive", "--json"],
        input="\n".join(queries) + "\n", capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == 2 and all(len(answer["items"]) == 10 for answer in answers)
    errors = [line for line in result.stderr.splitlines() if "rails_lightning: error:" in line]
    assert len(errors) == 3 and "999999" in errors[0] and "no-such-item" in errors[1] and "needs an id" in errors[2]
    assert result.stderr.count("query (") == len(queries)


@pytest.mark.slow
def test_a_text_query_to_a_model_of_histories_is_one_line_error(exported, tmp_path):
    _, index_dir = exported
    result = subprocess.run([sys.executable, "-m", "rails_lightning", "retrieve", f"--index={index_dir}", "--query", "space adventure"],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "rails_lightning: error: this index's model encodes histories (SASRecEncoder), not texts: query it with --user or "
        "--history; --query needs a model trained with a text query tower (configs/scifact/*.yaml)"
    ]


@pytest.mark.slow
def test_answers_equal_the_models_exact_top_k(exported):
    """The exported index answers as the checkpoint's own model does (same query, same corpus, exact search)."""
    run_dir, index_dir = exported
    serving = ServingIndex(index_dir)
    model = RetrievalModule.load_from_checkpoint(RunRecord.read(run_dir).checkpoint, weights_only=True).eval()
    data = RunRecord.read(run_dir).datamodule()
    for user in (0, 7, 42):
        raw_user = data.store.user_raw_ids[user].item()
        batch = serving.query(serving.user_history(str(raw_user)), str(raw_user))
        answer = serving.retrieve(batch, 10, exclude_history=True)
        with torch.no_grad():
            _, ids = model.exact_retriever(model.encode_corpus(), SearchOptions()).search(model.encode_queries(batch), 10, batch.exclusion)
        assert answer.item_ids == [data.store.item_raw_ids[i] for i in ids[0].tolist()]


def _fake_run(run_dir, val_hr10: float, status: str = "finished") -> None:
    RunRecord(run_dir=str(run_dir), status=status, model="TwoTower", config={"model": {"learning_rate": val_hr10 / 100}},
              val={"val/hr@10": val_hr10, "val/hr@1": val_hr10 / 3}, test={"test/hr@10": val_hr10 - 0.01},
              created="2026-11-23T12:00:00").write()


def _table_rows(markdown: str) -> list[list[str]]:
    """The body rows of a markdown table, as lists of cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]


def test_leaderboard_ranks_a_sweeps_runs(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    trials = {"00-TwoTower-seed0": 0.21, "01-TwoTower-seed1": 0.45, "02-TwoTower-seed2": 0.33, "03-TwoTower-seed3": None}
    for name, hr10 in trials.items():
        if hr10 is not None:
            _fake_run(sweep_dir / name, hr10)
        else:
            (sweep_dir / name).mkdir(parents=True)
    record = {"trials": [{"name": name, "status": "finished" if hr10 else "failed (exit 1)", "params": {}} for name, hr10 in trials.items()]}
    (sweep_dir / "sweep.json").write_text(json.dumps(record))
    assert command_main(["report", "--leaderboard", str(sweep_dir), "--out", str(tmp_path / "out")]) == 0
    rows = _table_rows((tmp_path / "out" / "leaderboard.md").read_text())
    assert [row[:2] for row in rows] == [["1", "01-TwoTower-seed1"], ["2", "02-TwoTower-seed2"], ["3", "00-TwoTower-seed0"]]
    assert "3 of 4 runs" in capsys.readouterr().out
    assert command_main(["report", "--leaderboard", str(sweep_dir), "--metric", "test/hr@10", "--out", str(tmp_path / "t")]) == 0
    assert _table_rows((tmp_path / "t" / "leaderboard.md").read_text())[0][:2] == ["1", "01-TwoTower-seed1"]


@pytest.fixture(scope="module", params=["TwoTower", "MoL"])
def catalogue_run(request, tmp_path_factory):
    """A tiny fitted run over 1,500 items (so that 1,000 can arrive later)."""
    root = tmp_path_factory.mktemp(f"catalogue-{request.param}")
    run_dir = root / "run"
    _run(["fit", *TINY_CLI_ARGS, "--data.source.init_args.num_items=1500", "--data.source.init_args.num_clusters=30",
          "--data.source.init_args.num_users=2000",
          *(SMALL_MOL if request.param == "MoL" else []), f"--run_dir={run_dir}"], root)
    return root, RunRecord.read(run_dir)


@pytest.mark.slow
def test_1000_items_added_through_the_delta_answer_as_a_rebuild(catalogue_run):
    root, record = catalogue_run
    model_items = RunRecord.read(record.run_dir).datamodule().store.item_raw_ids[1:].tolist()
    assert len(model_items) > 1200
    first, later = model_items[:-1000], model_items[-1000:]
    (root / "first.txt").write_text("\n".join(map(str, first)))
    (root / "later.txt").write_text("\n".join(map(str, later)))
    grown, rebuilt = root / "grown", root / "rebuilt"
    _run(["index", f"--ckpt_path={record.checkpoint}", f"--out={grown}", f"--items=@{root / 'first.txt'}"], root)
    _run(["index", "--add", f"--ckpt_path={record.checkpoint}", f"--out={grown}", f"--items=@{root / 'later.txt'}"], root)
    _run(["index", f"--ckpt_path={record.checkpoint}", f"--out={rebuilt}"], root)
    assert (grown / "delta.safetensors").is_file() and not (rebuilt / "delta.safetensors").exists()

    def answers(index_dir):
        serving = ServingIndex(index_dir)
        users = json.loads((index_dir / "ids.json").read_text())["users"][:25]
        return [serving.retrieve(serving.query(serving.user_history(str(u)), str(u)), 10, exclude).item_ids
                for u in users for exclude in (False, True)]

    expected = answers(rebuilt)
    assert answers(grown) == expected
    assert any(item in later for top in expected for item in top)  # the new items do come up
    _run(["index", "--compact", f"--out={grown}"], root)
    assert not (grown / "delta.safetensors").exists()
    assert json.loads((grown / "manifest.json").read_text())["corpus_size"] == len(model_items)
    assert answers(grown) == expected
