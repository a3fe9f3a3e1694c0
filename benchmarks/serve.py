"""Bounded load test of `trec-rank serve` on the loopback address, against `trec-rank score` on the same rows.

    .venv/bin/python benchmarks/serve.py configs/ml100k_base.yaml --checkpoint runs/base \
        --input data/ml-100k/ranking/test --out runs/serve-bench [--quick]

Exports the checkpoint twice (fp32 and `--quantize int8`, skipped when OUT/artifacts/<kind> exists), then for
each artifact starts its own server process (`trec-rank serve`, 127.0.0.1 on a free port), drives it with
1, 8 and 64 concurrent clients (threads, one keep-alive connection each) sending 1, 32 and 256 rows per
request, and stops the server. Every cell sends a fixed number of requests (`--requests`) and stops early
at `--seconds`, so the run ends by itself. Request bodies are built before the clock starts, cycling over
the first rows of --input. The reference is `trec-rank score` (fp32, and --quantize int8) over the same
rows: its scoring-loop rows/s from the `_SUCCESS` manifest (model loading excluded, as the server's is).
Printed per cell: p50/p99 latency, requests/s, rows/s and rows/s as a ratio of score's.

Client and server share the machine's cores; on a small machine the 64-client cells measure the client too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from trec_rank.config.experiment import load_config
from trec_rank.serve.rows import request_fields

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, by design
CLIENTS, ROWS = (1, 8, 64), (1, 32, 256)


def cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trec_rank.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise RuntimeError(f"trec-rank {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def request(port: int, method: str, path: str, body: bytes | None = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    """(status, parsed JSON reply); `conn` reuses a keep-alive connection."""
    c = conn or http.client.HTTPConnection(HOST, port, timeout=120)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        reply = c.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        if conn is None:
            c.close()


@contextmanager
def server(artifact: Path, *flags: str, startup_s: float = 300) -> Iterator[int]:
    """A `trec-rank serve` process on a free loopback port, ready (GET /health answers); yields the port and
    stops it (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads while it serves, a pipe could fill
    proc = subprocess.Popen([sys.executable, "-m", "trec_rank.cli", "serve", str(artifact), "--host", HOST,
                             "--port", str(port), *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"trec-rank serve exited {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"trec-rank serve did not answer /health within {startup_s:.0f} s")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def request_rows(input_path: str, n: int, fields: list[str]) -> list[dict[str, Any]]:
    """The first n rows of --input as request rows (only the fields the model reads)."""
    table = pq.read_table(input_path, columns=fields)
    return table.slice(0, n).to_pylist()


def load(port: int, bodies: list[bytes], clients: int, requests: int, seconds: float) -> dict[str, float]:
    """`requests` POST /predict over `clients` threads (stopping at `seconds`); latency percentiles and rates."""
    latencies: list[float] = []
    errors, sent = [0], iter(range(requests))
    lock, deadline = threading.Lock(), time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        try:
            while time.monotonic() < deadline:
                with lock:
                    k = next(sent, None)
                if k is None:
                    return
                t0 = time.perf_counter()
                status, _ = request(port, "POST", "/predict", bodies[k % len(bodies)], conn)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    errors[0] += status != 200
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "errors": errors[0], "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "req_s": len(ms) / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="Parquet rows to send (the first --pool rows)")
    p.add_argument("--out", required=True, help="artifacts, the score reference and results.json go here")
    p.add_argument("--requests", type=int, default=400, help="requests per cell")
    p.add_argument("--seconds", type=float, default=30, help="duration cap per cell")
    p.add_argument("--pool", type=int, default=4096, help="distinct rows cycled through")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 requests per cell, 5 s cap, 512 rows")
    args = p.parse_args()
    if args.quick:
        args.requests, args.seconds, args.pool = 4, 5.0, 512
    out = Path(args.out)
    rows_path = out / "rows" / "part-0.parquet"
    results: dict[str, Any] = {}
    fields = [f.name for f in request_fields(load_config(args.config))]
    for kind in ("fp32", "int8"):
        art = out / "artifacts" / kind
        if not (art / "artifact.json").is_file():
            cli("export", args.config, "--checkpoint", args.checkpoint, "--out", str(art),
                *(["--quantize", "int8"] if kind == "int8" else []))
        with server(art) as port:
            rows = request_rows(args.input, args.pool, fields)
            if not rows_path.is_file():
                rows_path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(pq.read_table(args.input).slice(0, len(rows)), rows_path)
            for n in ROWS:
                bodies = [json.dumps({"rows": [rows[(k * n + i) % len(rows)] for i in range(n)]}).encode()
                          for k in range(max(1, min(64, len(rows) // n)))]
                for c in CLIENTS:
                    results[f"{kind} c={c} rows={n}"] = {"kind": kind, "clients": c, "rows": n,
                                                         **load(port, bodies, c, args.requests, args.seconds)}
        scored = out / "score" / kind
        if not (scored / "_SUCCESS").is_file():
            cli("score", args.config, "--checkpoint", args.checkpoint, "--input", str(rows_path.parent),
                "--output", str(scored), *(["--quantize", "int8"] if kind == "int8" else []))
        results[f"{kind} score"] = json.loads((scored / "_SUCCESS").read_text())["last_run"]["rows_per_s"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{'model':>5} {'clients':>7} {'rows/req':>8} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} "
          f"{'rows/s':>9} {'x score':>8}")
    for key, r in results.items():
        if key.endswith("score"):
            continue
        rows_s = r["req_s"] * r["rows"]
        print(f"{r['kind']:>5} {r['clients']:>7} {r['rows']:>8} {r['requests']:>8} {r['p50_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {r['req_s']:>8.1f} {rows_s:>9.0f} {rows_s / results[r['kind'] + ' score']:>8.3f}"
              + (f"  ({r['errors']} errors)" if r["errors"] else ""))
    for kind in ("fp32", "int8"):
        print(f"trec-rank score {kind}: {results[kind + ' score']:.0f} rows/s over {len(rows)} rows (scoring loop)")


if __name__ == "__main__":
    main()
