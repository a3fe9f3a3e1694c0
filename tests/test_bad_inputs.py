"""Bad-input matrix through the real CLIs (train, eval, score, plan, data), one process each.

Every case must end with exit code != 0, exactly one `error:` line on stderr that names the bad
key/column/file, no Python traceback, and no output marked complete (metrics.json for train/eval,
`_SUCCESS` for score, the plan file for plan, `_manifest.json` for data). The bad datasets are a few
hundred real ml-100k ranking rows corrupted with pyarrow; almost every case fails before any step.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import ROOT, run_cli
from trec_rank.config.experiment import read_config

CONFIG = ROOT / "configs" / "ml100k_base.yaml"
ROWS = {"train": 400, "valid": 200, "test": 200}


@pytest.fixture(scope="session")
def small(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """First rows of each real ranking split: root/{train,valid,test}/part-0.parquet."""
    root = tmp_path_factory.mktemp("bad-inputs-small")
    for split, n in ROWS.items():
        (root / split).mkdir()
        table = pq.read_table(ml100k_dir / "ranking" / split).slice(0, n)
        pq.write_table(table, root / split / "part-0.parquet")
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of the base config on the small data (a handful of steps)."""
    run = tmp_path_factory.mktemp("bad-inputs-ckpt")
    run_cli("train", str(CONFIG), "--run-dir", str(run), "--set", f"data.path={small}",
            "--set", "train.epochs=1", "--set", "train.max_steps=5")
    return run


# ---- corruptions of one split's file ----------------------------------------------------------------
def _set_list_row(col: pa.ChunkedArray, row: int, fn: Callable[[list], list]) -> pa.Array:
    values = col.to_pylist()
    values[row] = fn(values[row])
    return pa.array(values, type=col.type)


def _first_nonempty(table: pa.Table, col: str) -> int:
    lengths = pc.list_value_length(table[col]).to_numpy(zero_copy_only=False)
    return int((lengths > 1).argmax())


def _replace(table: pa.Table, col: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(col), col, array)


def _nulls(t: pa.Table) -> pa.Table:
    row = _first_nonempty(t, "hist_item_id")
    return _replace(t, "hist_item_id", _set_list_row(t["hist_item_id"], row, lambda v: [v[0], None, *v[2:]]))


def _negative(t: pa.Table) -> pa.Table:
    ids = t["item_id"].to_pylist()
    ids[7] = -3
    return _replace(t, "item_id", pa.array(ids, pa.int64()))


def _out_of_range(t: pa.Table) -> pa.Table:  # table `user` has 944 rows, oov policy defaults to `error`
    ids = t["user_id"].to_pylist()
    ids[11] = 5000
    return _replace(t, "user_id", pa.array(ids, pa.int64()))


def _misaligned(t: pa.Table) -> pa.Table:
    row = _first_nonempty(t, "hist_item_id")
    return _replace(t, "hist_rating", _set_list_row(t["hist_rating"], row, lambda v: v[:-1]))


CORRUPT: dict[str, Callable[[pa.Table], pa.Table]] = {
    "empty": lambda t: t.slice(0, 0),
    "missing_column": lambda t: t.drop_columns(["hist_genre"]),
    "wrong_type": lambda t: _replace(t, "user_id", pc.cast(t["user_id"], pa.string())),
    "nulls": _nulls,
    "negative": _negative,
    "out_of_range": _out_of_range,
    "misaligned": _misaligned,
}
NEEDLE = {"empty": "is empty", "missing_column": "'hist_genre'", "wrong_type": "'user_id'",
          "nulls": "'hist_item_id'", "negative": "'item_id'", "out_of_range": "'user_id'",
          "misaligned": "'hist_rating'", "corrupt": "part-0.parquet"}


def bad_data(small: Path, root: Path, split: str, kind: str) -> Path:
    """A copy of `small` whose `split` file is corrupted as `kind`."""
    shutil.copytree(small, root)
    path = root / split / "part-0.parquet"
    if kind == "corrupt":
        path.write_bytes(b"PAR1" + bytes(range(256)) * 8)  # a Parquet magic, then garbage, no footer
    else:
        pq.write_table(CORRUPT[kind](pq.read_table(path)), path)
    return root


def bad_config(tmp: Path, edit: Callable[[dict], None]) -> Path:
    data = read_config(CONFIG)  # schema file inlined: the copy is written elsewhere
    edit(data)
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fake_plan(tmp: Path) -> Path:
    """A well-formed plan file made for some other job (its fingerprint matches nothing here)."""
    path = tmp / "other-plan.json"
    path.write_text(json.dumps({"format": "trec-rank-plan", "version": 1, "fingerprint": "0123456789abcdef",
                                "inputs": {"world_size": 8, "local_world_size": 8, "device": "cuda",
                                           "tables": {}, "sharders": []}, "plan": {}}))
    return path


# ---- the matrix -------------------------------------------------------------------------------------
# A case is (id, builder, needle): builder(small, ckpt, tmp) -> (argv, the file a failed run must not leave).
def train_case(edit: Callable[[dict], None] | None = None, sets: tuple[str, ...] = (),
               corrupt: str | None = None, plan: bool = False) -> Callable:
    def build(small: Path, ckpt: Path, tmp: Path) -> tuple[list[str], Path]:
        config = bad_config(tmp, edit) if edit else CONFIG
        data = bad_data(small, tmp / "data", "train", corrupt) if corrupt else small
        extra = [a for s in sets for a in ("--set", s)] + (["--plan", str(fake_plan(tmp))] if plan else [])
        argv = ["train", str(config), "--run-dir", str(tmp / "run"), "--set", f"data.path={data}",
                "--set", "train.max_steps=2", *extra]
        return argv, tmp / "run" / "metrics.json"
    return build


def eval_case(sets: tuple[str, ...] = (), corrupt: str | None = None) -> Callable:
    def build(small: Path, ckpt: Path, tmp: Path) -> tuple[list[str], Path]:
        data = bad_data(small, tmp / "data", "valid", corrupt) if corrupt else small
        argv = ["eval", str(CONFIG), "--checkpoint", str(ckpt), "--run-dir", str(tmp / "ev"), "--splits", "valid",
                "--set", f"data.path={data}", *[a for s in sets for a in ("--set", s)]]
        return argv, tmp / "ev" / "metrics.json"
    return build


def score_case(sets: tuple[str, ...] = (), corrupt: str | None = None, extra: tuple[str, ...] = (),
               input_path: str | None = None) -> Callable:
    def build(small: Path, ckpt: Path, tmp: Path) -> tuple[list[str], Path]:
        data = bad_data(small, tmp / "data", "test", corrupt) / "test" if corrupt else small / "test"
        plan = [str(fake_plan(tmp)) if a == "PLAN" else a for a in extra]
        argv = ["score", str(CONFIG), "--checkpoint", str(ckpt), "--input", input_path or str(data),
                "--output", str(tmp / "out"), *plan, *[a for s in sets for a in ("--set", s)]]
        return argv, tmp / "out" / "_SUCCESS"
    return build


def plan_case(edit: Callable[[dict], None] | None = None, sets: tuple[str, ...] = ()) -> Callable:
    def build(small: Path, ckpt: Path, tmp: Path) -> tuple[list[str], Path]:
        config = bad_config(tmp, edit) if edit else CONFIG
        argv = ["plan", str(config), "--world-size", "2", "--device", "cpu", "--out", str(tmp / "plan.json"),
                *[a for s in sets for a in ("--set", s)]]
        return argv, tmp / "plan.json"
    return build


def data_case(kind: str) -> Callable:
    def build(small: Path, ckpt: Path, tmp: Path) -> tuple[list[str], Path]:
        out = tmp / "prepared"
        if kind == "missing_source":
            return ["data", "ml-100k", "--out", str(out), "--source", str(tmp / "nowhere" / "u.data")], \
                out / "_manifest.json"
        if kind == "garbage_ratings":
            src = tmp / "src"
            src.mkdir()
            (src / "u.data").write_text("1\t10\t4\t881250949\n2\t20\tfive\t881250950\n3\t30\t1\n")
            return ["data", "ml-100k", "--out", str(out), "--source", str(src / "u.data")], out / "_manifest.json"
        config = bad_config(tmp, lambda d: d["schema"]["tables"][0].update(num_rows=5))
        return ["data", "synthetic", "--schema", str(config), "--rows", "100", "--out", str(out)], \
            out / "_manifest.json"
    return build


def _edit(section: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda d: d.setdefault(section, {}).update({key: value})


CASES: list[tuple[str, Callable, str]] = [
    # train: config file, --set, data, plan
    ("train-unknown-key-file", train_case(edit=_edit("train", "epochz", 2)), "train.epochz"),
    ("train-wrong-type-file", train_case(edit=_edit("data", "batch_size", "big")), "data.batch_size"),
    ("train-unknown-key-set", train_case(sets=("train.optim.lr=0.1",)), "train.optim.lr"),
    ("train-wrong-type-set", train_case(sets=("train.max_steps=ten",)), "train.max_steps"),
    ("train-wrong-value-set", train_case(sets=("data.batch_size=0",)), "data.batch_size"),
    ("train-missing-data", train_case(sets=("data.path=/nonexistent/trec-rank-data",)), "/nonexistent/trec-rank-data"),
    *[(f"train-{kind.replace('_', '-')}", train_case(corrupt=kind), NEEDLE[kind])
      for kind in ("empty", "corrupt", "missing_column", "wrong_type", "nulls", "negative", "out_of_range",
                   "misaligned")],
    ("train-plan-fingerprint", train_case(plan=True), "other-plan.json"),
    *[(f"train-task-name-{tag}", train_case(edit=lambda d, n=name: d["schema"]["features"][-1].update(
        name=n, column="like")), name) for tag, name in (("dot", "like.v2"), ("path", "../evil"))],
    # eval: another schema's checkpoint, bad --set, bad data in the evaluated split
    ("eval-other-schema", eval_case(sets=("model.params.hidden=[64]",)), "another schema"),
    ("eval-nulls", eval_case(corrupt="nulls"), NEEDLE["nulls"]),
    ("eval-corrupt", eval_case(corrupt="corrupt"), NEEDLE["corrupt"]),
    # score
    ("score-other-schema", score_case(sets=("model.params.hidden=[64]",)), "--checkpoint"),
    ("score-plan-fingerprint", score_case(extra=("--sharded", "--plan", "PLAN")), "other-plan.json"),
    ("score-plan-implies-sharded", score_case(extra=("--plan", "PLAN")), "other-plan.json"),
    ("score-missing-input", score_case(input_path="/nonexistent/trec-rank-input"), "/nonexistent/trec-rank-input"),
    *[(f"score-{kind.replace('_', '-')}", score_case(corrupt=kind), NEEDLE[kind])
      for kind in ("corrupt", "wrong_type", "out_of_range", "misaligned")],
    # plan
    ("plan-unknown-key-file", plan_case(edit=_edit("sharding", "hbm", 80)), "sharding.hbm"),
    ("plan-wrong-value-set", plan_case(sets=("schema.tables.0.num_embeddings=0",)), "num_embeddings"),
    # data
    ("data-missing-source", data_case("missing_source"), "nowhere"),
    ("data-garbage-ratings", data_case("garbage_ratings"), "u.data"),
    ("data-synthetic-bad-schema", data_case("bad_schema"), "num_rows"),
]
@pytest.fixture(scope="session")
def outcomes(small: Path, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Every case's (argv, CompletedProcess, marker, tmp dir), two CLI processes at a time: each case is
    mostly interpreter and torch start-up, so the 2-core machine runs the matrix in half the wall time."""
    built = {}
    for case, build, _ in CASES:
        tmp = tmp_path_factory.mktemp(f"bad-{case}")
        argv, marker = build(small, tiny_ckpt, tmp)
        built[case] = (argv, marker, tmp)
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = {case: pool.submit(run_cli, *argv, check=False, timeout=300) for case, (argv, _, _) in built.items()}
        return {case: (argv, procs[case].result(), marker, tmp) for case, (argv, marker, tmp) in built.items()}


@pytest.mark.parametrize("case,needle", [pytest.param(c, n, id=c) for c, _, n in CASES])
def test_bad_input_fails_cleanly(case: str, needle: str, outcomes: dict[str, tuple]) -> None:
    argv, proc, complete_marker, tmp = outcomes[case]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    report = f"{' '.join(argv)}\nexit {proc.returncode}\n--- stderr\n{proc.stderr[-3000:]}"
    assert proc.returncode != 0, report
    assert len(errors) == 1, report
    assert needle in errors[0], report
    assert "Traceback" not in proc.stderr, report
    assert not complete_marker.exists(), f"{complete_marker} written by a failed run"
    if argv[0] == "plan":
        assert not list(tmp.glob("plan.json*")), "a partial plan file was left"
