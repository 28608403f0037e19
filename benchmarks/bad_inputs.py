"""Run rails_lightning against bad inputs and faults, as a new user would, and tabulate what happens.

    python benchmarks/bad_inputs.py [--repo DIR] [--old_keys] [--out FILE.md] [--cases 1 3 39 | --tiny]

Each case runs ``python -m rails_lightning ...`` as a subprocess (W&B disabled) in a scratch folder
with the files the case needs, and the table gives the exit code and the last line the command
printed on stderr (the error message; for a run that works, the line that says what it did).
``--repo`` runs another checkout's code (e.g. an older commit, to show a case failed before);
``--old_keys`` spells model options as that older code did (``--model.init_args.X``). In the table,
``TINY`` stands for the arguments that shrink the default run to seconds (``TINY[6:]``: those without
the synthetic data sizes). ``--cases`` runs only the cases of those numbers; ``--tiny`` runs two
that need no fit (1 and 39: seconds), to check that the script works.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = [
    "--data.source.init_args.num_users=150", "--data.source.init_args.num_items=200",
    "--data.source.init_args.num_clusters=8", "--data.source.init_args.mean_sequence_length=12",
    "--data.max_seq_len=12", "--data.batch_size=32", "--model.item_dim=16", "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false", "--trainer.logger=false",
]
TINY_CASES = (1, 39)  # --tiny: an unknown option, a missing sweep file


def _log(rows: list[tuple], path: Path) -> Path:
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    return path


def log_with(path: Path, rows: list[tuple], column: str, value) -> str:
    """A log of ``rows`` (user, item, time) with one more column, ``value(row number)`` in each row."""
    path.write_text(f"user_id,item_id,timestamp,{column}\n" + "".join(f"{u},{i},{t},{value(r)}\n" for r, (u, i, t) in enumerate(rows)))
    return str(path)


def _reconsumption_rows() -> list[tuple]:
    import random

    rng, rows = random.Random(0), []
    for user in range(40):
        sequence = rng.sample(range(1, 21), 6)
        if user % 2 == 0:
            sequence[-1] = sequence[1]
        rows += [(user, item, t) for t, item in enumerate(sequence)]
    return rows


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def serve(folder: Path) -> str:
    """Serve ``folder`` over HTTP on localhost (a daemon thread); the base URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def beir_folder(folder: Path, corpus: str | None = None, extra_qrels: str = "") -> str:
    """A tiny BEIR-format folder (3 documents, 2 queries; train and test qrels), ``corpus`` replacing corpus.jsonl's
    text and ``extra_qrels`` appended to qrels/train.tsv."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    documents = "".join(f'{{"_id": "d{i}", "title": "title {i}", "text": "text {i}"}}\n' for i in range(3))
    (folder / "corpus.jsonl").write_text(documents if corpus is None else corpus)
    (folder / "queries.jsonl").write_text('{"_id": "q0", "text": "first"}\n{"_id": "q1", "text": "second"}\n')
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n" + extra_qrels)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return str(folder)


def cases(work: Path, url: str) -> list[tuple]:
    """(case, arguments after `python -m rails_lightning`[, the text of the line to show]); files go into ``work``."""
    log = lambda name, rows: str(_log(rows, work / name))  # noqa: E731
    items = lambda path, *extra: ["--data.source.items=ItemTable", f"--data.source.items.path={path}",  # noqa: E731
                                  "--data.source.items.text_columns=[title]", *extra]
    src = lambda path, *extra: ["--data.source=InteractionLogSource", f"--data.source.path={path}", *extra]  # noqa: E731
    good = [(u, i, t) for u in range(30) for t, i in enumerate(range(1 + u % 5, 9 + u % 5))]
    (work / "empty.csv").write_text("")
    (work / "nomovies").mkdir()
    (work / "header.csv").write_text("user_id,item_id,timestamp\n")
    (work / "nocol.csv").write_text("user_id,item,timestamp\n1,2,3\n")
    (work / "frac.csv").write_text("user_id,item_id,timestamp\n1,10,1\n2.5,11,2\n")
    (work / "badtime.csv").write_text("user_id,item_id,timestamp\n1,10,2001-01-01\n1,11,yesterday\n")
    (work / "notime.csv").write_text("user_id,item_id,timestamp\n1,10,5\n1,11,\n")
    (work / "trunc.csv.gz").write_bytes(gzip.compress(b"user_id,item_id,timestamp\n" + b"1,2,3\n" * 1000)[:200])
    (work / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    (work / "bad.jsonl").write_text('{"user_id": 1, "item_id": 2, "timestamp": 3}\n{"user_id": 1, \n')
    (work / "log.xlsx").write_text("x")
    (work / "dup_items.csv").write_text("item_id,title,year\n1,Alpha,1990\n1,Beta,1991\n")
    (work / "noid_items.csv").write_text("movie,title\n1,Alpha\n")
    (work / "badyear_items.csv").write_text("item_id,title,year\n1,Alpha,1990\n2,Beta,soon\n")
    (work / "partial_items.csv").write_text("item_id,title\n1,Alpha\n2,Beta\n")
    (work / "bad.yaml").write_text("model:\n  item_dim: [1\n")
    (work / "random.ckpt").write_bytes(os.urandom(4096))
    with open(work / "evil.ckpt", "wb") as f:
        import torch

        torch.save({"state_dict": {}, "payload": _Payload()}, f)
    for name, ks in (("ks_large.yaml", "[10, 10000]"), ("ks_20.yaml", "[10, 20]")):
        (work / name).write_text(
            "trainer:\n  callbacks:\n    - class_path: rails_lightning.callbacks.CorpusEvaluation\n"
            f"      init_args: {{ks: {ks}}}\n    - class_path: rails_lightning.callbacks.ModelCheckpoint\n"
            "      init_args: {monitor: val/hr@10, mode: max, save_last: true}\n"
        )
    text_ids = [(f"U{u}", f"B0{i:07d}X", t) for u, i, t in good]
    acted = log_with(work / "acted.csv", good, "kinds", lambda r: "like" if r % 2 else "skip")  # a log with action types
    two_columns = work / "two_columns.csv"
    two_columns.write_text("user_id,item_id,timestamp,liked,kinds\n" + "".join(f"{u},{i},{t},1,liked\n" for u, i, t in good))
    beir = lambda folder, *extra: ["--data.source=BeirSource", f"--data.source.data_dir={folder}", "--data.max_seq_len=1", *extra]  # noqa: E731
    (Path(beir_folder(work / "beir_missing")) / "corpus.jsonl").unlink()
    beir_folder(work / "beir_unknown", extra_qrels="q0\td7\t1\n")
    beir_folder(work / "beir_empty", corpus="")
    beir_folder(work / "beir_malformed", corpus='{"_id": "d0", "title": "t", "text": "x"}\n{"_id": "d1", "title": \n')
    beir_folder(work / "beir_good")
    sweep_no_cap = work / "no_cap.yaml"
    sweep_no_cap.write_text(
        "method: random\nmetric: {name: val/hr@10, goal: maximize}\n"
        'command: ["${env}", "${interpreter}", "-m", "rails_lightning", "fit", "${args}"]\n'
        "parameters:\n  model.learning_rate: {min: 0.0001, max: 0.01}\n"
    )
    sweep_bad_metric = work / "bad_metric.yaml"
    sweep_bad_metric.write_text(
        "method: grid\nmetric: {name: val/hr@11, goal: maximize}\n"
        'command: ["${env}", "${interpreter}", "-m", "rails_lightning", "fit", "${args}"]\n'
        "parameters:\n  seed_everything: {values: [0]}\n"
    )
    return [
        ("unknown option", ["fit", "--model.nonexistent=3"]),
        ("option of the wrong type", ["fit", "--data.batch_size=many"]),
        ("--config file missing", ["fit", "--config", "nope.yaml"]),
        ("--config YAML syntax error", ["fit", "--config", str(work / "bad.yaml")]),
        ("unknown class for a class_path", ["fit", "--data.source=NoSuchSource"]),
        ("no negatives", ["fit", "--model.objective.init_args.num_negatives=0", *TINY]),
        ("attention heads do not divide the dimension", ["fit", "--model.query_encoder.init_args.num_heads=3", *TINY]),
        ("negative max_epochs", ["fit", "--trainer.max_epochs=-5"]),
        ("log file not found", ["fit", *src(work / "nope.csv")]),
        ("empty log file", ["fit", *src(work / "empty.csv")]),
        ("header-only log file", ["fit", *src(work / "header.csv")]),
        ("missing column", ["fit", *src(work / "nocol.csv")]),
        ("fractional id", ["fit", *src(work / "frac.csv")]),
        ("unparseable timestamp", ["fit", *src(work / "badtime.csv")]),
        ("empty timestamp", ["fit", *src(work / "notime.csv")]),
        ("truncated gzip", ["fit", *src(work / "trunc.csv.gz")]),
        ("corrupt parquet", ["fit", *src(work / "bad.parquet")]),
        ("malformed json lines", ["fit", *src(work / "bad.jsonl")]),
        ("unknown file extension", ["fit", *src(work / "log.xlsx")]),
        ("min_interactions above every user", ["fit", "--data.min_interactions=1000", *TINY]),
        ("temporal split without timestamps", ["fit", "--data.split=temporal", *TINY]),
        ("empty validation split (point 6)", ["fit", *src(log("t.csv", good)), "--data.split=temporal", "--data.val_fraction=0", *TINY[6:]]),
        ("users with 3 events: empty training set (6)", ["fit", *src(log("three.csv", [(u, i, i) for u in range(20) for i in range(1, 4)])), "--data.min_interactions=1", *TINY[6:]]),
        ("MovieLens files absent, download off", ["fit", "--data.source=MovieLensSource", f"--data.source.data_dir={work / 'nomovies'}", "--data.source.download=false"]),
        ("every row twice (point 3)", ["fit", *src(log("twice.csv", [r for r in good for _ in range(2)])), *TINY[6:]], "duplicate"),
        ("re-consumed targets, 20 items (point 4)", ["test", *src(log("reconsume.csv", _reconsumption_rows())), "--data.min_interactions=3", *TINY[6:], "--config", str(work / "ks_20.yaml")], "test/hr@20"),
        ("corpus smaller than max(ks) (point 5)", ["fit", *src(log("small.csv", good)), *TINY[6:]], "go beyond|max\\(ks\\)"),
        ("ks [10, 10000] (point 5)", ["fit", *TINY, "--config", str(work / "ks_large.yaml")], "go beyond|max\\(ks\\)|Error"),
        ("text user and item ids (point 11)", ["fit", *src(log("text.csv", text_ids)), *TINY[6:]], "^TwoTower|Error"),
        ("learning rate 1e6: NaN loss (point 2)", ["fit", *TINY, "--model.learning_rate=1e6"]),
        ("checkpoint not found", ["validate", "--ckpt_path=nope.ckpt", *TINY]),
        ("checkpoint of random bytes", ["validate", f"--ckpt_path={work / 'random.ckpt'}", *TINY]),
        ("crafted checkpoint that runs code (point 1)", ["validate", f"--ckpt_path={work / 'evil.ckpt'}", *TINY]),
        ("crafted checkpoint given by URL (point 1)", ["validate", f"--ckpt_path={url}/evil.ckpt", *TINY]),
        ("--weights_only=false (point 1)", ["validate", "--weights_only=false", *TINY]),
        ("validate without a checkpoint (point 11)", ["validate", *TINY], "ckpt_path|val/hr@10"),
        ("fit into a finished run's directory (point 11)", ["fit", *TINY, f"--run_dir={work / 'done'}"]),
        ("report of a folder that is not a run", ["report", str(work / "nomovies")]),
        ("sweep file missing", ["sweep", "nope.yaml"]),
        ("sweep metric never logged (point 8)", ["sweep", str(sweep_bad_metric), "--", *TINY]),
        ("sweep whose every trial fails (point 8)", ["sweep", "sweeps/mol_vs_dot.yaml", "--count", "1", f"--out={work / 'sw'}", "--", *TINY, "--model.learning_rate=1e6"]),
        ("random sweep without --count or run_cap", ["sweep", str(sweep_no_cap)]),
        # Item metadata (an item table joined to the log) and action types.
        ("item table not found", ["fit", *src(log("g.csv", good), *items(work / "nope_items.csv")), *TINY[6:]]),
        ("item table without its id column", ["fit", *src(log("g.csv", good), *items(work / "noid_items.csv")), *TINY[6:]]),
        ("item table with a repeated id", ["fit", *src(log("g.csv", good), *items(work / "dup_items.csv")), *TINY[6:]]),
        ("item table with a non-number in a numeric column", ["fit", *src(log("g.csv", good), *items(work / "badyear_items.csv", "--data.source.items.numeric_columns=[year]")), *TINY[6:]]),
        ("items without a metadata row: counted, empty content", ["fit", *src(log("g.csv", good), *items(work / "partial_items.csv")), *TINY[6:], "--model.item_tower=ContentTower"], "no row in the item table|Error"),
        ("content tower without item content", ["fit", *src(log("g.csv", good)), *TINY[6:], "--model.item_tower=ContentTower"]),
        ("unknown action column", ["fit", *src(log("g.csv", good), "--data.source.action_columns=[liked]"), *TINY[6:]]),
        ("action column that is not 0/1, a list or names", ["fit", *src(log_with(work / "acts.csv", good, "liked", lambda r: 2 if r == 5 else 0), "--data.source.action_columns=[liked]"), *TINY[6:]]),
        ("action type named in two action columns", ["fit", *src(str(two_columns), "--data.source.action_columns=[liked,kinds]"), *TINY[6:]]),
        ("target group that is no action type", ["fit", *src(acted, "--data.source.action_columns=[kinds]"), "--data.target_groups=[loved]", *TINY[6:]]),
        ("history filter that is no action type", ["fit", *src(acted, "--data.source.action_columns=[kinds]"), "--model.history_filter=loved", *TINY[6:]]),
        ("shuffled actions of a log without actions", ["fit", *src(log("g.csv", good)), "--data.shuffle_history_actions=true", *TINY[6:]]),
        ("retrieve --history with an action the model lacks", ["retrieve", f"--index={work / 'acted_index'}", "--history", "1:loved"]),
        # Document search: BEIR-format folders and text query towers.
        ("BEIR folder without corpus.jsonl", ["fit", *beir(work / "beir_missing", "--data.split=by_query")]),
        ("BEIR qrels naming an unknown document", ["fit", *beir(work / "beir_unknown", "--data.split=by_query")]),
        ("BEIR corpus that is empty", ["fit", *beir(work / "beir_empty", "--data.split=by_query")]),
        ("BEIR corpus with a malformed json line", ["fit", *beir(work / "beir_malformed", "--data.split=by_query")]),
        ("BEIR folder without split=by_query", ["fit", *beir(work / "beir_good")]),
        ("text query tower on data without query texts", ["fit", *TINY, "--model.query_encoder=MeanPooledTokens"]),
    ]


def old_spelling(args: list[str]) -> list[str]:
    """Model options as the code before the architecture pass spelled them."""
    out = []
    for arg in args:
        if arg.startswith("--model.") and not arg.startswith("--model.init_args."):
            arg = "--model.init_args." + arg[len("--model.") :]
        out.append(arg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout whose code runs")
    parser.add_argument("--old_keys", action="store_true", help="spell model options as --model.init_args.X")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--cases", type=int, nargs="+", default=None, help="run only these cases (their numbers in the table)")
    parser.add_argument("--tiny", action="store_true", help="run cases 1 and 39 only (no fit): checks that the script works")
    args = parser.parse_args()
    chosen = set(TINY_CASES if args.tiny else args.cases or [])
    repo = Path(args.repo).resolve()
    cache = tempfile.mkdtemp()
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1", "RAILS_LIGHTNING_CACHE": cache}
    rows = ["| # | case | command (`python -m rails_lightning ...`) | exit | last line on stderr (or the line that shows the result) |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        url = serve(work)
        selected = [(n, case) for n, case in enumerate(cases(work, url), start=1) if not chosen or n in chosen]
        if any(f"--run_dir={work / 'done'}" in case[1] for _, case in selected):  # the finished run that case refuses to overwrite
            done = subprocess.run([sys.executable, "-m", "rails_lightning", "fit", *(old_spelling(TINY) if args.old_keys else TINY),
                                   f"--run_dir={work / 'done'}"], cwd=repo, env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        if any(f"--index={work / 'acted_index'}" in case[1] for _, case in selected):  # a serving index of a model with action types
            acted_log = ["--data.source=InteractionLogSource", f"--data.source.path={work / 'acted.csv'}", "--data.source.action_columns=[kinds]"]
            fit = subprocess.run([sys.executable, "-m", "rails_lightning", "fit", *acted_log, *TINY[6:], f"--run_dir={work / 'acted_run'}"],
                                 cwd=repo, env=env, capture_output=True, text=True)
            assert fit.returncode == 0, fit.stderr[-2000:]
            checkpoint = sorted((work / "acted_run" / "checkpoints").glob("*.ckpt"))[0]
            index = subprocess.run([sys.executable, "-m", "rails_lightning", "index", f"--ckpt_path={checkpoint}", f"--out={work / 'acted_index'}"],
                                   cwd=repo, env=env, capture_output=True, text=True)
            assert index.returncode == 0, index.stderr[-2000:]
        for number, (name, argv, *pick) in selected:
            (repo / "PWNED").unlink(missing_ok=True)
            if argv[0] in ("fit", "validate", "test") and not any(a.startswith("--run_dir") for a in argv):
                argv = [*argv, f"--run_dir={work / f'run{number}'}"]
            argv = old_spelling(argv) if args.old_keys else argv
            result = subprocess.run([sys.executable, "-m", "rails_lightning", *argv], cwd=repo, env=env,
                                    capture_output=True, text=True, timeout=900)
            lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(" ")]
            if pick:  # a run that works: the line that shows what it did
                lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if re.search(pick[0], line)]
            last = (lines[-1] if lines else "").replace("|", "\\|")[:220]
            shown = " ".join(argv).replace(" ".join(old_spelling(TINY) if args.old_keys else TINY), "TINY")
            shown = shown.replace(" ".join((old_spelling(TINY) if args.old_keys else TINY)[6:]), "TINY[6:]")
            shown = shown.replace(str(work), "<tmp>").replace(str(repo), ".").replace("|", "\\|")
            pwned = " **(code ran: PWNED written)**" if (repo / "PWNED").exists() else ""
            (repo / "PWNED").unlink(missing_ok=True)
            last = last.replace(str(work), "<tmp>").replace(cache, "<cache>").replace(str(repo), ".")  # no machine paths in the table
            rows.append(f"| {number} | {name} | `{shown}` | {result.returncode} | {last}{pwned} |")
            print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
