"""Parquet -> Batch: exactly-once partitioning, KJT layout against a row-by-row reference, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trec_rank.config.schema import Schema
from trec_rank.config.typed import from_dict
from trec_rank.data.convert import DataError
from trec_rank.data.dataset import ParquetDataset, pin_for

SCHEMA = {
    "tables": [{"name": "item", "num_embeddings": 100, "embedding_dim": 8},
               {"name": "user", "num_embeddings": 50, "embedding_dim": 8},
               {"name": "tag", "num_embeddings": 10, "embedding_dim": 8}],
    "features": [
        {"name": "user_id", "kind": "sparse", "table": "user"},
        {"name": "tags", "kind": "sparse", "table": "tag", "pooling": "mean"},
        {"name": "item_id", "kind": "sparse", "table": "item"},
        {"name": "hist", "kind": "sequence", "table": "item", "max_len": 4, "side": {"ts": "hist_ts"}},
        {"name": "x", "kind": "dense"},
        {"name": "y", "kind": "label"},
    ],
}


def make_rows(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    hist = [list(rng.integers(0, 100, rng.integers(0, 7))) for _ in range(n)]
    return {
        "user_id": rng.integers(0, 50, n), "tags": [list(rng.integers(0, 10, rng.integers(1, 4))) for _ in range(n)],
        "item_id": rng.integers(0, 100, n), "hist": hist, "hist_ts": [list(range(len(h))) for h in hist],
        "x": rng.normal(size=n).astype(np.float32), "y": rng.integers(0, 2, n).astype(np.float32),
    }


def write(path, rows: dict, row_group_size: int = 37, **types) -> None:  # noqa: ANN001
    t = {"user_id": pa.int64(), "tags": pa.list_(pa.int64()), "item_id": pa.int64(), "hist": pa.list_(pa.int64()),
         "hist_ts": pa.list_(pa.int64()), "x": pa.float32(), "y": pa.float32(), **types}
    table = pa.table({k: pa.array(v, type=t.get(k)) for k, v in rows.items()})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture()
def schema() -> Schema:
    return from_dict(Schema, SCHEMA)


@pytest.fixture()
def data_dir(tmp_path):  # noqa: ANN001, ANN201
    for i, n in enumerate([150, 1, 233]):
        write(tmp_path / f"part-{i}.parquet", make_rows(n, i))
    return tmp_path


def collect(ds: ParquetDataset, **kw) -> list[int]:  # noqa: ANN003
    return [int(r) for b in ds.batches(**kw) for r in b.row_index]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_exactly_once_across_ranks(data_dir, schema, shuffle, world) -> None:  # noqa: ANN001
    seen = []
    for rank in range(world):
        ds = ParquetDataset(data_dir, schema, 16, rank=rank, world_size=world, shuffle=shuffle, seed=3,
                            shuffle_buffer=40)
        rows = collect(ds, epoch=1)
        assert len(rows) == ds.rank_rows(rank)
        assert sum(1 for _ in ds.batches(epoch=1)) == ds.num_batches()
        seen += rows
    assert sorted(seen) == list(range(384))


def test_shuffle_is_seeded_and_changes_per_epoch(data_dir, schema) -> None:  # noqa: ANN001
    a = ParquetDataset(data_dir, schema, 16, shuffle=True, seed=1)
    b = ParquetDataset(data_dir, schema, 16, shuffle=True, seed=1)
    assert collect(a, epoch=0) == collect(b, epoch=0)
    assert collect(a, epoch=0) != collect(a, epoch=1)
    assert collect(a, epoch=0) != list(range(384))


def test_workers_and_resume_give_the_same_stream(data_dir, schema) -> None:  # noqa: ANN001
    base = ParquetDataset(data_dir, schema, 16, shuffle=True, seed=2, shuffle_buffer=48)
    workers = ParquetDataset(data_dir, schema, 16, shuffle=True, seed=2, shuffle_buffer=48, num_workers=2)
    full = collect(base, epoch=0)
    assert collect(workers, epoch=0) == full
    assert collect(base, epoch=0, start_batch=5) == full[5 * 16:]
    assert collect(workers, epoch=0, start_batch=7) == full[7 * 16:]


def test_drop_last_and_lockstep_padding(data_dir, schema) -> None:  # noqa: ANN001
    ds = ParquetDataset(data_dir, schema, 100, drop_last=True)
    assert [b.batch_size for b in ds.batches()] == [100, 100, 100]
    r0 = ParquetDataset(data_dir, schema, 96, rank=0, world_size=2)   # 192 rows -> 2 batches
    r1 = ParquetDataset(data_dir, schema, 100, rank=1, world_size=2)  # 192 rows -> 2 batches
    assert r0.max_batches() == 2 and r1.max_batches() == 2
    uneven = ParquetDataset(data_dir, schema, 64, rank=1, world_size=5)  # rank rows 76/77 -> 2 batches
    batches = list(uneven.lockstep())
    assert len(batches) == uneven.max_batches()
    assert sum(float(b.weights.sum()) for b in batches) == uneven.rank_rows(1)


def reference(rows: dict, schema: Schema, idx: list[int]) -> dict:
    """Row-by-row Python reference of the KJT contents."""
    out: dict = {}
    for f in schema.features:
        if f.kind in ("sparse", "sequence"):
            vals, lens = [], []
            for r in idx:
                v = rows[f.column][r]
                v = list(v) if isinstance(v, list) else [v]
                if f.max_len:
                    v = v[-f.max_len:]
                vals += [int(x) for x in v]
                lens.append(len(v))
            out[f.name] = (vals, lens)
    return out


def test_kjt_matches_row_by_row_reference(tmp_path, schema) -> None:  # noqa: ANN001
    rows = make_rows(90, 7)
    write(tmp_path / "a.parquet", rows)
    ds = ParquetDataset(tmp_path, schema, 32, shuffle=True, seed=5)
    for batch in ds.batches():
        idx = batch.row_index.tolist()
        ref = reference(rows, schema, idx)
        # item_id shares the item table with the history, so it travels in the sequence KJT
        assert batch.sparse.keys() == ["user_id", "tags"] and batch.sequence.keys() == ["item_id", "hist"]
        for kjt in (batch.sparse, batch.sequence):
            assert kjt.stride() == len(idx)
            for key in kjt.keys():
                assert kjt[key].values().tolist() == ref[key][0]
                assert kjt[key].lengths().tolist() == ref[key][1]
        ts = [t for r in idx for t in list(range(len(rows["hist"][r])))[-4:]]
        assert batch.side["hist/ts"].tolist() == ts
        assert torch.equal(batch.dense[:, 0], torch.tensor(rows["x"][idx]))
        assert torch.equal(batch.labels["y"], torch.tensor(rows["y"][idx]))


def bad(tmp_path, mutate) -> str:  # noqa: ANN001
    rows, types = make_rows(60, 1), {}
    mutate(rows, types)
    write(tmp_path / "bad.parquet", rows, **types)
    return str(tmp_path / "bad.parquet")


def set_(key, value, typ=None):  # noqa: ANN001, ANN202
    def mutate(rows, types):  # noqa: ANN001, ANN202
        rows[key] = value(rows) if callable(value) else value
        if typ is not None:
            types[key] = typ
    return mutate


@pytest.mark.parametrize("mutate,message", [
    (set_("user_id", lambda r: [str(v) for v in r["user_id"]], pa.string()), "column 'user_id' has Arrow type string"),
    (set_("hist", lambda r: [[1, None]] + r["hist"][1:]), "null value(s) inside its lists"),
    (set_("item_id", lambda r: [-3] + list(r["item_id"][1:])), "negative id -3"),
    (set_("item_id", lambda r: [100] + list(r["item_id"][1:])), "id 100 outside [0, 100) of table 'item'"),
    (set_("hist_ts", lambda r: [[1, 2, 3, 4, 5, 6, 7]] + r["hist_ts"][1:]), "side column 'hist_ts' does not align"),
    (set_("x", lambda r: [None] + list(r["x"][1:]), pa.float32()), "column 'x' has 1 null value(s)"),
    (set_("x", lambda r: [float("inf")] + list(r["x"][1:]), pa.float32()), "column 'x' has 1 non-finite value(s)"),
])
@pytest.mark.parametrize("validate", ["full", "schema"])
def test_bad_input_names_file_and_column(tmp_path, schema, mutate, message, validate) -> None:  # noqa: ANN001
    path = bad(tmp_path, mutate)
    with pytest.raises(DataError) as err:
        list(ParquetDataset(tmp_path, schema, 16, validate=validate).batches())
    assert message in str(err.value) and path in str(err.value)


@pytest.mark.parametrize("validate", ["full", "schema"])
def test_side_bounds_refuse_a_value_naming_column_row_and_key(tmp_path, schema, validate) -> None:  # noqa: ANN001
    """A side column read as embedding indices is range-checked per chunk by the loader (the model no
    longer checks it every step); values that max_len drops never reach the model and are not checked."""
    rows = make_rows(60, 0)
    rows["hist"][8], rows["hist_ts"][8] = [1, 2, 3, 4, 5], [99, 0, 1, 2, 3]  # 99 is cut by max_len 4
    write(tmp_path / "a.parquet", rows)
    bounds = {"hist/ts": (10, "model.params.some_bound")}
    assert len(list(ParquetDataset(tmp_path, schema, 16, validate=validate, side_bounds=bounds).batches())) == 4
    rows["hist"][41], rows["hist_ts"][41] = [1, 2], [0, 10]  # row 41: the second row group's row 4
    write(tmp_path / "a.parquet", rows)
    ParquetDataset(tmp_path, schema, 16, validate="full")  # no bounds: side values are not ids
    with pytest.raises(DataError, match=r"side column 'hist_ts' holds 10 at row \d+, outside \[0, 10\) "
                                        r"\(model\.params\.some_bound\)$") as err:
        list(ParquetDataset(tmp_path, schema, 16, validate=validate, side_bounds=bounds).batches())
    if validate == "full":  # checked on open, per row group: the message names the file and its row
        assert str(err.value).startswith(f"{tmp_path / 'a.parquet'}: ") and "at row 41," in str(err.value)


def test_batches_are_pinned_only_for_cuda() -> None:
    """Page-locked batches let the CUDA copy run asynchronously; on CPU pinning would be a wasted copy."""
    assert pin_for(torch.device("cuda", 0)) and pin_for(torch.device("cuda"))
    assert not pin_for(torch.device("cpu")) and not pin_for(torch.device("meta"))


def test_a_batch_moved_to_its_own_device_is_itself(data_dir, schema) -> None:  # noqa: ANN001
    """As `Tensor.to`: no new Batch (and KJTs) per training step on CPU; another device gets a copy."""
    batch = next(iter(ParquetDataset(data_dir, schema, 16).batches()))
    assert batch.to(torch.device("cpu")) is batch
    moved = batch.to(torch.device("meta"))
    assert moved is not batch and moved.dense.is_meta and moved.sparse.values().is_meta


def test_missing_column_corrupt_and_empty_files(tmp_path, schema, caplog) -> None:  # noqa: ANN001
    rows = make_rows(10, 0)
    del rows["x"]
    write(tmp_path / "a.parquet", rows)
    with pytest.raises(DataError, match=r"a.parquet: missing column 'x' \(feature 'x'"):
        ParquetDataset(tmp_path, schema, 4)
    (tmp_path / "a.parquet").write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(DataError, match="a.parquet: not a readable Parquet file"):
        ParquetDataset(tmp_path, schema, 4)
    write(tmp_path / "a.parquet", {k: v[:0] for k, v in make_rows(5, 0).items()})
    with pytest.raises(DataError, match="dataset is empty"):
        ParquetDataset(tmp_path, schema, 4)
    write(tmp_path / "b.parquet", make_rows(5, 0))
    with caplog.at_level(logging.WARNING):
        assert ParquetDataset(tmp_path, schema, 4).num_rows == 5
    assert "a.parquet: empty Parquet file, skipped" in caplog.text
    with pytest.raises(DataError, match="data path not found"):
        ParquetDataset(tmp_path / "nope", schema, 4)


def test_oov_policies(tmp_path) -> None:  # noqa: ANN001
    raw = dict(SCHEMA, features=[
        {"name": "user_id", "kind": "sparse", "table": "user", "oov": "hash"},
        {"name": "item_id", "kind": "sparse", "table": "item", "oov": "oov_row"}])
    schema = from_dict(Schema, raw)
    pq.write_table(pa.table({"user_id": pa.array([3, 53, 149], pa.int64()),
                             "item_id": pa.array([5, 100, 10**12], pa.int64())}), tmp_path / "a.parquet")
    (batch,) = ParquetDataset(tmp_path, schema, 8).batches()
    assert batch.sparse["user_id"].values().tolist() == [3, 3, 49]
    assert batch.sparse["item_id"].values().tolist() == [5, 100, 100]
    assert schema.table_rows("item") == 101 and schema.table_rows("user") == 50
