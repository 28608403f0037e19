"""Dot product vs Mixture-of-Logits next to the Bayes-optimal HR@10, on data whose truth is known.

For each setting -- ``mixture`` (every user has ``--interests`` interests) and ``single`` (one interest,
the switch) -- and each seed, one process:

1. builds ``KnownTruthSource`` data (the seed drives the data and the model initialisation);
2. trains the two-tower model (``DotProduct``) and the MoL model (``MixtureOfLogits``) with the same
   encoder (mean of the history's item embeddings, then a linear map), item dimension, negatives and
   epochs, and evaluates each on the leave-one-out test queries (full corpus, history excluded);
3. computes from the true next-item distributions the Bayes-optimal HR@10 (the expected hit rate of the
   best possible ranking), the realised HR@10 of that ranking against the drawn test targets, and the
   *expected* HR@10 of every model's and of the popularity baseline's top 10 (the true probability mass
   they cover: the same quantity as HR@10 without the noise of drawing one target per query).

    PYTHONPATH=. python benchmarks/known_truth.py [--seeds 3] [--epochs 8] [--item_dim 16] [--out known_truth.md]

Prints a Markdown table (mean ± std over seeds) and writes it to ``--out`` when given. ``--tiny`` shrinks
everything (one seed, 200 users, 100 items, 16 negatives, one epoch) to check in seconds that it runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np

SETTINGS = {"mixture": None, "single": 1}  # interests per user; None: --interests


def run_setting(setting: str, interests: int, seed: int, args) -> dict:
    import lightning.pytorch as pl
    import torch

    from rails_lightning.callbacks import CorpusEvaluation
    from rails_lightning.data import InteractionDataModule, KnownTruthSource
    from rails_lightning.data.known_truth import bayes_optimal_hit_rate, bayes_optimal_ranking, expected_hit_rate, query_truth
    from rails_lightning.models import MeanPoolEncoder, RetrievalModule
    from rails_lightning.objectives import FullSoftmax, SharedNegatives
    from rails_lightning.baseline import PopularityTopK, popularity_baseline
    from rails_lightning.similarity import DotProduct, MixtureOfLogits

    class TopKRecorder(CorpusEvaluation):
        """The framework's evaluation, also keeping every test query's top-10 ids (for the expected hit rate)."""

        def on_test_epoch_start(self, trainer, pl_module):
            super().on_test_epoch_start(trainer, pl_module)
            self.test_topk = []

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
            self.test_topk.append(self.retriever.search(outputs, 10, batch.exclusion)[1].cpu().numpy())

    source = KnownTruthSource(
        num_users=args.num_users, num_items=args.num_items, num_clusters=args.num_clusters,
        interests_per_user=interests, mean_sequence_length=args.mean_sequence_length, seed=seed,
    )
    data = InteractionDataModule(source, max_seq_len=args.max_seq_len, batch_size=args.batch_size, eval_batch_size=1000)
    truth = query_truth(data, "test")
    bayes_top10 = bayes_optimal_ranking(truth.probabilities, 10)
    popularity = PopularityTopK(data.visible_item_counts("test"))
    popularity_top10 = np.concatenate([
        popularity.search(torch.zeros(len(b.user_ids)), 10, b.exclusion)[1].numpy() for b in data.query_loader("test", sharded=False)
    ])  # ties broken by id, not against the target: the ranking the expected rate scores
    row = {
        "setting": setting, "seed": seed, "mean_length": float(data.store.lengths.mean()),
        "bayes_expected": bayes_optimal_hit_rate(truth.probabilities, 10),
        "bayes_realised": float(np.mean((bayes_top10 == truth.targets[:, None]).any(axis=1))),
        "popularity_realised": popularity_baseline(data, "test", ks=(10,))["test/hr@10"],
        "popularity_expected": expected_hit_rate(truth.probabilities, popularity_top10),
    }
    similarities = {
        "dot": functools.partial(DotProduct),
        "mol": functools.partial(
            MixtureOfLogits, num_query_components=args.query_components, num_item_components=args.item_components,
            component_dim=args.item_dim, component_hidden_dim=4 * args.item_dim,
        ),
    }
    for name, similarity in similarities.items():
        pl.seed_everything(seed, verbose=False)
        model = RetrievalModule(
            data.num_items, data.num_users, data.max_seq_len, item_dim=args.item_dim,
            query_encoder=functools.partial(MeanPoolEncoder), similarity=similarity,
            objective=FullSoftmax if args.objective == "full" else functools.partial(SharedNegatives, num_negatives=args.num_negatives),
            learning_rate=args.learning_rate,
        )
        evaluation = TopKRecorder(ks=(10,))
        trainer = pl.Trainer(
            max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[evaluation], default_root_dir=args.root,
        )
        started = time.perf_counter()
        trainer.fit(model, datamodule=data)
        result = trainer.test(model, datamodule=data, verbose=False)[0]
        row[f"{name}_realised"] = float(result["test/hr@10"])
        row[f"{name}_expected"] = expected_hit_rate(truth.probabilities, np.concatenate(evaluation.test_topk))
        row[f"{name}_seconds"] = time.perf_counter() - started
    return row


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.4f} ± {std:.4f}"


def table(rows: list[dict]) -> str:
    columns = [
        ("dot HR@10", "dot_realised"), ("MoL HR@10", "mol_realised"), ("Bayes-optimal HR@10", "bayes_expected"),
        ("popularity HR@10", "popularity_realised"), ("dot E[HR@10]", "dot_expected"), ("MoL E[HR@10]", "mol_expected"),
        ("Bayes realised HR@10", "bayes_realised"), ("popularity E[HR@10]", "popularity_expected"),
        ("mean length", "mean_length"),
    ]
    lines = ["| setting | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for setting in SETTINGS:
        chosen = [r for r in rows if r["setting"] == setting]
        if chosen:
            lines.append(f"| {setting} | " + " | ".join(_mean_std([r[key] for r in chosen]) for _, key in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--interests", type=int, default=3, help="interests per user of the mixture setting")
    parser.add_argument("--num_users", type=int, default=1500)
    parser.add_argument("--num_items", type=int, default=600)
    parser.add_argument("--num_clusters", type=int, default=20)
    parser.add_argument("--mean_sequence_length", type=int, default=12)
    parser.add_argument("--max_seq_len", type=int, default=20)
    parser.add_argument("--item_dim", type=int, default=16)
    parser.add_argument("--query_components", type=int, default=4)
    parser.add_argument("--item_components", type=int, default=2)
    parser.add_argument("--objective", choices=["shared", "full"], default="shared",
                        help="shared: --num_negatives uniform negatives shared by the batch; full: the exact softmax over the corpus")
    parser.add_argument("--num_negatives", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--root", default="/tmp/known_truth_runs", help="where Lightning may write")
    parser.add_argument("--out", default=None, help="also write the table (and the per-run rows as JSON) here")
    parser.add_argument("--tiny", action="store_true", help="1 seed, 200 users, 100 items in 5 clusters, 16 negatives, 1 epoch: "
                        "checks that it runs, measures nothing")
    args = parser.parse_args()
    if args.tiny:
        args.seeds, args.num_users, args.num_items, args.num_clusters = 1, 200, 100, 5
        args.num_negatives, args.epochs, args.mean_sequence_length = 16, 1, 8

    rows = []
    started = time.perf_counter()
    for setting in args.settings:
        interests = SETTINGS[setting] or args.interests
        for seed in range(args.seeds):
            rows.append(run_setting(setting, interests, seed, args))
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    text = table(rows) + f"\n\nTotal wall time: {time.perf_counter() - started:.0f} s\n"
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n<!-- rows: " + json.dumps(rows) + " -->\n")


if __name__ == "__main__":
    main()
