"""Shared by benchmarks/peers.py and benchmarks/vocab_sweep.py: export rows for the peers, run one
system in its own subprocess, and read back what it measured.

Every system runs in a fresh interpreter (trec-rank in the project venv through its CLI under
step_clock.py, each peer in .venv-peers through peer_models.py), so no library's threads, caches or
allocator state carry over into another's measurement, and each one's peak RSS is its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from trec_cli import run, train

ROOT = Path(__file__).resolve().parents[1]
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
HERE = Path(__file__).resolve().parent
MAX_LEN = 50
TREC = "trec-rank"
TREC_L2OFF = "trec-rank-l2off"
TREC_COMPILED = "trec-rank-compiled"
TRECS = {TREC: [], TREC_L2OFF: ["model.params.encoder.l2.weight=0"],  # system -> extra --set overrides
         TREC_COMPILED: ["train.compile=true"]}
PEERS = ("deepctr", "rechub")
LABELS = {"deepctr": "DeepCTR-Torch 0.3.0", "rechub": "torch-rechub 0.9.0", TREC: TREC,
          TREC_L2OFF: "trec-rank L2 off", TREC_COMPILED: "trec-rank compiled"}


def schema_of(config: Path) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    """(table -> rows, feature -> table for id features, feature -> kind) from a trec-rank config."""
    schema = yaml.safe_load(config.read_text())["schema"]
    tables = {t["name"]: t["num_embeddings"] for t in schema["tables"]}
    return (tables, {f["name"]: f["table"] for f in schema["features"] if "table" in f},
            {f["name"]: f["kind"] for f in schema["features"]})


def pad_lists(col: pa.ChunkedArray | pa.ListArray, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A list<int64> column as [N, 50] right-padded with 0 (the last 50 values, as trec-rank keeps) + lengths."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy() + shift
    lengths = np.minimum(np.diff(offsets), MAX_LEN)
    start = offsets[1:] - lengths
    pos = np.arange(MAX_LEN)[None, :]
    idx = np.minimum(start[:, None] + pos, max(len(values) - 1, 0))
    padded = np.where(pos < lengths[:, None], values[idx] if len(values) else 0, 0)
    return padded.astype(np.int64), lengths.astype(np.int64)


def peer_columns(table: pa.Table, kinds: dict[str, str], shift: dict[str, int]) -> dict[str, np.ndarray]:
    """trec-rank Parquet rows as the peers' numpy columns (sequences padded, 0 = padding).

    `shift` adds 1 to the ids of tables whose id 0 is a real value (the genres), so that 0 is free for
    padding in both peers; it is applied to every column reading that table.
    """
    out: dict[str, np.ndarray] = {}
    for name, kind in kinds.items():
        if kind == "sequence":
            out[name], out["seq_length"] = pad_lists(table.column(name), shift.get(name, 0))
        elif kind == "sparse":
            out[name] = table.column(name).to_numpy().astype(np.int64) + shift.get(name, 0)
        else:  # dense and label columns
            out[name] = table.column(name).to_numpy().astype(np.float32)
    return out


def read_split(path: Path, columns: list[str], rows: int = 0) -> pa.Table:
    table = pq.read_table(sorted(p for p in path.glob("*.parquet") if not p.name.startswith(("_", "."))),
                          columns=columns)
    return table.slice(0, rows) if rows else table


def write_npz(dest: Path, splits: dict[str, dict[str, np.ndarray]]) -> Path:
    np.savez(dest, **{f"{s}/{k}": v for s, cols in splits.items() for k, v in cols.items()})
    return dest


def run_trec(config: Path, sets: list[str], run_dir: Path, threads: int) -> dict:
    """trec-rank's CLI `train` in one process under the step clock: its throughput.json, clock, metrics."""
    clock = run_dir.with_suffix(".clock.json")
    speed = train(config, sets, run_dir, threads=threads, clock=clock)
    metrics = json.loads((run_dir / "metrics.json").read_text()).get("valid", {})
    auc = {k.split("/")[0]: v for k, v in metrics.items() if k.endswith("/auc") and not k.startswith("cvr")}
    return {"rows": round(speed["samples_per_s"] * speed["train_seconds"]),
            "wall_s": speed["train_seconds"], "auc": auc, **json.loads(clock.read_text())}


def run_peer(spec: dict, out: Path, threads: int) -> dict:
    """One peer library in .venv-peers (scripts/peers_venv.sh builds it) on the rows of spec['data']."""
    if not PEERS_PY.exists():
        sys.exit(f"error: {PEERS_PY.relative_to(ROOT)} missing: run scripts/peers_venv.sh first")
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps({**spec, "threads": threads}))
    run([str(PEERS_PY), str(HERE / "peer_models.py"), str(spec_path), str(out)], threads=threads,
        what=spec["library"])
    return json.loads(out.read_text())
