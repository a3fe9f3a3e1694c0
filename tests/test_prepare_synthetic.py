"""Synthetic data for an arbitrary schema: shapes, types, id ranges, alignment and the planted signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trec_rank.config.schema import Schema
from trec_rank.config.typed import from_dict
from trec_rank.data.prepare.synthetic import prepare_synthetic

SCHEMA = {
    "tables": [{"name": "user", "num_embeddings": 1_000_000_000, "embedding_dim": 8},
               {"name": "item", "num_embeddings": 5000, "embedding_dim": 8},
               {"name": "tag", "num_embeddings": 2, "embedding_dim": 8}],
    "features": [
        {"name": "user_id", "kind": "sparse", "table": "user"},
        {"name": "item_id", "kind": "sparse", "table": "item"},
        {"name": "tag_list", "kind": "sparse", "table": "tag"},
        {"name": "tags3", "kind": "sparse", "table": "tag", "max_len": 3},
        {"name": "hist", "kind": "sequence", "table": "item", "max_len": 7,
         "side": {"timestamp": "hist_ts", "rating": "hist_rating"}},
        {"name": "price", "kind": "dense"},
        {"name": "other", "kind": "dense"},
        {"name": "click", "kind": "label"},
        {"name": "buy", "kind": "label"},
    ],
}


def _read(path: Path) -> pa.Table:
    return pq.read_table(sorted(path.glob("part-*.parquet")))


def _w(ids: list[int]) -> np.ndarray:
    return np.array([((i * 2654435761) % 1000) / 1000 - 0.5 for i in ids])


def test_shapes_types_ranges_and_alignment(tmp_path: Path) -> None:
    schema = from_dict(Schema, SCHEMA)
    man = prepare_synthetic(schema, 3000, tmp_path, seed=5)
    assert [man["splits"][s]["rows"] for s in ("train", "valid", "test")] == [2400, 300, 300]
    assert json.loads((tmp_path / "_manifest.json").read_text())["signal"] == man["signal"]
    t = pa.concat_tables(_read(tmp_path / s) for s in ("train", "valid", "test"))
    lists = ["tag_list", "tags3", "hist", "hist_ts", "hist_rating"]
    expect = {"user_id": pa.int64(), "item_id": pa.int64()} | {c: pa.list_(pa.int64()) for c in lists}
    expect |= {c: pa.float32() for c in ("price", "other", "click", "buy")}
    assert {f.name: f.type for f in t.schema} == expect
    assert man["columns"]["hist"] == "list<int64>" and man["columns"]["click"] == "float"
    user = t["user_id"].to_numpy()
    assert user.min() >= 0 and user.max() < 1e9 and user.max() > 1e6  # heavy tail reaches large ids
    assert np.mean(user < 1000) > 0.2  # ... while small ids are hot
    for col, lo, hi, size in (("tag_list", 1, 1, 2), ("tags3", 1, 3, 2), ("hist", 0, 7, 5000)):
        lengths = pc.list_value_length(t[col]).to_numpy()
        values = pc.list_flatten(t[col]).to_numpy()
        assert lengths.min() == lo and lengths.max() == hi
        assert values.min() >= 0 and values.max() < size
        assert set(np.unique(values)) >= ({0, 1} if size == 2 else {0})
    lengths = pc.list_value_length(t["hist"]).to_numpy()
    for side in ("hist_ts", "hist_rating"):
        assert np.array_equal(pc.list_value_length(t[side]).to_numpy(), lengths)
    ts, row = pc.list_flatten(t["hist_ts"]).to_numpy(), np.repeat(np.arange(t.num_rows), lengths)
    assert np.all((np.diff(ts) > 0) | (np.diff(row) != 0))
    assert set(np.unique(pc.list_flatten(t["hist_rating"]).to_numpy())) <= {1, 2, 3, 4, 5}
    assert set(np.unique(t["click"].to_numpy())) == {0.0, 1.0}
    assert abs(float(t["price"].to_numpy().std()) - 1) < 0.1
    assert man["id_ranges"]["user_id"][1] < 1e9 and man["tables"]["user"] == 1_000_000_000


def test_planted_signal_is_learnable(tmp_path: Path) -> None:
    schema = from_dict(Schema, SCHEMA)
    prepare_synthetic(schema, 60_000, tmp_path, seed=0)
    t = _read(tmp_path / "train")
    firsts = [t["user_id"].to_pylist(), t["item_id"].to_pylist(), [v[0] for v in t["tag_list"].to_pylist()]]
    w = sum(_w(ids) for ids in firsts)
    click = t["click"].to_numpy()
    assert click[w > 0.3].mean() - click[w < -0.3].mean() > 0.4
    price = t["price"].to_numpy()
    assert click[price > 1].mean() - click[price < -1].mean() > 0.2  # first dense feature counts
    other = t["other"].to_numpy()
    assert abs(click[other > 1].mean() - click[other < -1].mean()) < 0.05  # second one does not
    assert abs(t["buy"].to_numpy().mean() - click.mean()) < 0.02


def test_chunked_and_seeded(tmp_path: Path) -> None:
    raw = {"tables": [{"name": "a", "num_embeddings": 10, "embedding_dim": 4}],
           "features": [{"name": "a", "kind": "sparse", "table": "a"}, {"name": "y", "kind": "label"}]}
    schema = from_dict(Schema, raw)
    man = prepare_synthetic(schema, 450_000, tmp_path / "one", seed=7)
    assert man["splits"]["train"]["files"] == ["part-00000.parquet", "part-00001.parquet"]
    assert pq.ParquetFile(tmp_path / "one" / "train" / "part-00000.parquet").metadata.num_rows == 200_000
    small = prepare_synthetic(schema, 5, tmp_path / "two", seed=7)
    again = prepare_synthetic(schema, 5, tmp_path / "three", seed=7)
    assert _read(tmp_path / "two" / "train").equals(_read(tmp_path / "three" / "train"))
    assert small["splits"]["valid"]["rows"] == 0 and _read(tmp_path / "two" / "valid").num_rows == 0
    assert again["splits"]["test"]["rows"] == 1
