"""`trec-rank compare`: the paired bootstrap on constructed inputs with known answers, the eval-rows files
and the refusals. No model is trained here; test_actions.py checks a real run writes the rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trec_rank.cli import main
from trec_rank.compare.bootstrap import auc_statistic, mean_statistic, paired_bootstrap, ratio_statistic
from trec_rank.compare.cli import compare
from trec_rank.retrieval.metrics import RankingMetrics
from trec_rank.runtime.eval_rows import EvalResult, ranking_table, write_retrieval_rows, write_table
from trec_rank.runtime.metrics import auc, gauc


def test_constant_shift_gives_a_zero_width_interval_at_the_shift() -> None:
    b = np.random.default_rng(0).integers(0, 64, 500) / 64.0  # dyadic values: A - B is exact
    iv = paired_bootstrap([mean_statistic(b + 0.125)], [mean_statistic(b)], 500, resamples=500)
    assert iv.diff == pytest.approx(0.125) and iv.low == pytest.approx(0.125) and iv.high == pytest.approx(0.125)
    assert iv.verdict.startswith("A > B")


def test_independent_noise_gives_an_interval_that_covers_zero() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 0.2, 943), rng.normal(0.3, 0.2, 943)
    iv = paired_bootstrap([mean_statistic(a)], [mean_statistic(b)], 943)
    assert iv.low < 0 < iv.high and iv.verdict.startswith("no difference")
    # the width is that of the per-user differences' standard error, not zero and not absurd
    se = np.std(a - b, ddof=1) / np.sqrt(943)
    assert 3.0 * se < iv.high - iv.low < 4.8 * se


def test_large_sample_matches_the_normal_theory_interval() -> None:
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 1, 20_000)  # user difficulty, common to both runs: pairing removes it
    a, b = shared + rng.normal(0.05, 0.5, 20_000), shared + rng.normal(0, 0.5, 20_000)
    iv = paired_bootstrap([mean_statistic(a)], [mean_statistic(b)], 20_000, resamples=4000)
    d = a - b
    half = 1.959964 * d.std(ddof=1) / np.sqrt(len(d))
    assert iv.diff == pytest.approx(d.mean())
    assert iv.low == pytest.approx(d.mean() - half, abs=0.08 * half)
    assert iv.high == pytest.approx(d.mean() + half, abs=0.08 * half)
    unpaired = 1.959964 * np.sqrt(a.var(ddof=1) + b.var(ddof=1)) / np.sqrt(len(d))
    assert iv.high - iv.low < 0.5 * 2 * unpaired  # pairing removed the shared difficulty


def test_seed_resampling_carries_the_seed_spread() -> None:
    """A's two seeds sit at +d and -d for every user, B at 0: users cannot move the mean, seeds can.
    Resampling two seeds gives means -d, 0, +d with probabilities 1/4, 1/2, 1/4: the interval is [-d, d]."""
    d, base = 0.25, np.full(100, 0.5)
    a = [mean_statistic(base + d), mean_statistic(base - d)]
    iv = paired_bootstrap(a, [mean_statistic(base)], 100, resamples=4000)
    assert iv.diff == pytest.approx(0.0) and iv.low == pytest.approx(-d) and iv.high == pytest.approx(d)
    one = paired_bootstrap(a[:1], [mean_statistic(base)], 100)  # one seed: zero width (no seed resampling)
    assert one.low == pytest.approx(d) and one.high == pytest.approx(d)


def test_statistics_at_unit_weights_are_the_exact_metrics() -> None:
    rng = np.random.default_rng(3)
    n, groups = 2000, 50
    unit = rng.integers(0, groups, n)
    labels = (rng.random(n) < 0.4).astype(np.float64)
    scores = np.round(rng.random(n) * 20) / 20 + 0.2 * labels  # many ties
    ones = np.ones((1, groups))
    assert auc_statistic(scores, labels, unit)(ones)[0] == pytest.approx(auc(scores, labels))
    # weights = repeating a unit's rows: 2 copies of unit 0 is the AUC of the data with unit 0 duplicated
    w = ones.copy()
    w[0, 0] = 2.0
    dup = np.r_[np.arange(n), np.flatnonzero(unit == 0)]
    assert auc_statistic(scores, labels, unit)(w)[0] == pytest.approx(auc(scores[dup], labels[dup]))
    rows = np.bincount(unit, minlength=groups).astype(float)
    vals = rng.random(groups)
    assert ratio_statistic(vals * rows, rows)(ones)[0] == pytest.approx((vals * rows).sum() / rows.sum())


def _retrieval_run(path: Path, users: np.ndarray, targets: np.ndarray, ranks: np.ndarray) -> Path:
    """A run directory with eval_rows.parquet built by the code the trainer uses (RankingMetrics.per_user)."""
    import torch

    out = {}
    for split in ("valid", "test"):
        m = RankingMetrics([10, 50], torch.device("cpu"))
        m.update(torch.from_numpy(ranks), torch.ones(len(ranks)), torch.from_numpy(users), torch.from_numpy(targets))
        out[split] = EvalResult(m.compute(), m.per_user())
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(out))
    write_retrieval_rows(path, out)
    return path


def test_cli_compares_runs_and_means_equal_metrics_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(4)
    users, targets = np.arange(300), rng.integers(1, 1000, 300)
    good = [_retrieval_run(tmp_path / f"a{s}", users, targets, rng.integers(1, 12, 300)) for s in range(2)]
    bad = [_retrieval_run(tmp_path / f"b{s}", users, targets, rng.integers(20, 900, 300)) for s in range(2)]
    units, res = compare([str(p) for p in good[:1]], [str(p) for p in bad[:1]])
    assert units == 300
    saved = json.loads((good[0] / "metrics.json").read_text())["test"]
    assert res["ndcg@10"].mean_a == pytest.approx(saved["ndcg@10"]) and res["mrr"].mean_a == pytest.approx(saved["mrr"])
    assert res["hr@10"].low > 0.5  # A hits nearly always, B never
    assert main(["compare", "--a", *map(str, good), "--b", *map(str, bad), "--metrics", "ndcg@10,mrr",
                 "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "| ndcg@10 |" in out and "A > B" in out and "runs (seeds)" in out and "| hr@50 |" not in out
    assert json.loads((tmp_path / "c.json").read_text())["metrics"]["mrr"]["low"] > 0


def test_refuses_runs_on_other_users_or_targets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    users, targets, ranks = np.arange(50), np.arange(50) + 1, np.full(50, 3)
    a = _retrieval_run(tmp_path / "a", users, targets, ranks)
    other_target = _retrieval_run(tmp_path / "t", users, np.r_[targets[:-1], 999], ranks)
    fewer = _retrieval_run(tmp_path / "u", users[:-1], targets[:-1], ranks[:-1])
    for run in (other_target, fewer):
        assert main(["compare", str(a), str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not on the same split" in err[0] and str(run) in err[0]
    assert main(["compare", str(a), str(tmp_path)]) == 2
    assert "no per-user eval rows" in capsys.readouterr().err
    assert main(["compare", str(a), str(a), "--split", "train"]) == 2
    assert "no eval rows for split 'train'" in capsys.readouterr().err


def _ranking_run(path: Path, groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> Path:
    n = len(groups)
    table = ranking_table({"test": {"task": np.full(n, "like", dtype=object), "row": np.arange(n)[::-1].copy(),
                                    "group": groups, "score": scores, "label": labels}})
    write_table(path, table)
    return path


def test_ranking_rows_pair_by_row_and_resample_groups(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n = 3000
    groups, labels = rng.integers(0, 100, n), (rng.random(n) < 0.5).astype(np.float32)
    strong = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.15, n), 0.01, 0.99).astype(np.float32)
    weak = np.clip(0.5 + rng.normal(0, 0.15, n), 0.01, 0.99).astype(np.float32)
    a, b = _ranking_run(tmp_path / "a", groups, labels, strong), _ranking_run(tmp_path / "b", groups, labels, weak)
    units, res = compare([str(a)], [str(b)])
    assert units == 100 and set(res) == {"like/auc", "like/gauc", "like/logloss"}
    order = np.arange(n)[::-1]  # rows were written in reverse row order: compare re-sorts by row
    assert res["like/auc"].mean_a == pytest.approx(auc(strong[order].astype(float), labels[order]), rel=1e-6)
    assert res["like/gauc"].mean_b == pytest.approx(gauc(groups, weak.astype(float), labels), rel=1e-6)
    assert res["like/auc"].low > 0.2 and res["like/logloss"].high < 0
    shuffled = _ranking_run(tmp_path / "c", groups, rng.permutation(labels), strong)
    with pytest.raises(ValueError, match="not on the same split"):
        compare([str(a)], [str(shuffled)])
    retrieval = _retrieval_run(tmp_path / "r", np.arange(3), np.arange(3), np.ones(3, int))
    assert main(["compare", str(a), str(retrieval)]) == 2  # ranking vs retrieval: refused
