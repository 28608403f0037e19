"""HSTUEncoder: shapes, causality, padding invariance, a real tiny fit for both similarities, and a
``class_path`` config through the CLI parser."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import LossRecorder, cpu_trainer, make_tiny_data, make_tiny_model
from rails_lightning.cli import main
from rails_lightning.errors import ConfigError, UserError
from rails_lightning.models import HSTUEncoder, RetrievalModule

B, L, D = 3, 10, 16


def encoder(**options) -> HSTUEncoder:
    torch.manual_seed(0)
    return HSTUEncoder(D, 5, L, **{"num_layers": 2, "num_heads": 2, **options}).eval()


def left_padded(lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """A random history (B, L, D) and its is_item mask (B, L) with the given numbers of real items."""
    history = torch.randn(len(lengths), L, D) * 0.1
    is_item = torch.arange(L)[None, :] >= L - torch.tensor(lengths)[:, None]
    return history * is_item[..., None], is_item


@pytest.mark.parametrize("normalize_output", [True, False])
def test_shapes_and_options(normalize_output):
    model = encoder(qk_dim=5, v_dim=7, normalize_output=normalize_output)
    history, is_item = left_padded([L, 4, 1])
    out = model(torch.zeros(3, dtype=torch.long), history, is_item)
    assert out.shape == (3, L, D) and torch.isfinite(out).all()
    assert model.layers[0].uvqk.out_features == 2 * (2 * 7 + 2 * 5) and model.layers[0].out.in_features == 2 * 7
    if normalize_output:
        torch.testing.assert_close(out[is_item].norm(dim=-1), torch.ones(int(is_item.sum())))
    # A shorter L (the last positions of a max_seq_len window) works too.
    assert model(torch.zeros(3, dtype=torch.long), history[:, -4:], is_item[:, -4:]).shape == (3, 4, D)
    with pytest.raises(ConfigError, match="num_heads"):
        HSTUEncoder(D, 5, L, num_heads=0)


def test_causal():
    """Changing the items after position t never changes the output at positions <= t."""
    model = encoder()
    history, is_item = left_padded([L, 7, 3])
    before = model(None, history, is_item)
    for t in range(L - 1):
        changed = history.clone()
        changed[:, t + 1 :] += torch.randn_like(changed[:, t + 1 :]) * is_item[:, t + 1 :, None]
        after = model(None, changed, is_item)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(after[:, -1], before[:, -1])


def test_padding_is_never_attended():
    """Whatever sits at padding positions, outputs at real positions are the same; no NaN anywhere,
    even for a history whose only real item is the last."""
    model = encoder(normalize_output=False)
    history, is_item = left_padded([L, 5, 1])
    before = model(None, history, is_item)
    garbage = history + torch.randn_like(history) * 100 * ~is_item[..., None]
    after = model(None, garbage, is_item)
    assert torch.isfinite(before).all() and torch.isfinite(after).all()
    torch.testing.assert_close(after[is_item], before[is_item])
    # The encoder zeroes padding before its layers; the mask alone keeps a layer off padding too.
    layer, x = model.layers[0], torch.randn(3, L, D)
    distance = model.distance.clamp_min(0)
    attend = ((model.distance >= 0) & is_item[:, None, :])[:, None]
    x_garbage = torch.where(is_item[..., None], x, torch.randn_like(x) * 100)
    torch.testing.assert_close(layer(x_garbage, attend, distance)[is_item], layer(x, attend, distance)[is_item])
    # Less left-padding (a shorter window of the same model) leaves the real positions' states unchanged:
    # the attention is divided by max_seq_len, not by the batch's L.
    rows = [1, 2]  # 5 and 1 real items, all within the last 6 positions
    trimmed = model(None, history[rows, -6:], is_item[rows, -6:])
    torch.testing.assert_close(trimmed[is_item[rows, -6:]], before[rows][:, -6:][is_item[rows, -6:]])


def test_all_padding_row_gives_zeros_and_gradients_stay_finite():
    model = encoder().train()
    history, is_item = left_padded([0, 1])
    history.requires_grad_(True)
    out = model(None, history, is_item)
    assert torch.isfinite(out).all() and out[0].abs().sum() == 0
    out[1, -1].sum().backward()
    assert torch.isfinite(history.grad).all()


@pytest.mark.parametrize("model_name", ["TwoTower", "MoL"])
def test_tiny_fit_loss_goes_down(tmp_path, model_name):
    torch.manual_seed(0)
    data = make_tiny_data()
    hstu = functools.partial(HSTUEncoder, num_layers=2, num_heads=2, dropout=0.1)
    module = make_tiny_model(data, model_name, query_encoder=hstu)
    recorder = LossRecorder()
    cpu_trainer(tmp_path, 3, [recorder], enable_checkpointing=False, limit_val_batches=0).fit(module, datamodule=data)
    assert all(torch.isfinite(torch.tensor(recorder.losses)))
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < first - 0.5, f"loss did not go down: {first:.3f} -> {last:.3f}"
    assert module.hparams.query_encoder["class_path"] == "rails_lightning.models.hstu.HSTUEncoder"


def test_class_path_spec_and_cli_config(tmp_path, monkeypatch, tiny_cli_args):
    spec = {"class_path": "rails_lightning.models.HSTUEncoder", "init_args": {"num_layers": 3, "qk_dim": 4}}
    module = RetrievalModule(num_items=20, item_dim=8, query_encoder=spec)
    assert isinstance(module.query_encoder, HSTUEncoder) and len(module.query_encoder.layers) == 3
    config = tmp_path / "hstu.yaml"
    config.write_text(
        "model:\n"
        "  query_encoder:\n"
        "    class_path: rails_lightning.models.HSTUEncoder\n"
        "    init_args: {num_layers: 3, num_heads: 2, qk_dim: 4, v_dim: 6, normalize_output: false}\n"
    )
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = main(["--config", str(config), *tiny_cli_args, f"--run_dir={tmp_path / 'run'}"], run=False)
    hstu = cli.model.query_encoder
    assert isinstance(hstu, HSTUEncoder) and len(hstu.layers) == 3 and not hstu.normalize_output
    assert hstu.layers[0].uvqk.out_features == 2 * (2 * 6 + 2 * 4) and hstu.dim == 16


def test_time_buckets_are_half_octaves_of_seconds():
    model = encoder(time_bias_buckets=40)
    seconds = torch.tensor([[0, 1, 3, 86_400, 31_536_000, 2**40]])  # 0 s, 1 s, 3 s, a day, a year, ~35,000 years
    buckets = model.time_buckets(seconds)  # (1, 6, 6), |t_i - t_j|
    assert buckets[0, :, 0].tolist() == [0, 2, 4, 32, 39, 39]  # floor(2 log2(1 + dt)); a year (49) and beyond clamp to 39
    torch.testing.assert_close(buckets, buckets.transpose(1, 2))
    with pytest.raises(ConfigError, match="time_bias_buckets"):
        HSTUEncoder(D, 5, L, time_bias_buckets=-1)


def test_time_bias_uses_the_times_causally_and_ignores_padding():
    model = encoder(time_bias_buckets=64)
    for layer in model.layers:  # a bias large enough to matter
        torch.nn.init.normal_(layer.relative_time_bias, std=2.0)
    history, is_item = left_padded([L, 7, 3])
    times = torch.cumsum(torch.randint(1, 100_000, (3, L)), dim=1) * is_item
    before = model(None, history, is_item, times)
    assert torch.isfinite(before).all()
    # Other gaps between the same items change the states.
    spread = times * 3 * is_item
    assert not torch.allclose(model(None, history, is_item, spread)[:, -1], before[:, -1])
    # The times after position t never change the states at positions <= t.
    for t in range(L - 1):
        later = times.clone()
        later[:, t + 1 :] += 10_000_000 * is_item[:, t + 1 :]
        torch.testing.assert_close(model(None, history, is_item, later)[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
    # Whatever time sits at padding, real positions are unchanged.
    garbage = torch.where(is_item, times, torch.randint(0, 2**40, times.shape))
    torch.testing.assert_close(model(None, history, is_item, garbage)[is_item], before[is_item])
    # Without the time bias the times are ignored.
    plain = encoder()
    torch.testing.assert_close(plain(None, history, is_item, spread), plain(None, history, is_item))


def test_time_bias_without_timestamps_says_what_to_do():
    history, is_item = left_padded([L, 2, 1])
    with pytest.raises(UserError, match=r"time_bias_buckets=8\).*have none.*set time_bias_buckets: 0"):
        encoder(time_bias_buckets=8)(None, history, is_item)


def test_time_bias_gets_gradients():
    model = encoder(time_bias_buckets=16).train()
    history, is_item = left_padded([L, 6])
    times = torch.cumsum(torch.randint(1, 1_000, (2, L)), dim=1) * is_item
    model(None, history, is_item, times)[:, -1].sum().backward()
    assert all(layer.relative_time_bias.grad.abs().sum() > 0 for layer in model.layers)


@pytest.mark.parametrize("index_shape, grad_shape", [((L, L), (2, 3, L, L)), ((2, L, L), (2, 1, L, L))])
def test_bias_lookup_gradient_is_that_of_indexing(index_shape, grad_shape):
    """The bias tables' lookup (index_add_ in the backward) has indexing's values and gradients, broadcast over
    batch and heads as the layer uses it (position bias: (L, L) read into (B, H, L, L); time bias: (B, L, L))."""
    from rails_lightning.models.hstu import _BiasLookup

    torch.manual_seed(0)
    table = torch.randn(16, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 16, index_shape)
    upstream = torch.randn(grad_shape, dtype=torch.float64)
    expanded = (lambda t: t[:, None]) if len(index_shape) == 3 else (lambda t: t)
    looked_up = _BiasLookup.apply(table, index)
    assert torch.equal(looked_up, table[index])
    (grad_lookup,) = torch.autograd.grad((expanded(looked_up) * upstream).sum(), table)
    (grad_indexing,) = torch.autograd.grad((expanded(table[index]) * upstream).sum(), table)
    torch.testing.assert_close(grad_lookup, grad_indexing)
    assert torch.autograd.gradcheck(lambda t: _BiasLookup.apply(t, index[..., :3, :3]), (table,))



def test_bias_lookup_sums_a_bfloat16_gradient_in_float32():
    """Millions of bfloat16 terms per entry: summed in bfloat16 each entry would stall near 256 (its spacing there
    outgrows 1); summed in float32 they are the counts, to bfloat16's rounding."""
    from rails_lightning.models.hstu import _BiasLookup

    table = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    index = torch.arange(100_000) % 4  # 25,000 reads of each entry
    _BiasLookup.apply(table, index).backward(torch.ones(100_000, dtype=torch.bfloat16))
    assert table.grad.dtype == torch.bfloat16
    torch.testing.assert_close(table.grad.float(), torch.full((4,), 25_000.0), rtol=1e-2, atol=0)


def _env() -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_cli_fit_with_the_time_bias_on_a_timed_log_and_a_clear_error_without_times(tmp_path):
    """A real `fit` of HSTU with its relative time bias on a csv log with times; the synthetic source (no
    times) fails at once with one line that says what to change."""
    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp"]
    for user in range(120):
        clock = 1_600_000_000 + np.cumsum(rng.integers(1, 5 * 86_400, size=12))
        lines += [f"{user},{item},{when}" for item, when in zip(rng.choice(60, size=12, replace=False), clock)]
    log = tmp_path / "log.csv"
    log.write_text("\n".join(lines) + "\n")
    hstu = ["--model.query_encoder=rails_lightning.models.HSTUEncoder", "--model.query_encoder.init_args.num_layers=1",
            "--model.query_encoder.init_args.time_bias_buckets=16", "--model.item_dim=16", "--data.max_seq_len=12",
            "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", "--data.source=InteractionLogSource", f"--data.source.path={log}",
         *hstu, f"--run_dir={run_dir}"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and 0 <= record["test"]["test/hr@10"] <= 1
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state["query_encoder.layers.0.relative_time_bias"].shape == (16,)
    result = subprocess.run(
        [sys.executable, "-m", "rails_lightning", "fit", *hstu, f"--run_dir={tmp_path / 'synthetic'}"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "rails_lightning: error: HSTUEncoder(time_bias_buckets=16) needs the time" in result.stderr


@pytest.mark.gpu
def test_on_cuda_the_states_and_gradients_are_the_cpus():
    """The same encoder (in eval mode: no dropout) on the GPU, with the time bias: its states and its parameters'
    gradients are the CPU's."""
    model = encoder(time_bias_buckets=64)
    history, is_item = left_padded([L, 7, 3])
    times = torch.cumsum(torch.randint(1, 100_000, (3, L)), dim=1) * is_item
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        states = model(None, history.to(device), is_item.to(device), times.to(device))
        states.square().sum().backward()
        results[device] = states.cpu(), {name: p.grad.cpu() for name, p in model.named_parameters()}
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], atol=1e-5, rtol=1e-4)
    for name, grad in results["cpu"][1].items():
        torch.testing.assert_close(results["cuda"][1][name], grad, atol=1e-4, rtol=1e-3, msg=name)
