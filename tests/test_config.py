"""Typed config loading: unknown keys, wrong types and bad references are named precisely."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trec_rank.config.experiment import load_config, read_config
from trec_rank.config.models import MODEL_PARAMS, DinParams
from trec_rank.config.typed import ConfigError, to_dict
from trec_rank.retrieval.config import is_retrieval_config, load_retrieval_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "ml100k_base.yaml"


def write(tmp_path: Path, mutate) -> Path:  # noqa: ANN001
    raw = read_config(BASE)
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


def test_an_optional_key_says_null_is_allowed_too() -> None:
    message = r"ml100k_base.yaml: train.pipeline: expected true/false, got 'maybe' \(or null\)$"
    with pytest.raises(ConfigError, match=message):
        load_config(BASE, ["train.pipeline=maybe"])
    assert load_config(BASE, ["train.pipeline=null"]).train.pipeline is None


# ---- schema files ----------------------------------------------------------------------------------
SCHEMA = {"tables": [{"name": "item", "num_embeddings": 10, "embedding_dim": 4},
                     {"name": "user", "num_embeddings": 5, "embedding_dim": 4}],
          "features": [{"name": "item_id", "kind": "sparse", "table": "item"},
                       {"name": "user_id", "kind": "sparse", "table": "user"},
                       {"name": "age", "kind": "dense"},
                       {"name": "click", "kind": "label"}]}


def config_with(tmp_path: Path, name: str, schema: object) -> Path:
    path = tmp_path / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"data": {"path": "data/x"}, "schema": schema, "model": {"name": "base"}}))
    return path


def same_config(a: Path, b: Path) -> bool:
    """Equal in everything but the file they came from (what to_dict, config.json and fingerprints see)."""
    return to_dict(load_config(a)) == to_dict(load_config(b))


def test_a_schema_file_loads_exactly_like_the_inline_schema(tmp_path: Path) -> None:
    (tmp_path / "configs" / "schemas").mkdir(parents=True)
    (tmp_path / "configs" / "schemas" / "s.yaml").write_text(yaml.safe_dump(SCHEMA))
    inline = config_with(tmp_path, "inline", SCHEMA)
    assert same_config(config_with(tmp_path, "by_name", "schemas/s.yaml"), inline)
    assert same_config(config_with(tmp_path, "by_include", {"include": "schemas/s.yaml"}), inline)
    assert not same_config(config_with(tmp_path, "other", {"include": "schemas/s.yaml", "drop": ["age"]}), inline)
    # drop, then append: a config that differs states only the difference, in the inline order
    edited = {"tables": [*SCHEMA["tables"], {"name": "shop", "num_embeddings": 3, "embedding_dim": 4}],
              "features": [*SCHEMA["features"][:2], SCHEMA["features"][3], {"name": "shop_id", "kind": "sparse",
                                                                           "table": "shop"},
                           {"name": "buy", "kind": "label"}]}
    extended = {"include": "schemas/s.yaml", "drop": ["age"], "tables": [edited["tables"][2]],
                "features": edited["features"][3:]}
    assert same_config(config_with(tmp_path, "extended", extended), config_with(tmp_path, "edited", edited))
    # a schema file may include another, relative to itself
    (tmp_path / "configs" / "schemas" / "t.yaml").write_text(yaml.safe_dump({"include": "s.yaml"}))
    assert same_config(config_with(tmp_path, "nested", "schemas/t.yaml"), inline)
    # overrides address the inlined schema
    cfg = load_config(config_with(tmp_path, "set", "schemas/s.yaml"), ["schema.tables.0.embedding_dim=8"])
    assert cfg.schema.table("item").embedding_dim == 8


@pytest.mark.parametrize("schema,message", [
    ("schemas/none.yaml", "schema.include: schema file not found"),
    ({"include": "schemas/s.yaml", "drop": ["nope"]}, "schema.drop[0]: 'nope' is not a feature of"),
    ({"include": "schemas/s.yaml", "drop": "age"}, "schema.drop: expected a list"),
    ({"include": "schemas/s.yaml", "extra": 1}, "unknown config key 'schema.extra'"),
])
def test_bad_schema_reference_names_the_key_and_file(tmp_path: Path, schema: object, message: str) -> None:
    (tmp_path / "configs" / "schemas").mkdir(parents=True)
    (tmp_path / "configs" / "schemas" / "s.yaml").write_text(yaml.safe_dump(SCHEMA))
    path = config_with(tmp_path, "bad", schema)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_data_path_is_resolved_once_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As given when it exists from the working directory, else relative to the config file's directory
    where it exists there, else as written (so a missing-data error names the user's path)."""
    path = config_with(tmp_path, "c", SCHEMA)
    monkeypatch.chdir(tmp_path)
    assert load_config(path).data.path == "data/x"
    (tmp_path / "configs" / "data" / "x").mkdir(parents=True)
    assert load_config(path).data.path == str((tmp_path / "configs" / "data" / "x").absolute())
    (tmp_path / "data" / "x").mkdir(parents=True)
    cfg = load_config(path)
    assert cfg.data.path == "data/x" and cfg.data.split_path("train") == Path("data/x/train")
    assert cfg.source == str(path) and "source" not in to_dict(cfg)


# ---- typed model params --------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_with_typed_params(path: Path) -> None:
    raw = read_config(path)
    if is_retrieval_config(path):
        cfg = load_retrieval_config(path)
        assert type(cfg.model.typed_params).__name__ in ("HSTUConfig", "SASRecConfig")
    else:
        cfg = load_config(path)
        assert isinstance(cfg.model.typed_params, MODEL_PARAMS[cfg.model.name])
    # the written mapping is what config.json and the checkpoint fingerprint record, not the typed defaults
    assert to_dict(cfg.model)["params"] == raw.get("model", {}).get("params", {})
    assert "typed_params" not in to_dict(cfg.model)


def test_params_are_typed_at_load_and_errors_name_the_key() -> None:
    din = load_config(ROOT / "configs" / "ml100k_din.yaml", ["model.params.encoder.l2.weight=0.5"])
    assert isinstance(din.model.typed_params, DinParams) and din.model.typed_params.encoder.l2.weight == 0.5
    with pytest.raises(ConfigError, match=r"model\.params\.encoder\.attention: DIN needs at least one"):
        load_config(ROOT / "configs" / "ml100k_din.yaml", ["model.params.encoder.attention=[]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.params\.encoder\.l3'"):
        load_config(ROOT / "configs" / "ml100k_din.yaml", ["model.params.encoder.l3={weight: 1}"])
    with pytest.raises(ConfigError, match=r"model\.params\.ctr_task: 'click' is not a task"):
        load_config(ROOT / "configs" / "ml100k_esmm.yaml", ["model.params.ctr_task=click"])


def test_config_layer_imports_no_model_code() -> None:
    code = ("import sys, trec_rank.config.experiment, trec_rank.config.models, trec_rank.data.frequency; "
            "print(sorted(m for m in sys.modules if m.startswith('trec_rank.models')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
