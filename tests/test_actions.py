"""Action-aware retrieval (history tokens = item + action embedding) and the eval rows real runs write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import ROOT, run_cli
from trec_rank import cli
from trec_rank.cli import main
from trec_rank.config.typed import ConfigError
from trec_rank.models.embeddings import materialize
from trec_rank.models.hstu import action_tokens
from trec_rank.retrieval.batch import eval_batch
from trec_rank.retrieval.config import load_retrieval_config
from trec_rank.retrieval.data import SplitReader, read_sequences
from trec_rank.retrieval.model import build_retrieval_model
from trec_rank.runtime.eval_rows import ROWS_FILE
from trec_rank.runtime.metrics import gauc

ITEMS = 1683
PARAMS = {"hstu": "{num_blocks: 1, num_heads: 1, dqk: 8, dv: 8}", "sasrec": "{num_blocks: 1, num_heads: 1}"}


def config(name: str, actions: bool) -> str:
    return str(ROOT / "configs" / f"ml100k_{name}{'_actions' if actions else ''}.yaml")


def tiny(name: str, data: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", "data.max_seq_len=20", "item.embedding_dim=16", f"model.params={PARAMS[name]}",
            "loss.num_negatives=16", "train.epochs=1", *extra]


@pytest.fixture(scope="module")
def seq_dir(ml100k_dir: Path) -> Path:
    return ml100k_dir / "sequences"


def _models(name: str, seq_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain, action-aware) models with the same item table and encoder weights; action table random."""
    torch.manual_seed(0)
    plain = materialize(build_retrieval_model(load_retrieval_config(config(name, False), tiny(name, seq_dir))),
                        torch.device("cpu")).eval()
    act = materialize(build_retrieval_model(load_retrieval_config(config(name, True), tiny(name, seq_dir))),
                      torch.device("cpu")).eval()
    result = act.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ["head.action.weight"] and not result.unexpected_keys
    return plain, act


def _eval_batch(seq_dir: Path, name: str):  # noqa: ANN202
    cfg = load_retrieval_config(config(name, True), tiny(name, seq_dir))
    seqs = read_sequences(seq_dir, "item_ids", "timestamps", ITEMS, "ratings", 6)
    _, window = next(SplitReader(seqs, "valid", cfg, 32, 0, 1, shuffle=False).batches())
    return eval_batch(window)


def _items(model, batch) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The batch's looked-up item tokens [T, D] (jagged) and their row lengths [B]."""
    seq = model.ec(batch.ids)["seq"]
    return seq.values(), seq.lengths()


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
@torch.no_grad()
def test_token_is_item_plus_action_and_a_zero_table_is_the_plain_model(name: str, seq_dir: Path) -> None:
    plain, act = _models(name, seq_dir)
    batch = _eval_batch(seq_dir, name)
    values, lengths = _items(plain, batch)
    table = act.head.action.weight
    assert torch.equal(action_tokens(values, table, batch.actions), values + table[batch.actions])
    # the action-aware user embedding is the plain encoder run on item + action tokens
    shifted = values + table[batch.actions]
    want = plain.head.last_states(shifted, lengths, batch.timestamps)
    assert torch.allclose(act.head.last_states(values, lengths, batch.timestamps, batch.actions), want, atol=1e-6)
    table.zero_()
    assert torch.equal(act.head.last_states(values, lengths, batch.timestamps, batch.actions),
                       plain.head.last_states(values, lengths, batch.timestamps))


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
@torch.no_grad()
def test_history_actions_move_the_user_and_the_target_action_never_does(name: str, seq_dir: Path) -> None:
    _, act = _models(name, seq_dir)
    batch = _eval_batch(seq_dir, name)
    values, lengths = _items(act, batch)
    base = act.head.last_states(values, lengths, batch.timestamps, batch.actions)
    last = torch.cumsum(lengths.long(), 0) - 1  # each row's eval target
    flipped = batch.actions.clone()
    flipped[last - 1] = 6 - flipped[last - 1]  # the newest history item: rating r -> 6 - r
    moved = act.head.last_states(values, lengths, batch.timestamps, flipped)
    changed = batch.actions[last - 1] != 3  # a rating of 3 maps to itself
    assert changed.any()
    assert not torch.allclose(moved[changed], base[changed])
    assert torch.equal(moved[~changed], base[~changed])
    target = batch.actions.clone()
    target[last] = 1  # the held-out item's own rating: not an input of its prediction
    assert torch.equal(act.head.last_states(values, lengths, batch.timestamps, target), base)


def test_action_column_is_checked(seq_dir: Path) -> None:
    seqs = read_sequences(seq_dir, "item_ids", "timestamps", ITEMS, "ratings", 6)
    assert seqs.actions is not None and seqs.actions.shape == seqs.items.shape
    assert set(np.unique(seqs.actions)) == {1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match=r"ratings.*data.num_actions"):
        read_sequences(seq_dir, "item_ids", "timestamps", ITEMS, "ratings", 5)
    with pytest.raises(ValueError, match="missing column 'liked'"):
        read_sequences(seq_dir, "item_ids", "timestamps", ITEMS, "liked", 6)
    with pytest.raises(ConfigError, match="data.num_actions"):
        load_retrieval_config(config("hstu", True), ["data.num_actions=1"])
    plain, act = (load_retrieval_config(config("hstu", a)) for a in (False, True))
    assert plain.fingerprint() != act.fingerprint()  # an action-aware checkpoint is not a plain one


def test_action_runs_write_best_epoch_rows_and_compare(seq_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Three epochs: eval_rows.parquet holds the best validation epoch's users, whose means are metrics.json."""
    runs = {}
    for name in ("hstu", "sasrec"):
        runs[name] = tmp_path / name
        metrics = cli.train(config(name, True), tiny(name, seq_dir, "train.epochs=3", "train.patience=0"),
                            str(runs[name]), resume=False)
        rows = pq.read_table(runs[name] / ROWS_FILE)
        for split in ("valid", "test"):
            part = rows.filter(rows["split"].to_numpy(zero_copy_only=False) == split)
            assert part.num_rows == metrics[split]["users"] == 943
            for key in ("hr@10", "ndcg@10", "ndcg@200", "mrr"):
                assert part[key].to_numpy().mean() == pytest.approx(metrics[split][key], rel=1e-9), (name, split, key)
        history = [json.loads(line) for line in (runs[name] / "metrics_history.jsonl").read_text().splitlines()]
        assert len(history) == 3
    assert main(["compare", str(runs["hstu"]), str(runs["sasrec"]), "--metrics", "ndcg@10,hr@10,mrr"]) == 0
    out = capsys.readouterr().out
    assert "943 paired units" in out and "| ndcg@10 |" in out


def test_two_rank_retrieval_rows_gather_every_user(seq_dir: Path, tmp_path: Path) -> None:
    """Each rank evaluates half the users: the rows file holds all of them once, and averages to metrics.json."""
    sets = [a for s in tiny("hstu", seq_dir, "train.max_steps=2") for a in ("--set", s)]
    run_cli("train", config("hstu", True), "--run-dir", str(tmp_path), *sets, nproc=2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = pq.read_table(tmp_path / ROWS_FILE)
    for split in ("valid", "test"):
        part = rows.filter(rows["split"].to_numpy(zero_copy_only=False) == split)
        assert np.array_equal(part["user"].to_numpy(), np.arange(943))  # sorted, each user once
        assert part["mrr"].to_numpy().mean() == pytest.approx(metrics[split]["mrr"], rel=1e-9)


def test_ranking_runs_write_per_row_results(ml100k_dir: Path, tmp_path: Path) -> None:
    """A 2-rank ranking run: one row per eval row and task, rows from both ranks, GAUC as metrics.json's."""
    run_cli("train", "configs/ml100k_base.yaml", "--run-dir", str(tmp_path), "--set", f"data.path={ml100k_dir}/ranking",
            "--set", "train.max_steps=6", nproc=2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = pq.read_table(tmp_path / ROWS_FILE)
    test = rows.filter(rows["split"].to_numpy(zero_copy_only=False) == "test")
    expected = pq.read_metadata(next((ml100k_dir / "ranking" / "test").glob("*.parquet"))).num_rows
    assert test.num_rows == expected and len(np.unique(test["row"].to_numpy())) == expected
    got = gauc(test["group"].to_numpy(), test["score"].to_numpy().astype(float), test["label"].to_numpy())
    assert got == pytest.approx(metrics["test"]["like/gauc"], abs=1e-5)
