"""Soak: long training and large scoring through the real CLI, watching resident memory for growth.

    .venv/bin/python benchmarks/soak.py [--rows 10000000] [--steps 20000] [--work runs/soak]
                                        [--train-batch 64] [--table-cap 100000] [--score-procs 2]

1. `trec-rank data synthetic --schema configs/synthetic_dlrm.yaml --rows ROWS` (skipped when WORK/data
   already holds a manifest for ROWS rows).
2. `trec-rank train` a tiny DLRM-shaped model (tables capped at --table-cap rows: the features hash, so
   ids stay valid; one hidden layer of 64) for --steps steps of --train-batch rows on 1 process.
3. `trec-rank score` every row of the dataset (train+valid+test = ROWS) with that checkpoint on
   --score-procs ranks.

While each command runs, a sampler thread sums VmRSS (/proc/<pid>/status, psutil is not needed) over
the launcher and all its descendants every --interval seconds. The table prints the tree's RSS at 10%,
50% and 90% of the command's wall time, the peak, and the growth from 50% to 90%: a leak shows as
growth that scales with the steps or rows processed, whereas start-up (imports, tables, first batches)
is paid before the 10% point. Results are also written to WORK/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic_dlrm.yaml"
SUMMARY = re.compile(r"score: rows_in=(\d+) rows_out=(\d+) scored=(\d+) seconds=([\d.]+) rows_per_s=(\d+)")


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(stat.parent.name))
    return out


def tree_rss_mb(pid: int) -> float:
    """Sum of VmRSS over `pid` and every descendant (torchrun workers run in their own sessions)."""
    children, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


def run_sampled(args: list[str], nproc: int, interval: float, log: Path) -> dict:
    """Run `trec-rank ARGS`, sampling the process tree's RSS; returns wall time, samples and stdout."""
    cmd = [sys.executable, "-m", "trec_rank.cli", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trec_rank.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    samples: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.perf_counter() - t0, tree_rss_mb(proc.pid)))
                stop.wait(interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        stdout = proc.stdout.read()
        proc.wait()
        stop.set()
        thread.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "samples": samples, "stdout": stdout}


def rss_points(samples: list[tuple[float, float]], wall: float) -> dict[str, float]:
    """RSS (MiB) nearest to 10/50/90% of the wall time, the peak, and the 50->90% growth."""
    live = [(t, r) for t, r in samples if r > 0]
    if not live:
        return {}

    def at(frac: float) -> float:
        return min(live, key=lambda s: abs(s[0] - frac * wall))[1]

    p = {"start_10pct": at(0.1), "middle_50pct": at(0.5), "end_90pct": at(0.9), "peak": max(r for _, r in live)}
    p["growth_50_90"] = p["end_90pct"] - p["middle_50pct"]
    return {k: round(v, 1) for k, v in p.items()}


def model_sets(cap: int) -> list[str]:
    from trec_rank.config.experiment import load_config

    cfg = load_config(ROOT / CONFIG)
    sets = ["model.params.hidden=[64]"]
    sets += [f"schema.tables.{i}.num_embeddings={min(t.num_embeddings, cap)}"
             for i, t in enumerate(cfg.schema.tables) if t.num_embeddings > cap]
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="synthetic rows generated and scored")
    ap.add_argument("--steps", type=int, default=20_000, help="training steps")
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--table-cap", type=int, default=100_000, help="max rows per embedding table (tiny model)")
    ap.add_argument("--score-procs", type=int, default=2)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    ap.add_argument("--work", default="runs/soak")
    a = ap.parse_args()
    work = (ROOT / a.work).resolve()
    data, run, out = work / "data", work / "train", work / "scores"
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"rows": a.rows, "steps": a.steps, "train_batch": a.train_batch, "table_cap": a.table_cap,
                    "score_procs": a.score_procs}

    manifest = data / "_manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text())["params"]["rows"] == a.rows):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trec_rank.cli", "data", "synthetic", "--schema", CONFIG,
                        "--rows", str(a.rows), "--out", str(data)], cwd=ROOT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        report["data_s"] = round(time.perf_counter() - t0, 1)
        print(f"data: {a.rows:,} rows in {report['data_s']} s", flush=True)

    sets = [f"data.path={data}", f"data.batch_size={a.train_batch}", "data.eval_splits=[valid]",
            f"train.max_steps={a.steps}", f"train.log_every={max(1, a.steps // 20)}", *model_sets(a.table_cap)]
    train = run_sampled(["train", CONFIG, "--run-dir", str(run), *[x for s in sets for x in ("--set", s)]],
                        1, a.interval, work / "train.log")
    tp = json.loads((run / "throughput.json").read_text())
    report["train"] = {"wall_s": round(train["wall_s"], 1), "steps": tp["steps"],
                       "steps_per_s": round(tp["steps"] / max(tp["train_seconds"], 1e-9), 1),
                       "rss_mb": rss_points(train["samples"], train["wall_s"]),
                       "metrics": json.loads((run / "metrics.json").read_text())}
    print(f"train: {json.dumps(report['train'])}", flush=True)

    score_sets = [s for s in sets if s.startswith(("model.", "schema."))]
    score = run_sampled(["score", CONFIG, "--checkpoint", str(run), "--input", str(data), "--output", str(out),
                         *[x for s in score_sets for x in ("--set", s)]], a.score_procs, a.interval,
                        work / "score.log")
    success = json.loads((out / "_SUCCESS").read_text())
    m = SUMMARY.search(score["stdout"])
    report["score"] = {"wall_s": round(score["wall_s"], 1), "rows_in": success["input_rows"],
                       "rows_out": success["output_rows"], "parts": success["parts"],
                       "rows_per_s": int(m.group(5)) if m else None,
                       "rss_mb": rss_points(score["samples"], score["wall_s"]),
                       "rank_rss_mb": success["last_run"]["rss_mb"]}
    (work / "soak.json").write_text(json.dumps(report, indent=1))

    print(f"\nsoak: {a.rows:,} rows scored on {a.score_procs} rank(s), {a.steps:,} training steps of "
          f"{a.train_batch} rows; process-tree VmRSS in MiB")
    print(f"{'phase':<8}{'wall s':>9}{'rate':>16}{'RSS 10%':>10}{'RSS 50%':>10}{'RSS 90%':>10}{'peak':>9}"
          f"{'50->90%':>9}")
    for phase, rate in (("train", f"{report['train']['steps_per_s']} step/s"),
                        ("score", f"{report['score']['rows_per_s']} row/s")):
        r = report[phase]
        p = r["rss_mb"]
        print(f"{phase:<8}{r['wall_s']:>9}{rate:>16}{p['start_10pct']:>10}{p['middle_50pct']:>10}"
              f"{p['end_90pct']:>10}{p['peak']:>9}{p['growth_50_90']:>+9}")
    print(f"score ranks' own RSS (start/middle/end of the loop): {report['score']['rank_rss_mb']}")
    print(f"written to {work / 'soak.json'}")


if __name__ == "__main__":
    main()
