"""Training throughput: the framework's `fit` against a plain PyTorch loop on the same work.

Both loops train the same SASRec-size two-tower model (d=50, 2 layers, length 200,
batch 128, 128 shared negatives unless --negatives says otherwise) on the same
ML-1M batches with the same loss; they alternate in rounds so that machine noise
hits both alike. Reported: sequences per second of each and their ratio.

    python benchmarks/train_throughput.py [--steps 20] [--rounds 3] [--data ../shared/data/ml-1m]
    python benchmarks/train_throughput.py --tiny   # seconds: small synthetic data, 3 steps, 1 round (a smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

from rails_lightning.data import InteractionDataModule, MovieLensSource, SyntheticSource
from rails_lightning.losses import sampled_softmax_loss
from rails_lightning.models import RetrievalModule, SASRecEncoder
from rails_lightning.objectives import SharedNegatives, TrainingStep
from rails_lightning.similarity import DotProduct, with_group_dim

REPO = Path(__file__).resolve().parents[1]


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.sequences = warmup, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())
        if len(self.times) > self.warmup:
            self.sequences += batch.input_ids.shape[0]

    def rate(self) -> float:
        return self.sequences / (self.times[-1] - self.times[self.warmup])


def build(data: InteractionDataModule, negatives: int) -> RetrievalModule:
    return RetrievalModule(
        data.num_items, data.num_users, data.max_seq_len, item_dim=50,
        query_encoder=partial(SASRecEncoder, num_layers=2, num_heads=1, dropout=0.2),
        similarity=DotProduct, objective=partial(SharedNegatives, num_negatives=negatives), weight_decay=0.0,
    )


def framework_rate(data, negatives: int, steps: int, warmup: int) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        max_steps=steps + warmup + 1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        accelerator="cpu", devices=1, callbacks=[timer], enable_model_summary=False,
    )
    trainer.fit(build(data, negatives), datamodule=data)
    return timer.rate()


def plain_rate(data, negatives: int, steps: int, warmup: int) -> float:
    """The same model, batches and loss, with a hand-written loop."""
    model = build(data, negatives)
    optimizer = model.build_optimizer()
    inv_temperature = torch.exp(-model.log_temperature)
    times, sequences = [], 0
    for step, batch in enumerate(data.train_dataloader()):
        if step > steps + warmup:
            break
        states = model.encode_sequence(batch.user_ids, batch.input_ids, batch.timestamps)
        has_target = batch.target_ids > 0
        user_ids = batch.user_ids[:, None].expand_as(batch.target_ids)[has_target]
        queries = model.similarity.query_representation(states[has_target], user_ids)
        positive_ids = batch.target_ids[has_target]
        negatives = model.objective.negatives(TrainingStep(model, batch, states, has_target, positive_ids))
        negative_ids, log_counts = negatives.shared, negatives.shared_log_q  # (R,) shared by the batch
        positive = model.similarity.score(with_group_dim(queries, 1), model.encode_items(positive_ids[:, None]))[0][:, 0, 0] * inv_temperature
        negative = model.similarity.score(with_group_dim(queries, 0), model.encode_items(negative_ids[None]))[0][0]
        loss = sampled_softmax_loss(positive, negative * inv_temperature, positive_ids, negative_ids, log_counts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter())
        if len(times) > warmup + 1:
            sequences += batch.input_ids.shape[0]
    return sequences / (times[-1] - times[warmup])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-1m"), help="ML-1M directory")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of framework / plain")
    parser.add_argument("--negatives", type=int, default=128, help="uniform negatives shared by the batch")
    parser.add_argument("--tiny", action="store_true",
                        help="small synthetic data instead of ML-1M, 3 steps, 1 warm-up, 1 round: checks that it runs, measures nothing")
    args = parser.parse_args()
    pl.seed_everything(0)
    if args.tiny:
        args.steps, args.warmup, args.rounds = 3, 1, 1
        source = SyntheticSource(num_users=300, num_items=200, num_clusters=8, mean_sequence_length=12, seed=0)
        data = InteractionDataModule(source, max_seq_len=12, batch_size=32)
    else:
        if not Path(args.data).exists():
            raise SystemExit(f"ML-1M not found at {args.data}")
        data = InteractionDataModule(MovieLensSource("ml-1m", data_dir=args.data, download=False), max_seq_len=200, batch_size=128)
    data.setup("fit")
    torch.set_num_threads(torch.get_num_threads())
    framework, plain = [], []
    for round_ in range(args.rounds):
        framework.append(framework_rate(data, args.negatives, args.steps, args.warmup))
        plain.append(plain_rate(data, args.negatives, args.steps, args.warmup))
        print(f"round {round_}: framework {framework[-1]:.1f} seq/s, plain {plain[-1]:.1f} seq/s, ratio {framework[-1] / plain[-1]:.3f}", flush=True)
    ratios = [f / p for f, p in zip(framework, plain)]
    print(f"median: framework {statistics.median(framework):.1f} seq/s, plain {statistics.median(plain):.1f} seq/s, "
          f"ratio {statistics.median(ratios):.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
