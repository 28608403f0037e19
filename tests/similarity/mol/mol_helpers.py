"""What the MoL tests share: a small MoL model, batches made by hand, and helpers that score, silence or inspect it."""

import functools

import torch
from torch import nn

from rails_lightning.data.batches import QueryBatch, TrainBatch
from rails_lightning.losses import entropy, load_balancing_loss
from rails_lightning.models import MeanPoolEncoder, RetrievalModule
from rails_lightning.objectives import SharedNegatives
from rails_lightning.retrieval import SearchOptions
from rails_lightning.similarity import MixtureOfLogits, with_group_dim


NUM_ITEMS, NUM_USERS, L, D = 60, 10, 8, 16
SEARCH = SearchOptions()


def MoL(num_items=NUM_ITEMS, num_users=NUM_USERS, max_seq_len=L, item_dim=D, query_encoder=MeanPoolEncoder, num_negatives=128, **similarity):
    """A MoL RetrievalModule with the given similarity options."""
    return RetrievalModule(
        num_items, num_users, max_seq_len, item_dim=item_dim, query_encoder=query_encoder, objective=functools.partial(SharedNegatives, num_negatives=num_negatives),
        similarity=functools.partial(MixtureOfLogits, **similarity),
    )


def batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, NUM_ITEMS + 1, (5, L), generator=gen)
    inputs[0, :3] = 0  # left padding
    targets = torch.randint(1, NUM_ITEMS + 1, (5, L), generator=gen).masked_fill(inputs == 0, 0)
    users = torch.arange(5)
    train = TrainBatch(user_ids=users, input_ids=inputs, target_ids=targets)
    query = QueryBatch(users, inputs, targets[:, -1:], torch.arange(0, 6 * L, L), inputs.flatten())
    return train, query


def score_shared(similarity, queries, items):
    """M queries x R items shared by all, as training scores shared negatives: scores (M, R), auxiliary outputs."""
    scores, auxiliary = similarity.score(with_group_dim(queries, 0), with_group_dim(items, 0), auxiliary=True)
    return scores[0], auxiliary


def make_identity(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.eye(*linear.weight.shape))
        linear.bias.zero_()


def zero_gate(model: RetrievalModule) -> None:
    """Make every gate logit 0: uniform gates."""
    gate = model.similarity.gate
    for module in (gate.query_part, gate.item_part, gate.pair_part):
        last = module[-1] if isinstance(module, nn.Sequential) else module
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    nn.init.zeros_(gate.logit_scale)


def quiet(model):
    model.log = lambda *args, **kwargs: None
    return model


def load_balancing_of(gates):
    """losses.load_balancing_loss of gates (..., P) given as such."""
    flat = gates.reshape(-1, gates.shape[-1])
    return load_balancing_loss(flat.mean(0), entropy(flat).mean())


# ---------------------------------------------------------------------- the RAILS reference's options
#: The options configs/ml-1m/hstu_mol.yaml sets, at test sizes.
REFERENCE_OPTIONS = dict(
    num_query_components=3, num_item_components=2, component_dim=8, component_hidden_dim=12, swiglu_query_components=True,
    item_component_hidden_dim=0, item_dropout=0.1, user_id_component=True, user_id_dropout=0.5, user_id_l2=0.1,
    user_id_init_std=0.05, gate_hidden_dim=6, gate="multiplicative",
)


def logged_values(model):
    """Keep what the module logs, by name."""
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    return logged
