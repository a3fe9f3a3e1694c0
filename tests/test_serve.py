"""`trec-rank serve`: request rows convert exactly as training reads Parquet, bad rows get a message naming the
row and field, the micro-batcher merges and splits requests, and README's train -> export -> serve -> curl
runs end to end against a real server process whose scores equal `trec-rank score`'s."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.serve import free_port, request, server
from tests.helpers import ROOT, run_cli
from tests.test_own_data import write_own_data
from trec_rank.cli import main
from trec_rank.config.experiment import ExperimentConfig, load_config
from trec_rank.config.models import side_bounds
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset
from trec_rank.data.describe import describe
from trec_rank.data.prepare.synthetic import prepare_synthetic
from trec_rank.export.contract import Contract
from trec_rank.serve.batcher import MicroBatcher
from trec_rank.serve.rows import RequestError, RowConverter


def _din_data(tmp_path: Path, rows: int = 300) -> tuple[ExperimentConfig, Path]:
    """Synthetic rows of the ml-100k schema (histories with rating/timestamp side columns) and the DIN config,
    whose attention reads the rating as an embedding index (a side bound)."""
    cfg = load_config(ROOT / "configs/ml100k_din.yaml", [f"data.path={tmp_path}"])
    prepare_synthetic(cfg.schema, rows, tmp_path)
    return cfg, tmp_path / "train"


def _own_data(tmp_path: Path) -> tuple[ExperimentConfig, Path]:
    """String ids, large int ids and a list<string> history under `oov: hash` (describe's config)."""
    write_own_data(tmp_path / "mine", {"train": 300, "valid": 50, "test": 50})
    (tmp_path / "mine.yaml").write_text(describe(tmp_path / "mine"))
    return load_config(tmp_path / "mine.yaml"), tmp_path / "mine" / "test"


def _assert_same(a: Batch, b: Batch) -> None:
    torch.testing.assert_close(a.dense, b.dense, rtol=0, atol=0)
    for x, y in ((a.sparse, b.sparse), (a.sequence, b.sequence)):
        assert x.keys() == y.keys()
        assert torch.equal(x.values(), y.values()) and torch.equal(x.lengths(), y.lengths())
    assert a.side.keys() == b.side.keys() and all(torch.equal(a.side[k], b.side[k]) for k in a.side)


@pytest.mark.parametrize("data", ["din", "own"])
def test_request_rows_become_the_batch_training_reads(data: str, tmp_path: Path) -> None:
    cfg, split = (_din_data if data == "din" else _own_data)(tmp_path)
    table = pq.read_table(split)
    rows = table.to_pylist()  # JSON-like: every column of the file, labels and unread columns included
    fields = {f.column for f in cfg.schema.features} | {c for f in cfg.schema.features for c in f.side.values()}
    rows = [{k: v for k, v in r.items() if k in fields} for r in rows]
    conv = RowConverter(cfg, max_rows=len(rows))
    got = conv.batch(conv.table(rows))
    (want,) = ParquetDataset(split, cfg.schema, len(rows), with_labels=False,
                             side_bounds=side_bounds(cfg.model.typed_params)).batches()
    _assert_same(got, want)
    if data == "din":  # a single id sent as a one-element list is the same row
        listed = [{**r, "item_id": [r["item_id"]]} for r in rows]
        _assert_same(conv.batch(conv.table(listed)), want)


def _bad(rows: list[dict], conv: RowConverter) -> str:
    with pytest.raises(RequestError) as err:
        conv.batch(conv.table(rows))
    return str(err.value)


def test_bad_rows_are_named_by_row_and_field(tmp_path: Path) -> None:
    cfg, split = _din_data(tmp_path)
    fields = {f.column for f in cfg.schema.features if f.kind != "label"} | {"hist_rating", "hist_ts"}
    good = [{k: v for k, v in r.items() if k in fields} for r in pq.read_table(split).slice(0, 6).to_pylist()]
    conv = RowConverter(cfg, max_rows=5)

    def at(row: int, **change: object) -> list[dict]:
        rows = [dict(r) for r in good[:5]]
        rows[row].update(change)
        for k, v in change.items():
            if v is KeyError:
                del rows[row][k]
        return rows

    cases = {
        "row 3: missing field 'item_id'": at(3, item_id=KeyError),
        "row 2: unknown field 'itme_id'": at(2, itme_id=4),
        "row 1: field 'hist_len_log': expected a number, got string 'x'": at(1, hist_len_log="x"),
        "row 4: field 'user_id': expected an id or a list of integer ids, got null": at(4, user_id=None),
        "row 2: field 'gender': expected an id or a list of integer ids, got boolean": at(2, gender=True),
        "row 0: field 'item_id': expected an id or a list of integer ids, got number 3.5": at(0, item_id=3.5),
        "row 1: field 'item_id': expected an id or a list of integer ids, got string 'i_9' (string ids need "
        "`oov: hash` on feature 'item_id', whose policy is 'error')": at(1, item_id="i_9"),
        "row 3: field 'hist_item_id': expected a list of integer ids, got integer 7": at(3, hist_item_id=7),
        "row 0: field 'hist_item_id': expected a list of integer ids, got a list of strings ['i_1'] (string ids "
        "need `oov: hash`": at(0, hist_item_id=["i_1"], hist_rating=[1], hist_ts=[1]),
        "row 1: field 'pos_item_id': expected a list of integer ids, got a list of lists [[1]]":
            at(1, pos_item_id=[[1]]),
        "row 2: field 'hist_genre': expected a list of integer ids, got object {'a': 1}": at(2, hist_genre={"a": 1}),
        "row 1: field 'hist_genre': expected a list of integer ids, got a null inside the list":
            at(1, hist_genre=[1, None]),
        "row 4: field 'user_id': expected an id or a list of integer ids, got 36893488147419103232":
            at(4, user_id=2**65),
        # the training checks, through to_batch: the oov policy, side alignment and side bounds
        "row 3: column 'item_id' has id 1683 outside [0, 1683) of table 'item'": at(3, item_id=1683),
        "row 2: column 'user_id' has negative id -1": at(2, user_id=-1),
        "row 1: side column 'hist_rating' does not align with 'hist_item_id' at row 1":
            at(1, hist_item_id=[1, 2], hist_rating=[4], hist_ts=[1, 2]),
        "row 4: side column 'hist_rating' holds 9 at row 4, outside [0, 6)":
            at(4, hist_item_id=[1, 2], hist_rating=[4, 9], hist_ts=[1, 2]),
        "row 1: column 'hist_len_log' has 1 non-finite value(s)": at(1, hist_len_log=math.inf),
        "rows: 6 rows, more than this server takes per request (5, --max-batch-rows)": good,
        "rows: the list is empty": [],
    }
    for want, rows in cases.items():
        got = _bad(rows, conv)
        assert got.startswith(want), f"\nwant {want}\ngot  {got}"
    assert conv.batch(conv.table(good[:5])).batch_size == 5  # nothing above left a trace


def test_rows_the_model_cannot_read_are_refused_by_row(tmp_path: Path) -> None:
    """The artifact's contract: DIN's parallel histories equally long, an HSTU target one id per row."""
    cfg, split = _din_data(tmp_path)
    fields = {f.column for f in cfg.schema.features if f.kind != "label"} | {"hist_rating", "hist_ts"}
    rows = [{k: v for k, v in r.items() if k in fields} for r in pq.read_table(split).slice(0, 3).to_pylist()]
    for r in rows:
        r["hist_genre"] = [i % 20 for i in r["hist_item_id"]]
    aligned = Contract.from_config(cfg).aligned  # what `trec-rank export` writes into artifact.json for DIN
    assert aligned == [["hist_item_id", "hist_genre"]]
    conv = RowConverter(cfg, max_rows=8, aligned=aligned, single=["item_id"])  # single: as for an HSTU target
    assert conv.batch(conv.table(rows)).batch_size == 3
    rows[2]["hist_item_id"] = rows[2]["hist_rating"] = rows[2]["hist_ts"] = [1, 2, 3]
    rows[2]["hist_genre"] = [5, 6]
    assert _bad(rows, conv) == ("row 2: fields 'hist_item_id', 'hist_genre' hold 3, 2 ids (after "
                                "max_len); the model reads them as parallel lists, so they must be equally long")
    rows[2]["hist_genre"] = [5, 6, 7]
    rows[1]["item_id"] = [3, 4]
    assert _bad(rows, conv) == "row 1: field 'item_id' holds 2 ids; the model reads exactly one (its target)"


def test_ids_of_one_field_are_all_integers_or_all_strings(tmp_path: Path) -> None:
    cfg, split = _own_data(tmp_path)
    rows = pq.read_table(split).slice(0, 3).drop_columns(["click", "event_ts"]).to_pylist()
    rows[2]["user_id"] = 17
    rows[1]["hist_item_id"] = []  # an empty list has no element type: it fits either
    conv = RowConverter(cfg, max_rows=8)
    assert _bad(rows, conv).startswith("row 2: field 'user_id': holds integer ids where row 0 holds string ids")
    rows[2]["user_id"] = "17"
    assert conv.table(rows).schema.field("hist_item_id").type == pa.list_(pa.string())


def test_batcher_merges_waiting_requests_up_to_max_rows() -> None:
    """Requests queued while the worker was busy share a model call, never beyond max_rows; a failing call
    fails only its own requests and the worker keeps serving."""
    calls: list[list[int]] = []

    def score(tables: list[pa.Table]) -> list[object]:
        calls.append([t.num_rows for t in tables])
        if any(t.num_rows == 6 for t in tables):
            raise RuntimeError("model failed")
        return [sum(t.column("x").to_pylist()) for t in tables]

    async def main() -> list[object]:
        batcher = MicroBatcher(score, max_rows=10, max_wait_s=0.05)
        sizes = [3, 4, 5, 2, 6, 1]
        tasks = [asyncio.ensure_future(batcher.submit(pa.table({"x": np.arange(n)}))) for n in sizes]
        await asyncio.sleep(0)  # every request is queued before the worker starts
        worker = asyncio.ensure_future(batcher.run())
        results = await asyncio.gather(*tasks, return_exceptions=True)
        late = await batcher.submit(pa.table({"x": [5, 6]}))  # alone: waits max_wait_s, then runs
        worker.cancel()
        batcher.close()
        assert (batcher.counters.requests, batcher.counters.batches, batcher.counters.rows) == (7, 4, 23)
        return [*results, late]

    results = asyncio.run(main())
    assert calls == [[3, 4], [5, 2], [6, 1], [2]]
    assert results[:4] == [3, 6, 10, 1] and results[6] == 11
    assert all(isinstance(r, RuntimeError) for r in results[4:6])


def _readme_row() -> dict:
    """The row README's "Serving" section sends with curl (so the example cannot go stale)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Serving"):]
    body = re.search(r"-d '(\{.*?\})'", section, re.S)
    assert body, "README's Serving section has no curl -d '{...}'"
    (row,) = json.loads(body.group(1))["rows"]
    return row


def test_cli_refuses_bad_flags_and_dirs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be at most 65535, got 70000" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", str(free_port())]) == 2
    assert f"{tmp_path / 'artifact.json'}: not found" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    assert f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use" in capsys.readouterr().err


def test_readme_train_export_serve_curl(tmp_path: Path) -> None:
    """README's Serving steps on generated files, a real server process and real HTTP: the scores equal
    `trec-rank score`'s p_click; concurrent clients get their own rows back; a barrage of bad requests gets
    400s naming row and field, after which the server still answers correctly."""
    write_own_data(tmp_path / "mine", {"train": 1000, "valid": 200, "test": 200})
    config, run, art = tmp_path / "mine.yaml", tmp_path / "runs" / "mine", tmp_path / "artifacts" / "mine"
    config.write_text(describe(tmp_path / "mine"))
    run_cli("train", str(config), "--run-dir", str(run))
    run_cli("export", str(config), "--checkpoint", str(run), "--out", str(art))
    test = tmp_path / "mine" / "test"
    run_cli("score", str(config), "--checkpoint", str(run), "--input", str(test), "--output", str(tmp_path / "s"))
    want = pq.read_table(tmp_path / "s").sort_by("row_index")["p_click"].to_numpy()
    rows = pq.read_table(test).drop_columns(["event_ts"]).to_pylist()  # the label `click` comes along, unused
    with server(art, "--max-wait-ms", "200") as port:
        status, meta = request(port, "GET", "/metadata")
        assert status == 200 and meta == json.loads((art / "artifact.json").read_text())
        status, reply = request(port, "POST", "/predict", json.dumps({"rows": [_readme_row()]}).encode())
        assert status == 200 and list(reply["scores"]) == ["click"] and 0 < reply["scores"]["click"][0] < 1

        def post(lo: int, hi: int) -> list[float]:
            status, reply = request(port, "POST", "/predict", json.dumps({"rows": rows[lo:hi]}).encode())
            assert status == 200, reply
            return reply["scores"]["click"]

        cuts = [0, 1, 33, 40, 97, 150, 151, 200]  # 7 clients at once, 1 to 57 rows each
        with ThreadPoolExecutor(len(cuts) - 1) as pool:
            got = np.concatenate(list(pool.map(post, cuts[:-1], cuts[1:])))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

        good = rows[0]
        bad = {  # body -> what the 400 must say
            b"": "body: Invalid JSON", b"\xff\xfe{": "body: Invalid JSON", b"[" * 10000: "body: Invalid JSON",
            b'{"rows": 3}': "rows: Input should be a valid", b'{"rows": [7]}': "row 0: Input should be",
            json.dumps({"rows": [good, {**good, "country": 12}]}).encode():
                "row 1: column 'country' has id 12 outside [0, 12)",
            json.dumps({"rows": [good, good, {k: v for k, v in good.items() if k != "price"}]}).encode():
                "row 2: missing field 'price'",
            json.dumps({"rows": [{**good, "hist_item_id": "i_7"}]}).encode(): "row 0: field 'hist_item_id'",
            json.dumps({"rows": [good] * 4097}).encode(): "rows: 4097 rows, more than",
        }
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda b: request(port, "POST", "/predict", b), list(bad) * 3))
        for (status, reply), message in zip(replies, list(bad.values()) * 3, strict=True):
            assert status == 400 and reply["error"].startswith(message), (message, reply)
        assert post(0, 200) == pytest.approx(want.tolist(), abs=1e-5)
        status, health = request(port, "GET", "/health")
        assert status == 200 and health["rows"] >= 400 and health["batches"] < health["requests"]


def test_connections_do_not_wait_for_delayed_acks() -> None:
    """Bug: replies waited ~40 ms each (Nagle against the client's delayed ACK) because asyncio sets
    TCP_NODELAY only on sockets created with proto IPPROTO_TCP. The listener sets it, and accepted
    connections inherit it."""
    import socket

    from trec_rank.serve.cli import _listen

    listener = _listen("127.0.0.1", 0)
    try:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        conn.close()
        client.close()
    finally:
        listener.close()
