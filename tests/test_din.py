"""DIN pieces against their equations: Dice, the activation unit, mini-batch-aware L2, id counts."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from tests.helpers import ROOT
from trec_rank.config.experiment import ExperimentConfig, load_config
from trec_rank.config.models import side_bounds
from trec_rank.config.schema import Schema
from trec_rank.config.typed import ConfigError, from_dict, to_dict
from trec_rank.data.batch import Batch
from trec_rank.data.convert import DataError
from trec_rank.data.dataset import ParquetDataset
from trec_rank.data.frequency import CACHE_NAME, id_counts, train_id_counts
from trec_rank.models.attention import AttentionParams, TargetAttention, interaction_dim
from trec_rank.models.dice import Dice
from trec_rank.models.embeddings import materialize
from trec_rank.models.ranking import AUX_LOSS
from trec_rank.models.registry import build_model
from trec_rank.models.regularizer import L2Params, MiniBatchL2
from trec_rank.parallel.env import DistEnv
from trec_rank.train.build import open_split

CPU = torch.device("cpu")
ENV = DistEnv(0, 1, 0, 1, CPU)


# ---- Dice ------------------------------------------------------------------------------------
def _dice_manual(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    p = 1.0 / (1.0 + torch.exp(-(x - mean) / torch.sqrt(var + 1e-8)))
    return p * x + (1 - p) * alpha * x


def to_padded(values: torch.Tensor, lengths: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged [N, D] -> padded [B, max_len, D] (zeros after each row's end) and mask [B, max_len]."""
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.long())
    padded = torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], 0.0)
    mask = torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    return padded, mask


def test_dice_uses_batch_stats_in_train_and_running_stats_in_eval() -> None:
    torch.manual_seed(0)
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.1, -0.2, 0.5]))
    x = torch.randn(64, 3) * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([2.0, -1.0, 0.0])
    out = dice.train()(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    torch.testing.assert_close(out, _dice_manual(x, mean, var, dice.alpha.detach()))
    # running statistics move 10% towards the batch (unbiased variance, as BatchNorm tracks it)
    torch.testing.assert_close(dice.running_mean, 0.1 * mean)
    torch.testing.assert_close(dice.running_var, 0.9 + 0.1 * x.var(0, unbiased=True))

    y = torch.randn(5, 3)
    before = (dice.running_mean.clone(), dice.running_var.clone())
    out_eval = dice.eval()(y)
    torch.testing.assert_close(out_eval, _dice_manual(y, *before, dice.alpha.detach()))
    torch.testing.assert_close(dice.running_mean, before[0])  # eval never updates them
    # per unit, not per sample: the eval output of a row does not depend on the other rows
    torch.testing.assert_close(dice(y[:1]), out_eval[:1])


def test_dice_eval_without_autograd_is_the_same_function_and_leaves_its_input_alone() -> None:
    """Scoring and eval run Dice under no_grad, where it works in one buffer (in place): same values as
    the autograd path and the equation, the input untouched, and a gradient still where autograd asks."""
    torch.manual_seed(0)
    dice = Dice(4).eval()
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.1, -0.2, 0.5, 1.0]))
        dice.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        dice.running_var.copy_(torch.tensor([0.25, 4.0, 1.0, 0.5]))
    x = torch.randn(3, 7, 4)
    x_before = x.clone()
    expected = _dice_manual(x, dice.running_mean, dice.running_var, dice.alpha.detach())
    with torch.no_grad():
        fast = dice(x)
    torch.testing.assert_close(fast, expected)
    assert torch.equal(x, x_before)
    xg = x.clone().requires_grad_()
    slow = dice(xg)
    torch.testing.assert_close(slow, expected)
    slow.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_dice_statistics_pool_all_leading_dims_and_survive_empty_batches() -> None:
    dice = Dice(2).train()
    x = torch.randn(4, 5, 2)
    flat = x.reshape(-1, 2)
    torch.testing.assert_close(dice(x), _dice_manual(x, flat.mean(0), flat.var(0, unbiased=False),
                                                    dice.alpha.detach()))
    running = dice.running_var.clone()
    assert dice(torch.empty(0, 2)).shape == (0, 2)  # a batch without any behaviour: no NaN statistics
    torch.testing.assert_close(dice.running_var, running)


def test_dice_reset_parameters_after_meta_materialisation() -> None:
    """DMP zero-fills meta buffers, then calls reset_parameters(): running_var must come back as 1."""
    module = torch.nn.Sequential(torch.nn.Linear(3, 4, device="meta"), Dice(4, device=torch.device("meta")))
    materialize(module, CPU)
    dice = module[1]
    assert torch.equal(dice.running_mean, torch.zeros(4)) and torch.equal(dice.running_var, torch.ones(4))
    assert torch.equal(dice.alpha.detach(), torch.zeros(4))


# ---- activation unit ---------------------------------------------------------------------------
def _unit(norm: str = "none", interaction: tuple[str, ...] = ("query", "key", "diff", "prod"),
          outer_dim: int = 0, dim: int = 4) -> TargetAttention:
    torch.manual_seed(0)
    params = AttentionParams(hidden=[8], activation="prelu", interaction=list(interaction),
                             outer_dim=outer_dim, attention_norm=norm)
    return TargetAttention(dim, params).eval()


def test_weights_are_not_normalised_and_keep_intensity() -> None:
    unit = _unit()
    q = torch.randn(1, 4)
    k = torch.randn(3, 4)
    w = unit.weights(q, k, torch.tensor([3]))
    assert not torch.isclose(w.sum(), torch.tensor(1.0), atol=1e-3)
    once = unit(q, k, torch.tensor([3]))
    twice = unit(q, torch.cat([k, k]), torch.tensor([6]))  # the same interests, twice as many behaviours
    torch.testing.assert_close(twice, 2 * once)

    soft = _unit("softmax")
    w = soft.weights(q, k, torch.tensor([3]))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(soft(q, torch.cat([k, k]), torch.tensor([6])), soft(q, k, torch.tensor([3])))


def test_padded_positions_get_zero_weight_and_do_not_change_results() -> None:
    unit = _unit()
    lengths = torch.tensor([3, 0, 1])
    q, k = torch.randn(3, 4), torch.randn(4, 4)
    w = unit.weights(q, k, lengths)
    padded, mask = to_padded(w.unsqueeze(1), lengths, 3)
    assert torch.all(padded.squeeze(-1)[~mask] == 0)
    out = unit(q, k, lengths)
    torch.testing.assert_close(out[0], (w[:3, None] * k[:3]).sum(0))
    assert torch.equal(out[1], torch.zeros(4))  # no history -> zero vector
    alone = unit(q[2:], k[3:], lengths[2:])  # the same row without longer neighbours
    torch.testing.assert_close(alone[0], out[2])


def test_outer_product_interaction_flattened_and_projected() -> None:
    q, k = torch.randn(2, 4), torch.randn(2, 4)
    flat = _unit(interaction=("outer",))
    assert interaction_dim(flat.params, 4) == 16
    torch.testing.assert_close(flat.interaction(q, k), torch.einsum("nd,ne->nde", q, k).reshape(2, 16))
    proj = _unit(interaction=("query", "key", "outer"), outer_dim=3)
    assert interaction_dim(proj.params, 4) == 4 + 4 + 3
    x = proj.interaction(q, k)
    assert x.shape == (2, 11)
    w = proj.bilinear.weight  # [3, 4, 4]: the flattened outer product through a learned projection
    torch.testing.assert_close(x[:, 8:], torch.einsum("nde,rde->nr", torch.einsum("nd,ne->nde", q, k), w))
    assert _unit(interaction=("query", "key", "diff", "prod")).mlp.net[0].in_features == 16


def retyped(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` after a test edited its `model.params` mapping: validated and typed again, as loading does."""
    return from_dict(ExperimentConfig, to_dict(cfg))


# ---- DIN on MovieLens (several histories sharing one attention) --------------------------------
@pytest.fixture(scope="module")
def din_cfg(ml100k_dir: Path):  # noqa: ANN201
    return load_config(ROOT / "configs/ml100k_din.yaml", [f"data.path={ml100k_dir}/ranking"])


@pytest.fixture(scope="module")
def ml_batch(din_cfg) -> Batch:  # noqa: ANN001
    ds = ParquetDataset(din_cfg.data.split_path("train"), din_cfg.schema, 64)
    return next(iter(ds.batches()))


def test_din_forward_groups_histories_and_adds_aux(din_cfg, ml_batch: Batch) -> None:  # noqa: ANN001
    model = materialize(build_model(din_cfg, id_counts=train_id_counts(din_cfg)), CPU)
    unit = model.over.encoder.attention[0]
    assert unit.dim == 32 + 32  # query = item_id | item_genre, keys = hist_item_id | hist_genre
    out = model.train()(ml_batch)
    assert out["like"].shape == (64,) and out[AUX_LOSS].dim() == 0 and out[AUX_LOSS] > 0
    (out["like"].sum() + out[AUX_LOSS]).backward()
    assert all(p.grad is not None for p in model.over.parameters())
    assert AUX_LOSS not in model.eval()(ml_batch)


def test_misaligned_histories_in_one_group_are_rejected(din_cfg) -> None:  # noqa: ANN001
    enc = materialize(build_model(din_cfg), CPU).over.encoder
    jt = {name: JaggedTensor(values=torch.randn(sum(lengths), 32), lengths=torch.tensor(lengths))
          for name, lengths in [("item_id", [1, 1]), ("item_genre", [1, 1]), ("hist_item_id", [2, 1]),
                                ("hist_genre", [1, 2])]}
    with pytest.raises(ValueError, match="'hist_item_id' and 'hist_genre' are not aligned"):
        enc.check_aligned(jt, None)  # forward runs it first (the compiled forward's caller, under train.compile)


def test_din_config_errors_name_the_key(din_cfg) -> None:  # noqa: ANN001
    cfg = copy.deepcopy(din_cfg)
    cfg.model.params["encoder"]["attention"][0]["pairs"][1]["history"] = "hist_typo"
    with pytest.raises(ConfigError, match=r"attention\[0\]\.pairs\[1\]\.history: 'hist_typo'"):
        build_model(retyped(cfg))
    cfg = copy.deepcopy(din_cfg)
    cfg.model.params["encoder"]["attention"][0]["pairs"][0]["target"] = "user_id"  # 16-d vs 32-d history
    with pytest.raises(ConfigError, match=r"pairs\[0\]: target 'user_id' \(16-d\)"):
        build_model(retyped(cfg))


def _with_rating_keys(din_cfg):  # noqa: ANN001, ANN202
    cfg = copy.deepcopy(din_cfg)
    cfg.model.params["encoder"]["attention"][0]["key_sides"] = [
        {"history": "hist_item_id", "side": "rating", "num_values": 6}]
    return retyped(cfg)


def test_key_sides_add_the_behaviours_rating_embedding_to_each_key(din_cfg, ml_batch: Batch) -> None:  # noqa: ANN001
    model = materialize(build_model(_with_rating_keys(din_cfg)), CPU).eval()
    enc = model.over.encoder
    assert model.needs_batch  # the side column travels in the batch, in eval too
    emb = enc.side_embeddings[0][0]
    assert emb.weight.shape == (6, 64) and torch.equal(emb.weight, torch.zeros(6, 64))  # starts as plain DIN
    with torch.no_grad():
        emb.weight.normal_()
    pooled, jagged = model.ebc(ml_batch.sparse), model.ec(ml_batch.sequence)
    (targets, hists), unit = enc.groups[0], enc.attention[0]
    got = enc._attend(unit, targets, hists, pooled, jagged, enc.key_sides[0], enc.side_embeddings[0], ml_batch)
    rating = ml_batch.side["hist_item_id/rating"]
    query = torch.cat([jagged["item_id"].values(), jagged["item_genre"].values()], dim=1)
    keys = torch.cat([jagged["hist_item_id"].values(), jagged["hist_genre"].values()], dim=1)
    lengths = jagged["hist_item_id"].lengths()
    torch.testing.assert_close(got, unit(query, keys + emb.weight[rating], lengths))
    assert not torch.allclose(got, unit(query, keys, lengths))
    assert torch.equal(model(ml_batch)["like"], model(ml_batch)["like"])  # eval is deterministic


def test_key_side_out_of_range_is_refused_by_the_loader_naming_column_and_key(din_cfg) -> None:  # noqa: ANN001
    """The range check runs once per chunk in the loader (not every step in the model): ratings run 1..5,
    so num_values 5 leaves rating 5 without an embedding row."""
    key = "model.params.encoder.attention[0].key_sides[0].num_values"
    cfg = _with_rating_keys(din_cfg)
    assert side_bounds(cfg.model.typed_params) == {"hist_item_id/rating": (6, key)}
    assert not open_split(cfg, "valid", ENV, train=False).pin_memory  # in range: opens (every value scanned); CPU
    cfg.model.params["encoder"]["attention"][0]["key_sides"][0]["num_values"] = 5
    cfg = retyped(cfg)
    want = rf"side column 'hist_rating' holds 5 at row \d+, outside \[0, 5\) \({re.escape(key)}\)$"
    with pytest.raises(DataError, match=want) as err:
        open_split(cfg, "valid", ENV, train=False)
    assert "\n" not in str(err.value) and "valid" in str(err.value)  # one line naming the file
    cfg.data.validate = "schema"  # values unchecked on open: the chunk is refused as it is read
    with pytest.raises(DataError, match=want):
        next(open_split(cfg, "valid", ENV, train=False).batches())


def test_key_side_config_errors_name_the_key(din_cfg) -> None:  # noqa: ANN001
    cfg = _with_rating_keys(din_cfg)
    cfg.model.params["encoder"]["attention"][0]["key_sides"][0]["side"] = "mood"
    with pytest.raises(ConfigError, match=r"attention\[0\]\.key_sides\[0\]\.side: 'hist_item_id' has no side "
                                          r"'mood' in the schema \(its sides: rating, timestamp\)"):
        build_model(retyped(cfg))
    cfg = _with_rating_keys(din_cfg)
    cfg.model.params["encoder"]["attention"][0]["key_sides"][0]["history"] = "pos_item_id"
    with pytest.raises(ConfigError, match=r"key_sides\[0\]\.history: 'pos_item_id' is not a history of this"):
        build_model(retyped(cfg))
    cfg = _with_rating_keys(din_cfg)
    cfg.model.params["encoder"]["attention"][0]["key_sides"][0]["num_values"] = 0
    with pytest.raises(ConfigError, match=r"key_sides\[0\]\.num_values: must be >= 1"):
        build_model(retyped(cfg))


# ---- mini-batch-aware L2 -------------------------------------------------------------------------
L2_SCHEMA = {
    "tables": [{"name": "item", "num_embeddings": 10, "embedding_dim": 3},
               {"name": "user", "num_embeddings": 6, "embedding_dim": 3}],
    "features": [{"name": "user_id", "kind": "sparse", "table": "user"},
                 {"name": "item_id", "kind": "sparse", "table": "item"},
                 {"name": "hist", "kind": "sequence", "table": "item", "max_len": 5},
                 {"name": "y", "kind": "label"}],
}


def test_minibatch_l2_equals_manual_sum_and_only_touches_batch_rows() -> None:
    torch.manual_seed(0)
    schema = from_dict(Schema, L2_SCHEMA)
    ec = EmbeddingCollection(tables=[EmbeddingConfig(name="item", embedding_dim=3, num_embeddings=10,
                                                     feature_names=["item_id", "hist"])], device=CPU)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="user", embedding_dim=3, num_embeddings=6,
                                                            feature_names=["user_id"])], device=CPU)
    # rows: 0 and 1 real, 2 a zero-weight padding row; user row 1 has a 2-id bag (not decomposable)
    sparse = KeyedJaggedTensor.from_lengths_sync(["user_id"], torch.tensor([4, 2, 3, 5]),
                                                 torch.tensor([1, 2, 1]))
    sequence = KeyedJaggedTensor.from_lengths_sync(
        ["item_id", "hist"], torch.tensor([7, 1, 9, 1, 7, 7, 3, 8]), torch.tensor([1, 1, 1, 3, 1, 1]))
    batch = Batch(dense=torch.zeros(3, 0), sparse=sparse, sequence=sequence,
                  weights=torch.tensor([1.0, 1.0, 0.0]))
    counts = {"item": np.array([0, 5, 0, 2, 0, 0, 0, 4, 0, 0]), "user": np.array([0, 0, 0, 0, 8, 0])}
    l2 = MiniBatchL2(schema, L2Params(weight=0.5))
    l2.counts = counts
    loss = l2(ebc(sparse), ec(sequence), batch)

    w_item, w_user = ec.embeddings["item"].weight, ebc.embedding_bags["user"].weight
    # unique ids of weighted rows: items {7, 1, 3} (9 and 8 only in the padding row), user {4}
    n = {7: 4, 1: 5, 3: 2}
    manual = sum(w_item[j].pow(2).sum() / n[j] for j in n) + w_user[4].pow(2).sum() / 8
    torch.testing.assert_close(loss, 0.5 * manual)

    loss.backward()
    touched = w_item.grad.abs().sum(1).nonzero().flatten().tolist()
    assert touched == [1, 3, 7]
    for j in n:  # d/dw_j of lambda ||w_j||^2 / n_j, however often j was looked up
        torch.testing.assert_close(w_item.grad[j], 2 * 0.5 * w_item[j].detach() / n[j])
    assert w_user.grad.abs().sum(1).nonzero().flatten().tolist() == [4]


def test_minibatch_l2_follows_the_pooled_outputs_own_key_order() -> None:
    """A sharded EBC orders its output by sharding type: the penalty maps each column of the
    KeyedTensor to its feature by the KeyedTensor's keys, whatever the KJT's order and widths.
    Also: an empty last bag, and a table (tag) left out of `tables`, add nothing."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    schema = from_dict(Schema, {
        "tables": [{"name": "a", "num_embeddings": 5, "embedding_dim": 3},
                   {"name": "b", "num_embeddings": 4, "embedding_dim": 2},
                   {"name": "tag", "num_embeddings": 3, "embedding_dim": 2}],
        "features": [{"name": "fa", "kind": "sparse", "table": "a"}, {"name": "fb", "kind": "sparse", "table": "b"},
                     {"name": "ft", "kind": "sparse", "table": "tag"}, {"name": "y", "kind": "label"}]})
    sparse = KeyedJaggedTensor.from_lengths_sync(["fa", "fb", "ft"], torch.tensor([2, 4, 3, 1, 2, 2]),
                                                 torch.tensor([1, 1, 1, 0, 1, 1]))  # fb's 2nd bag is empty
    rows = {"fa": torch.randn(2, 3), "fb": torch.randn(2, 2), "ft": torch.randn(2, 2)}
    order = ["ft", "fb", "fa"]  # not the KJT's
    pooled = KeyedTensor(order, [2, 2, 3], torch.cat([rows[k] for k in order], dim=1))
    batch = Batch(dense=torch.zeros(2, 0), sparse=sparse, sequence=KeyedJaggedTensor.empty(),
                  weights=torch.tensor([1.0, 1.0]))
    l2 = MiniBatchL2(schema, L2Params(weight=1.0, tables=["a", "b"]))
    l2.counts = {"a": np.array([1, 1, 5, 1, 4]), "b": np.array([1, 1, 1, 2])}
    # fa: ids 2 (n 5) and 4 (n 4); fb: id 3 (n 2) in row 0, row 1 empty; ft: not counted
    want = rows["fa"][0].pow(2).sum() / 5 + rows["fa"][1].pow(2).sum() / 4 + rows["fb"][0].pow(2).sum() / 2
    torch.testing.assert_close(l2(pooled, None, batch), want)


def test_minibatch_l2_unseen_ids_count_once_and_tables_are_checked() -> None:
    schema = from_dict(Schema, L2_SCHEMA)
    l2 = MiniBatchL2(schema, L2Params(weight=1.0, tables=["item"]))
    l2.counts = {"item": np.zeros(10, dtype=np.int64)}
    assert l2.tables == ["item"]
    assert torch.equal(l2.inverse_frequency("item", CPU), torch.ones(10))
    with pytest.raises(ConfigError, match=r"l2\.tables\[0\]: unknown table 'nope'"):
        MiniBatchL2(schema, L2Params(weight=1.0, tables=["nope"]))


def test_the_model_reads_no_data_and_uses_the_id_counts_it_is_handed(din_cfg, ml_batch: Batch) -> None:  # noqa: ANN001
    """Counting is the data side's (data/frequency.py): a model built over a missing data path trains its
    L2 with the counts handed to build_model; n_j doubled halves the penalty (every batch id is seen)."""
    counts = train_id_counts(din_cfg)
    cfg = copy.deepcopy(din_cfg)
    cfg.data.path = "/nonexistent/ranking"
    aux = []
    for scale in (1, 2):
        torch.manual_seed(0)
        model = materialize(build_model(cfg, id_counts={t: scale * c for t, c in counts.items()}), CPU).train()
        aux.append(model(ml_batch)[AUX_LOSS])
    torch.testing.assert_close(aux[1], aux[0] / 2)
    with pytest.raises(AssertionError, match="needs build_model"):
        materialize(build_model(cfg), CPU).train()(ml_batch)


def test_id_counts_match_manual_count_and_cache_is_invalidated(tmp_path: Path) -> None:
    schema = from_dict(Schema, {**L2_SCHEMA, "features": [
        *L2_SCHEMA["features"][:2], {"name": "hist", "kind": "sequence", "table": "item", "max_len": 5,
                                     "oov": "hash"}, L2_SCHEMA["features"][3]]})
    split = tmp_path / "train"
    split.mkdir()
    table = pa.table({"user_id": [1, 1, 2], "item_id": [3, 3, 9], "hist": [[3, 13], [], [9, 9, 1]],
                      "y": [1.0, 0.0, 1.0]})
    pq.write_table(table.slice(0, 2), split / "part-0.parquet")
    pq.write_table(table.slice(2), split / "part-1.parquet")
    counts = id_counts(schema, split, ["item", "user"])
    expected_item = np.zeros(10, dtype=np.int64)
    for i, c in {3: 4, 9: 3, 1: 1}.items():  # 13 hashes to 3
        expected_item[i] = c
    assert np.array_equal(counts["item"], expected_item)
    assert np.array_equal(counts["user"], np.array([0, 2, 1, 0, 0, 0]))
    cached = json.loads((split / CACHE_NAME).read_text())
    assert cached["tables"]["item"]["ids"] == [1, 3, 9]
    assert np.array_equal(id_counts(schema, split, ["item", "user"])["item"], expected_item)  # from cache

    pq.write_table(table, split / "part-1.parquet")  # the split changed: counts must follow
    assert id_counts(schema, split, ["item", "user"])["user"].tolist() == [0, 4, 1, 0, 0, 0]


def test_minibatch_l2_reaches_the_fused_in_backward_optimizer(ml100k_dir: Path) -> None:
    """One fused-SGD step with and without the L2 (same init, same batch): the sharded item table
    differs by exactly -lr * 2 lambda w_j / n_j on the batch's rows and nowhere else."""
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.runtime.model import ranking_spec, shard_model

    lam, lr = 50.0, 0.5
    env = init_distributed("cpu")
    try:
        tables = {}
        for weight in (0.0, lam):
            cfg = load_config(ROOT / "configs/ml100k_din.yaml", [
                f"data.path={ml100k_dir}/ranking",
                f"model.params.encoder.l2.weight={weight}", "train.optim.sparse=sgd", f"train.optim.sparse_lr={lr}"])
            dmp = shard_model(ranking_spec(cfg, train_id_counts(cfg)), env)
            before = dmp.state_dict()["model.ec.embeddings.item.weight"].local_shards()[0].tensor.clone()
            batch = next(iter(ParquetDataset(cfg.data.split_path("train"), cfg.schema, 32, shuffle=True).batches()))
            loss, _ = dmp(batch)
            loss.backward()  # the fused optimizer updates the table inside backward
            after = dmp.state_dict()["model.ec.embeddings.item.weight"].local_shards()[0].tensor.clone()
            tables[weight] = (before, after)
    finally:
        shutdown()
    (init, plain), (init_l2, regularised) = tables[0.0], tables[lam]
    assert torch.equal(init, init_l2)
    ids = torch.unique(torch.cat([batch.sequence[f].values()
                                  for f in ("item_id", "hist_item_id", "pos_item_id", "neg_item_id")]))
    diff = regularised - plain
    assert torch.equal(diff.abs().sum(1).nonzero().flatten(), ids)
    n = torch.from_numpy(id_counts(cfg.schema, cfg.data.split_path("train"), ["item"])["item"]).clamp(min=1).float()
    torch.testing.assert_close(diff[ids], -lr * 2 * lam * init[ids] / n[ids].unsqueeze(1), rtol=1e-4, atol=1e-8)
