"""Your own Parquet: string and large int ids under `oov: hash`, 0/1 labels, split folders read exactly,
`score --output` kept out of `--input`, `data describe`, and the help texts a new user reads first."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import ROOT
from trec_rank.cli import main, parser
from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.schema import Schema
from trec_rank.config.typed import from_dict
from trec_rank.data.convert import DataError, apply_oov_policy
from trec_rank.data.dataset import ParquetDataset
from trec_rank.data.describe import describe

TABLES = [{"name": "user", "num_embeddings": 1000, "embedding_dim": 4},
          {"name": "item", "num_embeddings": 50, "embedding_dim": 4}]


def _schema(*features: dict) -> Schema:
    return from_dict(Schema, {"tables": TABLES, "features": [*features, {"name": "y", "kind": "label"}]})


def _blake_row(s: str, n: int) -> int:
    """The documented mapping, written out from the standard: BLAKE2b, 8-byte digest, little-endian, mod n."""
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") % n


def test_string_ids_hash_to_the_documented_rows(tmp_path) -> None:  # noqa: ANN001
    schema = _schema({"name": "user_id", "kind": "sparse", "table": "user", "oov": "hash"},
                     {"name": "hist", "kind": "sequence", "table": "item", "max_len": 2, "oov": "hash"})
    users = ["u_8812", "u_1", "u_8812", "ü_ñ"]
    hist = [["a", "b", "c"], [], ["b"], ["c", "a"]]
    pq.write_table(pa.table({"user_id": users, "hist": pa.array(hist, pa.list_(pa.string())),
                             "y": pa.array([0, 1, 0, 1], pa.float32())}), tmp_path / "a.parquet")
    (batch,) = ParquetDataset(tmp_path, schema, 8).batches()
    assert batch.sparse["user_id"].values().tolist() == [_blake_row(u, 1000) for u in users]
    kept = [h[-2:] for h in hist]  # the last max_len ids, as for integer histories
    assert batch.sequence["hist"].values().tolist() == [_blake_row(s, 50) for h in kept for s in h]
    assert batch.sequence["hist"].lengths().tolist() == [2, 0, 1, 2]
    # the id counter of the DIN L2 (models/frequency.py) hands over Arrow value_counts keys as strings
    f = schema.feature("user_id")
    assert apply_oov_policy(np.array(users, dtype=object), f, 1000, "x").tolist() == \
        batch.sparse["user_id"].values().tolist()


def test_string_hash_is_the_same_in_another_process() -> None:
    """Python's own hash() differs per process (PYTHONHASHSEED); ours must not."""
    code = ("import numpy as np; from trec_rank.config.schema import FeatureConfig; "
            "from trec_rank.data.convert import apply_oov_policy; "
            "f = FeatureConfig(name='u', kind='sparse', table='t', oov='hash'); "
            "print(apply_oov_policy(np.array(['u_8812', 'x'], dtype=object), f, 1000, 'w').tolist())")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {f"{[_blake_row('u_8812', 1000), _blake_row('x', 1000)]}\n"}


def test_large_negative_and_unsigned_ids_hash_into_range(tmp_path) -> None:  # noqa: ANN001
    schema = _schema({"name": "user_id", "kind": "sparse", "table": "user", "oov": "hash"},
                     {"name": "dev", "kind": "sparse", "table": "item", "oov": "hash"})
    big = [2**62 + 7, -(2**62) - 3, 5, -1]
    dev = [2**64 - 1, 2**63, 49, 50]
    pq.write_table(pa.table({"user_id": pa.array(big, pa.int64()), "dev": pa.array(dev, pa.uint64()),
                             "y": pa.array([0, 1, 0, 1], pa.float32())}), tmp_path / "a.parquet")
    (batch,) = ParquetDataset(tmp_path, schema, 8).batches()
    assert batch.sparse["user_id"].values().tolist() == [v % 1000 for v in big]  # Python's % is non-negative
    assert batch.sparse["dev"].values().tolist() == [v % 50 for v in dev]


@pytest.mark.parametrize("oov", ["error", "oov_row"])
def test_string_ids_need_hash_and_negatives_need_hash(tmp_path, oov) -> None:  # noqa: ANN001
    schema = _schema({"name": "user_id", "kind": "sparse", "table": "user", "oov": oov})
    pq.write_table(pa.table({"user_id": ["a"], "y": pa.array([1.0], pa.float32())}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"'user_id' has Arrow type string, expected .*oov: hash"):
        ParquetDataset(tmp_path, schema, 8)
    pq.write_table(pa.table({"user_id": pa.array([-4], pa.int64()), "y": pa.array([1.0], pa.float32())}),
                   tmp_path / "a.parquet")
    with pytest.raises(DataError, match="negative id -4"):
        ParquetDataset(tmp_path, schema, 8)


@pytest.mark.parametrize("validate", ["full", "schema"])
def test_label_outside_0_1_names_file_column_and_row(tmp_path, validate) -> None:  # noqa: ANN001
    schema = _schema({"name": "user_id", "kind": "sparse", "table": "user"})
    y = np.zeros(50, dtype=np.float32)
    y[37] = 4.0  # second row group (rows 30..49 of the file): the row is counted in the file
    pq.write_table(pa.table({"user_id": pa.array(np.arange(50), pa.int64()), "y": y}), tmp_path / "r.parquet",
                   row_group_size=30)
    with pytest.raises(DataError) as err:
        list(ParquetDataset(tmp_path, schema, 8, validate=validate).batches())
    msg = str(err.value)
    assert str(tmp_path / "r.parquet") in msg and "label column 'y' holds 4 at row 37" in msg, msg
    y[37] = 1.0  # 0/1 in float, int and bool columns all pass
    for values in (y, y.astype(np.int64), y.astype(bool)):
        pq.write_table(pa.table({"user_id": pa.array(np.arange(50), pa.int64()), "y": values}), tmp_path / "r.parquet")
        assert sum(b.batch_size for b in ParquetDataset(tmp_path, schema, 8, validate=validate).batches()) == 50


def test_subfolder_of_a_split_is_refused_not_read(tmp_path) -> None:  # noqa: ANN001
    schema = _schema({"name": "user_id", "kind": "sparse", "table": "user"})
    table = pa.table({"user_id": pa.array(np.arange(10), pa.int64()), "y": np.zeros(10, dtype=np.float32)})
    (tmp_path / "train" / "backup").mkdir(parents=True)
    pq.write_table(table, tmp_path / "train" / "part-0.parquet")
    pq.write_table(table, tmp_path / "train" / "backup" / "part-0.parquet")
    with pytest.raises(DataError, match=r"train: subfolder\(s\) backup/ hold Parquet files"):
        ParquetDataset(tmp_path / "train", schema, 4)
    (tmp_path / "train" / "backup").rename(tmp_path / "train" / "_backup")  # '_' names are never read
    assert ParquetDataset(tmp_path / "train", schema, 4).num_rows == 10


def test_score_output_inside_input_is_refused(tmp_path, capsys) -> None:  # noqa: ANN001
    split = tmp_path / "test"
    split.mkdir()
    pq.write_table(pa.table({"x": [1]}), split / "part-0.parquet")
    for out in (split, split / "scores"):
        code = main(["score", str(ROOT / "configs/ml100k_base.yaml"), "--checkpoint", str(tmp_path / "ck"),
                     "--input", str(split), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "--input" in err and "choose an output directory outside the input" in err, err
    assert sorted(p.name for p in split.iterdir()) == ["part-0.parquet"]


def _own_table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 200, n), rng.integers(0, 300, n)
    return pa.table({
        "user_id": [f"u_{u}" for u in users], "item_id": [f"i_{i}" for i in items],
        "device": pa.array(rng.choice(np.random.default_rng(99).integers(2**40, 2**62, 40), n), pa.int64()),
        "country": pa.array(rng.integers(0, 12, n), pa.int64()),
        "hist_item_id": pa.array([[f"i_{i}" for i in rng.integers(0, 300, rng.integers(0, 21))] for _ in range(n)],
                                 pa.list_(pa.string())),
        "price": rng.lognormal(0, 0.5, n).astype(np.float32),
        "event_ts": pa.array(1_700_000_000 + rng.permutation(n), pa.int64()),
        "click": (((users % 3 == 0) | (items % 4 == 0)) ^ (rng.random(n) < 0.1)).astype(np.float32),
    })


def write_own_data(root, rows: dict[str, int]) -> None:  # noqa: ANN001
    """root/<split>/part-0.parquet of a table with string, large-int, list<string>, float and 0/1 columns."""
    for seed, (split, n) in enumerate(rows.items()):
        (root / split).mkdir(parents=True)
        pq.write_table(_own_table(n, seed), root / split / "part-0.parquet")


def test_describe_writes_a_config_that_loads(tmp_path) -> None:  # noqa: ANN001
    write_own_data(tmp_path / "mine", {"train": 3000, "valid": 500, "test": 500})
    text = describe(tmp_path / "mine")
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    cfg = from_dict(ExperimentConfig, yaml.safe_load(text))
    assert isinstance(cfg, ExperimentConfig) and path.read_text() == text
    lengths = pc.list_value_length(pq.read_table(tmp_path / "mine")["hist_item_id"]).to_numpy()
    p95 = int(np.ceil(np.percentile(lengths, 95)))  # the documented rule, over all splits
    kinds = {f.name: (f.kind, f.table, f.oov, f.max_len) for f in cfg.schema.features}
    assert kinds == {"user_id": ("sparse", "user", "hash", 0), "item_id": ("sparse", "item", "hash", 0),
                     "device": ("sparse", "device", "hash", 0), "country": ("sparse", "country", "error", 0),
                     "hist_item_id": ("sequence", "item", "hash", p95), "price": ("dense", "", "error", 0),
                     "click": ("label", "", "error", 0)}
    rows = {t.name: t.num_embeddings for t in cfg.schema.tables}
    assert rows == {"user": 2000, "item": 3000, "device": 400, "country": 12}  # 10x distinct; max + 1
    assert (cfg.data.train_split, cfg.data.eval_splits, cfg.data.group_by) == ("train", ["valid", "test"], "user_id")
    assert "# skipped event_ts:" in text and "~9.5% of the ids share a row" in text


def test_help_texts_say_what_the_code_does(capsys) -> None:  # noqa: ANN001
    helps = {}
    for cmd in ("score", "eval"):
        with pytest.raises(SystemExit):
            parser().parse_args([cmd, "--help"])
        helps[cmd] = " ".join(capsys.readouterr().out.split())
    assert "up to 8,192 rows), at least one window" in helps["score"]
    assert "train." not in helps["eval"] and "--set data.eval_batch_size=4096" in helps["eval"]
    assert main(["data", "ml-1m", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--source PATH" in err and "source=" not in err, err


def test_own_parquet_end_to_end(tmp_path) -> None:  # noqa: ANN001
    """README's "train on your own Parquet", as written: describe -> (edit) -> train -> score -> report."""
    from tests.helpers import run_cli

    write_own_data(tmp_path / "mine", {"train": 4000, "valid": 800, "test": 800})
    config, run, scores = tmp_path / "mine.yaml", tmp_path / "runs" / "mine", tmp_path / "scores"
    run_cli("data", "describe", str(tmp_path / "mine"), "--out", str(config))
    run_cli("train", str(config), "--run-dir", str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["click/auc"] > 0.8  # the planted user/item signal is learned through hashed ids
    run_cli("score", str(config), "--checkpoint", str(run), "--input", str(tmp_path / "mine" / "test"),
            "--output", str(scores), "--passthrough", "user_id")
    out = pq.read_table(scores)
    assert out.num_rows == 800 and out["user_id"].to_pylist() == _own_table(800, 2)["user_id"].to_pylist()
    proc = run_cli("report", str(run), "--out", str(tmp_path / "report.png"))
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # train/loss and 6 metrics x 2 splits, from describe's log_every/eval_every (several points per curve)
    assert proc.stdout.rstrip().endswith("(13 panels)"), proc.stdout
    assert len((run / "metrics_history.jsonl").read_text().splitlines()) >= 4
    row = next(line.split() for line in proc.stdout.splitlines() if line.startswith("test/click/auc"))
    assert row == ["test/click/auc", f"{metrics['test']['click/auc']:.4f}"], proc.stdout


def test_report_keeps_the_last_value_of_a_repeated_step(tmp_path, capsys) -> None:  # noqa: ANN001
    """A resumed run repeats the steps after its last checkpoint, in the history and in a second events file."""
    from torch.utils.tensorboard import SummaryWriter

    from trec_rank.report import _history, _train_loss

    run = tmp_path / "resumed"
    run.mkdir()
    lines = [{"step": 10, "valid": {"y/auc": 0.60}}, {"step": 20, "valid": {"y/auc": 0.61}},
             {"step": 20, "valid": {"y/auc": 0.65}}, {"epoch": 1, "step": 30, "valid": {"y/auc": 0.70}}]
    (run / "metrics_history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    for losses in ({5: 0.9, 10: 0.8}, {10: 0.7, 15: 0.6}):  # two invocations, two events files
        writer = SummaryWriter(str(run / "tb"))
        for step, value in losses.items():
            writer.add_scalar("train/loss", value, step)
        writer.close()
    assert _history(run) == {"valid/y/auc": {10: 0.60, 20: 0.65, 30: 0.70}}
    assert _train_loss(run) == pytest.approx({5: 0.9, 10: 0.7, 15: 0.6})
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "resumed: last evaluation (no metrics.json yet)" in out and "valid/y/auc" in out and "0.7000" in out
    (run / "metrics_history.jsonl").write_text("not json\n")
    assert main(["report", str(run)]) == 2
    assert "metrics_history.jsonl, line 1: not a metrics history entry" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["label_4", "nested_backup"])
def test_train_refuses_bad_splits_in_one_line(case: str, ml100k_dir, tmp_path) -> None:  # noqa: ANN001
    """Through the real CLI: one `error:` line naming the file/folder, exit 2, no metrics.json."""
    from tests.helpers import run_cli

    for split in ("train", "valid", "test"):
        (tmp_path / split).mkdir()
        table = pq.read_table(ml100k_dir / "ranking" / split).slice(0, 300)
        if split == "train" and case == "label_4":
            like = table["like"].to_numpy().copy()
            like[123] = 4.0
            table = table.set_column(table.schema.get_field_index("like"), "like", pa.array(like, pa.float32()))
        pq.write_table(table, tmp_path / split / "part-0.parquet", row_group_size=100)
    if case == "nested_backup":
        backup = tmp_path / "train" / "backup"
        backup.mkdir()
        (backup / "part-0.parquet").write_bytes((tmp_path / "train" / "part-0.parquet").read_bytes())
    proc = run_cli("train", "configs/ml100k_base.yaml", "--run-dir", str(tmp_path / "run"), "--set",
                   f"data.path={tmp_path}", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    expected = {"label_4": f"{tmp_path}/train/part-0.parquet: label column 'like' holds 4 at row 123",
                "nested_backup": f"{tmp_path}/train: subfolder(s) backup/ hold Parquet files"}[case]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.json").exists()
