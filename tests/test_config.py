"""Typed config loading: unknown keys, wrong types and bad references are named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trec_rank.config.experiment import load_config
from trec_rank.config.typed import ConfigError

BASE = Path(__file__).resolve().parents[1] / "configs" / "ml100k_base.yaml"


def write(tmp_path: Path, mutate) -> Path:  # noqa: ANN001
    raw = yaml.safe_load(BASE.read_text())
    mutate(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_config_loads_with_overrides() -> None:
    cfg = load_config(BASE, ["train.epochs=3", "data.batch_size=64", "model.params.hidden=[32]"])
    assert cfg.train.epochs == 3 and cfg.data.batch_size == 64 and cfg.model.tasks == ["like"]
    assert [f.name for f in cfg.schema.pooled_features] == ["user_id", "age_bucket", "gender", "occupation",
                                                            "year_bucket"]
    assert "hist_item_id" in [f.name for f in cfg.schema.sequence_features]
    assert cfg.schema.feature("hist_item_id").side == {"rating": "hist_rating", "timestamp": "hist_ts"}


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r["data"].update(batchsize=3), "unknown config key 'data.batchsize'"),
    (lambda r: r["schema"]["features"][0].update(kind="sprase"), "schema.features[0].kind: 'sprase' is not one of"),
    (lambda r: r["schema"]["features"][0].update(table="nope"), "schema.features[0].table: unknown table 'nope'"),
    (lambda r: r["schema"]["tables"][0].update(num_embeddings=0), "schema.tables[0].num_embeddings: must be >= 1"),
    (lambda r: r["schema"]["tables"][0].update(embedding_dim="big"), "schema.tables[0].embedding_dim: expected an "
                                                                     "integer"),
    (lambda r: r["schema"]["features"][8].update(max_len=0), "schema.features[8].max_len: a sequence feature"),
    (lambda r: r["schema"]["features"][9].update(oov="drop"), "schema.features[9].oov: 'drop' is not one of"),
    (lambda r: r.update(model={"name": "nope"}), "model.name: unknown model 'nope'"),
    (lambda r: r.update(model={"params": {"hiden": [3]}}), "unknown config key 'model.params.hiden'"),
    (lambda r: r.update(model={"tasks": ["click"]}), "model.tasks[0]: 'click' is not a label feature"),
    (lambda r: r.update(train={"loss_weights": {"watch": 1.0}}), "train.loss_weights.watch: not a task"),
    (lambda r: r.update(sharding={"constraints": {"items": {}}}), "sharding.constraints.items: unknown table"),
    (lambda r: r["data"].update(group_by="hist_item_id"), "data.group_by: 'hist_item_id' is not a sparse feature"),
])
def test_bad_config_names_the_key_and_file(tmp_path: Path, mutate, message: str) -> None:  # noqa: ANN001
    path = write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_bad_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--set 'train': expected KEY=VALUE"):
        load_config(BASE, ["train"])
    with pytest.raises(ConfigError, match="train.epochs: must be >= 1"):
        load_config(BASE, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads `2e-3` as a string; a float field takes it as the number users wrote."""
    cfg = load_config(BASE, ["train.optim.dense_lr=2e-3"])
    assert cfg.train.optim.dense_lr == pytest.approx(0.002)
    path = write(tmp_path, lambda r: r.setdefault("train", {}).setdefault("optim", {}).update(dense_lr="1E-4"))
    assert load_config(path).train.optim.dense_lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="train.optim.dense_lr: expected a number, got 'fast'"):
        load_config(BASE, ["train.optim.dense_lr=fast"])
