"""CLI arguments that shrink the embedded default to a run of a few seconds (shared by the CLI and sweep tests)."""

TINY = [
    "--data.source.init_args.num_users=150",
    "--data.source.init_args.num_items=200",
    "--data.source.init_args.num_clusters=8",
    "--data.source.init_args.mean_sequence_length=12",
    "--data.max_seq_len=12",
    "--data.batch_size=32",
    "--model.init_args.item_dim=16",
    "--trainer.max_epochs=2",
    "--trainer.enable_progress_bar=false",
]
