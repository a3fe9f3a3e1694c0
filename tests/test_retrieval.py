"""Retrieval: loss, negatives, metrics, leave-one-out split, full-corpus eval, training, resume, 2 ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import ROOT, run_cli
from trec_rank import cli
from trec_rank.config.typed import ConfigError
from trec_rank.models.embeddings import materialize
from trec_rank.retrieval.batch import NegativeSampler, targets, train_batch
from trec_rank.retrieval.config import load_retrieval_config
from trec_rank.retrieval.data import Sequences, SplitReader, read_sequences
from trec_rank.retrieval.evaluate import evaluate_split
from trec_rank.retrieval.loss import sampled_softmax_loss
from trec_rank.retrieval.metrics import RankingMetrics, target_ranks
from trec_rank.retrieval.model import build_retrieval_model, normalize
from trec_rank.retrieval.trainer import retrieval_spec

CONFIG = str(ROOT / "configs" / "ml100k_hstu.yaml")
ITEMS = 1683  # ml-100k: ids 1..1682


def tiny(data: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run on ml-100k sequences."""
    return [f"data.path={data}", "data.max_seq_len=20", "data.batch_size=128", "data.eval_batch_size=512",
            "item.embedding_dim=16", "model.params={num_blocks: 1, num_heads: 1, dqk: 8, dv: 8}",
            "loss.num_negatives=16", "train.epochs=1", *extra]


@pytest.fixture(scope="module")
def seq_dir(ml100k_dir: Path) -> Path:
    return ml100k_dir / "sequences"


@pytest.fixture(scope="module")
def raw_users(seq_dir: Path) -> list[dict]:
    return pq.read_table(next(seq_dir.glob("*.parquet"))).to_pylist()


# ---- loss and negatives -------------------------------------------------------------------
@pytest.mark.parametrize("num_cand", [5, 400])  # 5: [P, U] matmul path; 400 > R*D: gather path
def test_sampled_softmax_matches_manual_with_accidental_hits(num_cand: int) -> None:
    g = torch.Generator().manual_seed(0)
    p, r, d, temp = 6, 4, 3, 0.05
    user, pos = normalize(torch.randn(p, d, generator=g)), normalize(torch.randn(p, d, generator=g))
    cand = normalize(torch.randn(num_cand, d, generator=g))
    neg_index = torch.randint(0, num_cand, (p, r), generator=g)
    hit = torch.zeros(p, r, dtype=torch.bool)
    hit[0, 1] = hit[2, 0] = hit[2, 3] = True
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    got = sampled_softmax_loss(user, pos, cand, neg_index, hit, weights, temp)
    total = 0.0
    for i in range(p):
        num = math.exp(float(user[i] @ pos[i]) / temp)
        den = num + sum(math.exp(float(user[i] @ cand[neg_index[i, j]]) / temp) for j in range(r) if not hit[i, j])
        total += float(weights[i]) * -math.log(num / den)
    assert float(got) == pytest.approx(total / float(weights.sum()), rel=1e-5)


@pytest.mark.parametrize("kind", ["uniform", "in_batch"])
def test_negatives_come_from_the_right_pool_and_hits_are_flagged(kind: str, seq_dir: Path) -> None:
    cfg = load_retrieval_config(CONFIG, tiny(seq_dir))
    seqs = read_sequences(seq_dir, "item_ids", "timestamps", ITEMS)
    corpus = seqs.corpus()
    sampler = NegativeSampler(corpus, 64, kind, ITEMS, seed=0)
    _, window = next(SplitReader(seqs, "train", cfg, 32, 0, 1, shuffle=True).batches(0))
    batch = train_batch(window, sampler, epoch=0, rank=0, batch=0)
    pos = targets(window)
    cand = batch.ids["neg"].values().numpy()
    neg = cand[batch.neg_index.numpy()]
    assert batch.neg_index.shape == (len(pos), 64) == (int(window.lengths.sum()) - len(window.lengths), 64)
    assert len(np.unique(cand)) == len(cand)  # looked up once each
    pool = set(pos.tolist()) if kind == "in_batch" else set(corpus.tolist())
    assert set(neg.ravel().tolist()) <= pool
    np.testing.assert_array_equal(batch.hit.numpy(), neg == pos[:, None])
    assert batch.hit.any()  # ~64/1682 per position: some accidental hits exist to be masked
    again = train_batch(window, sampler, epoch=0, rank=0, batch=0)  # seeded: resume draws the same
    assert torch.equal(again.neg_index, batch.neg_index)


# ---- metrics ------------------------------------------------------------------------------
def test_ranking_metrics_on_a_hand_made_ranking() -> None:
    ranks = torch.tensor([1, 3, 11, 60])
    m = RankingMetrics([10, 50], torch.device("cpu"))
    m.update(ranks, torch.ones(4))
    m.update(torch.tensor([1, 1]), torch.zeros(2))  # padding rows count for nothing
    out = m.compute()
    assert out["users"] == 4
    assert out["hr@10"] == pytest.approx(2 / 4) and out["hr@50"] == pytest.approx(3 / 4)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert out["ndcg@50"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(12)) / 4)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 60) / 4)


def test_target_ranks_filter_history_and_count_ties_against_the_target() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.5, 0.7, 0.1],
                           [0.2, 0.2, 0.2, 0.2, 0.2]])
    target = torch.tensor([2, 4])
    no_filter = target_ranks(scores, target, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert no_filter.tolist() == [4, 5]  # row 1: all tied -> worst rank, not best
    filtered = target_ranks(scores, target, torch.tensor([0, 0]), torch.tensor([0, 3]))  # row 0 saw items 0, 3
    assert filtered.tolist() == [2, 5]


# ---- data protocol ------------------------------------------------------------------------
def test_leave_one_out_windows_and_exactly_once_per_epoch(seq_dir: Path, raw_users: list[dict]) -> None:
    cfg = load_retrieval_config(CONFIG, tiny(seq_dir, "data.max_seq_len=30"))
    seqs = read_sequences(seq_dir, "item_ids", "timestamps", ITEMS)
    assert len(raw_users) == 943 and min(len(u["item_ids"]) for u in raw_users) >= 20
    for split, drop in (("train", 2), ("valid", 1), ("test", 0)):
        readers = [SplitReader(seqs, split, cfg, 100, r, 2, shuffle=split == "train") for r in range(2)]
        seen = []
        for rd in readers:
            batches = list(rd.batches(epoch=3))
            assert len(batches) == rd.num_batches() == readers[0].num_batches()  # lockstep
            for _, w in batches:
                offsets = np.concatenate([[0], np.cumsum(w.lengths)])
                for r, user in enumerate(w.users.tolist()):
                    items, ts = raw_users[user]["item_ids"], raw_users[user]["timestamps"]
                    end = len(items) - drop  # train ends before the valid item, valid before the test item
                    assert w.items[offsets[r]:offsets[r + 1]].tolist() == items[max(0, end - 31):end]
                    assert w.timestamps[offsets[r]:offsets[r + 1]].tolist() == ts[max(0, end - 31):end]
                seen += w.users.tolist()
        assert sorted(seen) == list(range(943)), split  # every user exactly once across the two ranks
    order = [next(SplitReader(seqs, "train", cfg, 100, 0, 1, True).batches(e))[1].users for e in (0, 1)]
    assert not np.array_equal(*order)  # reshuffled every epoch
    short = [SplitReader(seqs, "test", cfg, 471, r, 2, False) for r in range(2)]  # 471 vs 472 users
    weights = [[w.weight for _, w in rd.batches()] for rd in short]
    assert weights == [[1.0, 0.0], [1.0, 1.0]]  # rank 0 pads with a zero-weight batch


def test_full_corpus_eval_matches_brute_force_with_history_filtered(seq_dir: Path, raw_users: list[dict]) -> None:
    cfg = load_retrieval_config(CONFIG, tiny(seq_dir))
    full = read_sequences(seq_dir, "item_ids", "timestamps", ITEMS)
    n = 60
    seqs = Sequences(full.items[:full.offsets[n]], full.timestamps[:full.offsets[n]], full.offsets[:n + 1])
    torch.manual_seed(0)
    model = materialize(build_retrieval_model(cfg), torch.device("cpu")).eval()
    corpus = full.corpus()
    reader = SplitReader(seqs, "valid", cfg, 16, 0, 1, shuffle=False)
    got = evaluate_split(model, reader, corpus, [10, 50], torch.device("cpu"))
    table = normalize(model.ec.embeddings["item"].weight.detach())
    sums = {"hr@10": 0.0, "ndcg@10": 0.0, "mrr": 0.0, "unfiltered_mrr": 0.0}
    with torch.no_grad():
        for user in range(n):
            items, ts = raw_users[user]["item_ids"], raw_users[user]["timestamps"]
            tokens, stamps = items[:-1][-21:], ts[:-1][-21:]  # history window + the valid target
            emb = model.ec.embeddings["item"].weight[torch.tensor(tokens)]
            u = model.head.last_states(emb, torch.tensor([len(tokens)]), torch.tensor(stamps))[0]
            scores = {int(i): float(u @ table[i]) for i in corpus}
            target, history = tokens[-1], set(tokens[:-1])
            rank = sum(1 for i, s in scores.items() if i not in history and s >= scores[target])
            sums["hr@10"] += rank <= 10
            sums["ndcg@10"] += (rank <= 10) / math.log2(rank + 1)
            sums["mrr"] += 1 / rank
            sums["unfiltered_mrr"] += 1 / sum(1 for s in scores.values() if s >= scores[target])
    assert got["users"] == n
    for key in ("hr@10", "ndcg@10", "mrr"):
        assert got[key] == pytest.approx(sums[key] / n, rel=1e-6), key
    assert got["mrr"] != pytest.approx(sums["unfiltered_mrr"] / n, rel=1e-3)  # the filter matters here


# ---- config -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ml100k_hstu", "ml100k_sasrec", "ml1m_hstu", "ml1m_sasrec"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_retrieval_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.kind == "retrieval" and cfg.item.embedding_dim % 4 == 0
    assert retrieval_spec(cfg).inputs.schema.sequence_tables[0].name == "item"


def test_config_errors_name_the_key(seq_dir: Path) -> None:
    with pytest.raises(ConfigError, match="item.embedding_dim"):
        load_retrieval_config(CONFIG, ["item.embedding_dim=50"])
    with pytest.raises(ConfigError, match="model.params.dqkk"):
        load_retrieval_config(CONFIG, ["model.params={dqkk: 3}"])
    with pytest.raises(ConfigError, match="eval.early_stop_metric"):
        load_retrieval_config(CONFIG, ["eval.early_stop_metric=hr@5"])
    with pytest.raises(ConfigError, match="data_parallel"):
        load_retrieval_config(CONFIG, ["sharding.constraints={item: {sharding_types: [data_parallel]}}"])
    view = retrieval_spec(load_retrieval_config(CONFIG)).inputs
    assert view.sharding.constraints["item"].sharding_types == ["table_wise", "row_wise"]
    with pytest.raises(ValueError, match="item_ids.*outside"):
        read_sequences(seq_dir, "item_ids", "timestamps", 100)


# ---- end to end ---------------------------------------------------------------------------
def test_train_resume_and_eval_cli(seq_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """4 steps straight == 2 steps, stop, resume to 4 (weights, fused and AdamW state, RNG, data position)."""
    straight = cli.train(CONFIG, tiny(seq_dir, "train.max_steps=4"), str(tmp_path / "a"), resume=False)
    assert "NOT be pipelined" not in caplog.text  # TrainPipelineSparseDist pipelines the sharded item table
    cli.train(CONFIG, tiny(seq_dir, "train.max_steps=2"), str(tmp_path / "b"), resume=False)
    resumed = cli.train(CONFIG, tiny(seq_dir, "train.max_steps=4"), str(tmp_path / "b"), resume=True)
    assert resumed["valid"] == straight["valid"] and resumed["test"] == straight["test"]
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert sorted(saved) == ["test", "valid"]  # {"<split>": {...}} only, as ranking runs write it
    assert saved["valid"]["users"] == saved["test"]["users"] == 943
    best = json.loads((tmp_path / "a" / "best.json").read_text())
    assert (best["epoch"], best["step"], best["checkpoint"]) == (0, 4, "best/step-00000004")
    assert 0 < saved["test"]["hr@200"] <= 1 and saved["test"]["ndcg@10"] <= saved["test"]["hr@10"]
    history = [json.loads(line) for line in (tmp_path / "b" / "metrics_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]
    evaluated = cli.evaluate(CONFIG, tiny(seq_dir), str(tmp_path / "a"), str(tmp_path / "eval"))
    assert evaluated["valid"] == straight["valid"]
    with pytest.raises(ValueError, match="another schema/model"):
        cli.evaluate(CONFIG, tiny(seq_dir, "item.embedding_dim=8"), str(tmp_path / "a"), None)


def test_init_from_and_plan_through_the_one_cli(seq_dir: Path, tmp_path: Path) -> None:
    """Retrieval configs take --init-from and --plan like ranking ones: a run started from another run's
    weights with both learning rates 0 scores exactly what that run's checkpoint scores."""
    plan = tmp_path / "plan.json"
    proc = run_cli("plan", CONFIG, "--world-size", "1", "--device", "cpu", "--out", str(plan),
                   *[a for o in tiny(seq_dir) for a in ("--set", o)], check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(plan.read_text())["inputs"]["tables"] == {"ec": {"item": [ITEMS, 16]}}
    cli.train(CONFIG, tiny(seq_dir, "train.max_steps=2"), str(tmp_path / "a"), plan_path=str(plan))
    source = cli.evaluate(CONFIG, tiny(seq_dir), str(tmp_path / "a"), str(tmp_path / "eval_a"))
    frozen = tiny(seq_dir, "train.max_steps=1", "train.optim.sparse_lr=0.0", "train.optim.dense_lr=0.0")
    started = cli.train(CONFIG, frozen, str(tmp_path / "b"), init_from=str(tmp_path / "a"))
    assert started == source
    with pytest.raises(ValueError, match="another schema/model"):
        cli.train(CONFIG, tiny(seq_dir, "item.embedding_dim=8"), str(tmp_path / "c"), init_from=str(tmp_path / "a"))


@pytest.mark.parametrize("learns", [False, True])
def test_best_checkpoint_survives_rotation_and_reproduces_the_reported_metrics(
        seq_dir: Path, tmp_path: Path, learns: bool) -> None:
    """keep_checkpoints=1 over 3 epochs: checkpoints/ holds only the last epoch, best/ the best valid epoch.

    With both learning rates 0 every epoch scores the same, so the best (first strict maximum) is
    epoch 1 and the rotation has removed it from checkpoints/; with learning, whichever epoch won.
    """
    lr = [] if learns else ["train.optim.sparse_lr=0.0", "train.optim.dense_lr=0.0"]
    run = tmp_path / "run"
    metrics = cli.train(CONFIG, tiny(seq_dir, "train.epochs=3", "train.patience=0", "train.keep_checkpoints=1",
                                     *lr), str(run), resume=False)
    history = [json.loads(line) for line in (run / "metrics_history.jsonl").read_text().splitlines()]
    best = json.loads((run / "best.json").read_text())
    winner = max(history, key=lambda h: (h["valid"]["ndcg@10"], -h["epoch"]))
    assert (best["epoch"], best["step"]) == (winner["epoch"], winner["step"])
    assert metrics == {"valid": winner["valid"], "test": winner["test"]}
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [f"step-{history[-1]['step']:08d}"]
    assert [p.name for p in (run / "best").glob("step-*")] == [f"step-{best['step']:08d}"]
    if not learns:
        assert best["epoch"] == 1 and history[-1]["epoch"] == 3
    again = cli.evaluate(CONFIG, tiny(seq_dir), str(run / best["checkpoint"]), str(tmp_path / "eval"))
    for split in ("valid", "test"):
        assert again[split] == pytest.approx(metrics[split], rel=1e-6, abs=1e-9)


def test_two_ranks_under_torchrun(seq_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trec_rank.cli", "train", CONFIG, "--run-dir", str(run),
           *[a for o in tiny(seq_dir, "train.max_steps=3", "sharding.constraints={item: {sharding_types: [row_wise]}}")
             for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["valid"]["users"] == metrics["test"]["users"] == 943  # summed over both ranks' users
    assert proc.stdout.count("valid:") == 1  # printed by rank 0 only
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    # the row-wise table resharded onto one rank scores every user the same: gather + aggregation are exact
    one_rank = cli.evaluate(CONFIG, tiny(seq_dir), str(run), str(tmp_path / "eval1"))
    for split in ("valid", "test"):
        assert one_rank[split] == pytest.approx(metrics[split], rel=1e-6, abs=1e-9)
