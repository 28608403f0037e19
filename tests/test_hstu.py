"""HSTUEncoder: shapes, causality, padding invariance, a real tiny fit for both similarities, and a
``class_path`` config through the CLI parser."""

import functools

import pytest
import torch

from conftest import LossRecorder, cpu_trainer, make_tiny_data, make_tiny_model
from rails_lightning.cli import main
from rails_lightning.errors import ConfigError
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
