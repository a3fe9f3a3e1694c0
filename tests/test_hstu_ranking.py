"""HSTU as a ranking over-arch: token layout, target awareness, config checks, training via the trec-rank CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from tests.helpers import ROOT, run_cli
from trec_rank.config.experiment import load_config
from trec_rank.config.models import side_bounds
from trec_rank.config.typed import ConfigError
from trec_rank.models import registry
from trec_rank.models.embeddings import materialize
from trec_rank.models.ranking import RankingModel
from trec_rank.parallel.env import DistEnv
from trec_rank.train.build import open_split

CONFIG = ROOT / "configs" / "ml100k_hstu_ranking.yaml"
ESMM_HSTU = ROOT / "configs" / "ml100k_hstu_esmm.yaml"


def build(*overrides: str) -> RankingModel:
    """The registry's model (RankingModel(EBC, EC, HSTUOverArch)) materialised on CPU, eval mode."""
    torch.manual_seed(0)
    model = registry.build_model(load_config(CONFIG, list(overrides)), torch.device("meta"))
    return materialize(model, torch.device("cpu")).eval()


def test_tokens_are_history_then_target_with_next_event_query_times() -> None:
    over = build().over.target_encoder  # the reusable (EC outputs, side) -> [B, D] module
    d = 32
    hist = JaggedTensor(values=torch.randn(5, d), lengths=torch.tensor([2, 0, 3]))
    target = JaggedTensor(values=torch.randn(3, d), lengths=torch.tensor([1, 1, 1]))
    side = {"hist_item_id/rating": torch.tensor([5, 1, 3, 4, 2]),
            "hist_item_id/timestamp": torch.tensor([10, 20, 100, 200, 300])}
    tokens, lengths, ts, query, tgt = over.tokens({"hist_item_id": hist, "item_id": target}, side)
    assert lengths.tolist() == [3, 1, 4] and tgt.tolist() == [2, 3, 7]
    action = over.action.detach()
    want = torch.stack([hist.values()[0] + action[5], hist.values()[1] + action[1], target.values()[0] + action[0],
                        target.values()[1] + action[0],
                        hist.values()[2] + action[3], hist.values()[3] + action[4], hist.values()[4] + action[2],
                        target.values()[2] + action[0]])
    torch.testing.assert_close(tokens, want)
    assert ts.tolist() == [10, 20, 20, 0, 100, 200, 300, 300]  # the target takes the newest history time
    assert query.tolist() == [20, 20, 20, 0, 200, 300, 300, 300]  # next token's time; targets their own


def test_action_out_of_range_is_refused_by_the_loader_with_one_line(ml100k_dir: Path, tmp_path: Path) -> None:
    """num_actions bounds the rating side column; the loader checks it once per chunk (ratings run 1..5,
    so num_actions 5 leaves rating 5 without a row), and the CLI prints one `error:` line naming
    the column and the config key."""
    data = f"data.path={ml100k_dir / 'ranking'}"
    assert side_bounds(load_config(CONFIG).model.typed_params) == {
        "hist_item_id/rating": (6, "model.params.num_actions")}
    assert side_bounds(load_config(ESMM_HSTU).model.typed_params) == {  # the encoder's `hstu:` option
        "hist_item_id/rating": (6, "model.params.encoder.hstu.num_actions")}
    proc = run_cli("train", str(CONFIG), "--run-dir", str(tmp_path / "run"), "--set", data,
                   "--set", "model.params.num_actions=5", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "side column 'hist_rating' holds 5 at row" in lines[0]
    assert lines[0].endswith("outside [0, 5) (model.params.num_actions)")


def test_output_is_target_aware_and_rows_are_independent(ml100k_dir: Path) -> None:
    model = build()
    cfg = load_config(CONFIG, [f"data.path={ml100k_dir / 'ranking'}", "data.eval_batch_size=8"])
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    batch = next(open_split(cfg, "valid", env, train=False).batches())
    seq = batch.sequence
    values = seq.values().clone()
    first = seq.offset_per_key()[seq.keys().index("item_id")]  # row 0's target item
    values[first] = values[first] % 1682 + 1
    other = KeyedJaggedTensor(keys=seq.keys(), values=values, lengths=seq.lengths())
    with torch.no_grad():
        base = model(batch)["like"]
        changed = model(replace(batch, sequence=other))["like"]
    assert changed[0] != base[0]
    torch.testing.assert_close(changed[1:], base[1:], rtol=0, atol=0)


def test_params_are_checked_against_the_schema() -> None:
    with pytest.raises(ConfigError, match="same table"):
        build("model.params.target=user_id")
    with pytest.raises(ConfigError, match="not a side column"):
        build("model.params.time_side=ts")
    with pytest.raises(ConfigError, match="model.params.encoder.dqk"):
        load_config(CONFIG, ["model.params.encoder.dqk=0"])


def test_trains_through_the_cli(ml100k_dir: Path, tmp_path: Path) -> None:
    run_cli("train", str(CONFIG), "--run-dir", str(tmp_path / "cli"), "--set", f"data.path={ml100k_dir / 'ranking'}",
            "--set", "train.max_steps=20", "--set", "data.eval_splits=[valid]")
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["valid"]["like/auc"] > 0.6  # 0.66 after 20 steps; an untrained model sits at 0.5



def test_hstu_inside_the_shared_encoder_of_esmm(ml100k_dir: Path) -> None:
    """`encoder.hstu` puts the target-aware HSTU under any tower stack: a history rating reaches only its row."""
    cfg = load_config(ESMM_HSTU, [f"data.path={ml100k_dir / 'funnel'}", "data.eval_batch_size=8"])
    torch.manual_seed(0)
    model = materialize(registry.build_model(cfg, torch.device("meta")), torch.device("cpu")).eval()
    batch = next(open_split(cfg, "valid", env=DistEnv(0, 1, 0, 1, torch.device("cpu")), train=False).batches())
    ratings = batch.side["hist_item_id/rating"].clone()
    n0 = int(batch.sequence["hist_item_id"].lengths()[0])
    assert n0 > 0, "row 0 needs a history for this check"
    ratings[:n0] = 6 - ratings[:n0]  # flip row 0's ratings: only the HSTU tokens read them
    with torch.no_grad():
        base = model(batch)
        changed = model(replace(batch, side={**batch.side, "hist_item_id/rating": ratings}))
    for key in ("watch", "like", "cvr"):
        assert changed[key][0] != base[key][0]
        torch.testing.assert_close(changed[key][1:], base[key][1:], rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"model.params.encoder.hstu: 'ts' is not a side column"):
        registry.build_model(load_config(ESMM_HSTU, ["model.params.encoder.hstu.time_side=ts"]))


def test_esmm_with_hstu_trains_through_the_cli(ml100k_dir: Path, tmp_path: Path) -> None:
    run_cli("train", str(ESMM_HSTU), "--run-dir", str(tmp_path / "esmm"), "--set",
            f"data.path={ml100k_dir / 'funnel'}", "--set", "train.max_steps=20", "--set", "data.eval_splits=[valid]")
    valid = json.loads((tmp_path / "esmm" / "metrics.json").read_text())["valid"]
    # 20 steps is too few for ESMM to rank (base ESMM sits near 0.5 too): check the run end to end
    assert all(0.0 < valid[f"{k}/auc"] < 1.0 for k in ("watch", "like", "cvr")), valid
