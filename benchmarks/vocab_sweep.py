"""DIN step time and peak memory as the item table grows: trec-rank against the peers as users run them.

    bash scripts/peers_venv.sh        # once: .venv-peers with the peer libraries
    .venv/bin/python benchmarks/vocab_sweep.py [--sizes 1e4,1e5,1e6,1e7] [--steps 20] [--batch 256]
        [--threads 2] [--systems trec-rank,trec-rank-l2off,deepctr,rechub] [--repeat 3]

The DIN of benchmarks/peers.py (benchmarks/configs/din_peers.yaml: embeddings 16, Dice unit [64, 32],
MLP [200, 80], history 50) on synthetic rows whose item table has SIZE rows. Item ids (targets and
histories alike) are power-law: log-uniform over [1, SIZE), so P(rank r) ~ 1/r, scattered over the
table by a multiplicative hash, as popular items are in real catalogues; history lengths are uniform
in 1..50, genres follow the item, labels are coin flips (no AUC here: only cost is measured). Every
system trains the same `steps x batch` rows, each in its own process:
  trec-rank        its CLI `train` (fused row-wise Adagrad on the tables: work per step follows the
                   rows in the batch), with the config's mini-batch-aware L2;
  trec-rank-l2off  the same with the L2 weight 0;
  trec-rank-compiled  the same with train.compile=true (not in the default --systems: compiling does
                   not touch the tables, so it cannot change how the step grows with them);
  deepctr, rechub  the libraries' own loops with their default optimizers, which update every row of
                   every table each step (dense Adam; DeepCTR also adds its L2 over whole tables,
                   torch-rechub Adam's weight decay).
Reported per size: median step (step_clock.py: the gap between consecutive optimizer steps),
peak RSS (VmHWM at the last step), the step's growth over the smallest size, each system's step over
trec-rank's, and trec-rank over the fastest peer. Every size and system runs once per repetition
(--repeat, systems in a rotated order); the ratios pair runs of one repetition and come with their
95% interval (benchmarks/intervals.py). A fixed, small step count per size keeps 1e7 bounded: a dense Adam step over a
1e7 x 16 table moves about 2.5 GB, and the peers hold the table, its gradient and 2 Adam moments.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from intervals import ratio, rotated
from peer_runs import LABELS, MAX_LEN, ROOT, TREC, TRECS, peer_columns, run_peer, run_trec, schema_of, write_npz

CONFIG = ROOT / "benchmarks" / "configs" / "din_peers.yaml"
GENRES = 19  # genre ids 1..19 (0 stays free for the peers' padding), the genre table has 20 rows
HASH = 2_654_435_761  # a prime: id -> id * HASH mod (size - 1) permutes [0, size - 1)


def power_law(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """n ids in [1, size): rank r has probability ~1/r, ranks scattered over the table."""
    rank = np.floor(np.exp(rng.random(n) * np.log(size - 1))).astype(np.int64)  # 1 .. size-2
    return (rank * HASH) % (size - 1) + 1


def synthetic(size: int, rows: int, tables: dict[str, int], seed: int = 0) -> pa.Table:
    """DIN rows over an item table of `size` rows, in trec-rank's ranking/ column layout."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, MAX_LEN + 1, rows)
    hist = power_law(rng, size, int(lengths.sum()))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    item = power_law(rng, size, rows)
    cols = {
        "user_id": rng.integers(1, tables["user"], rows), "age_bucket": rng.integers(0, tables["age"], rows),
        "gender": rng.integers(0, tables["gender"], rows), "occupation": rng.integers(0, tables["occupation"], rows),
        "item_id": item, "item_genre": item % GENRES + 1,
        "hist_item_id": pa.ListArray.from_arrays(offsets, pa.array(hist)),
        "hist_genre": pa.ListArray.from_arrays(offsets, pa.array(hist % GENRES + 1)),
        "like": (rng.random(rows) < 0.5).astype(np.float32),
    }
    return pa.table(cols)


def measure(system: str, size: int, rep: int, args: argparse.Namespace, tmp: Path, data: Path, npz: Path,
            vocab: dict[str, int]) -> dict:
    name = tmp / f"{size}-{system}-r{rep}"
    if system in TRECS:
        item = list(schema_of(CONFIG)[0]).index("item")
        sets = [f"data.path={data}", f"data.batch_size={args.batch}", f"schema.tables.{item}.num_embeddings={size}",
                f"train.max_steps={args.steps}", "train.epochs=1", "data.eval_splits=[]",
                "train.log_every=1000000", *TRECS[system]]
        return run_trec(CONFIG, sets, name, args.threads)
    spec = {"library": system, "model": "din", "batch": args.batch, "data": str(npz), "vocab": vocab,
            "evaluate": False}
    return run_peer(spec, name.with_suffix(".json"), args.threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e4,1e5,1e6,1e7", help="comma-separated item table sizes")
    p.add_argument("--steps", type=int, default=20, help="training steps per system and size")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every system")
    p.add_argument("--systems", default="trec-rank,trec-rank-l2off,deepctr,rechub")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of the whole sweep (ratios get an interval)")
    args = p.parse_args()
    systems = args.systems.split(",")
    tables, feature_table, kinds = schema_of(CONFIG)
    results: dict[tuple[int, str], list[dict]] = {}
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        inputs = {}
        for size in sizes:  # a few thousand rows each: every size's data stays for all repetitions
            rows = synthetic(size, args.steps * args.batch, tables)
            data = tmp / f"items-{size}"
            (data / "train").mkdir(parents=True)
            pq.write_table(rows, data / "train" / "part-00000.parquet")
            npz = write_npz(tmp / f"items-{size}.npz", {"train": peer_columns(rows, kinds, {}), "valid": {}})
            vocab = {f: (size if t == "item" else tables[t]) for f, t in feature_table.items() if kinds[f] == "sparse"}
            inputs[size] = (data, npz, vocab)
        for rep in range(args.repeat):
            for size in sizes:
                for system in rotated(systems, rep):
                    r = measure(system, size, rep, args, tmp, *inputs[size])
                    results.setdefault((size, system), []).append(r)
                    print(f"rep {rep} {size:>10,} {system:16} {1000 * r['step_median_s']:9.2f} ms/step", flush=True)
    report(results, sizes, systems, args)


def report(results: dict[tuple[int, str], list[dict]], sizes: list[int], systems: list[str],
           args: argparse.Namespace) -> None:
    """Medians per (size, system); growth, the ratio to trec-rank and trec-rank over the fastest peer as
    geometric means of per-repetition ratios with their 95% intervals (benchmarks/intervals.py)."""
    base = TREC if TREC in systems else systems[0]
    peers = [s for s in systems if s not in TRECS]

    def steps(size: int, system: str) -> list[float]:
        return [r["step_median_s"] for r in results[size, system]]

    print(f"\n{'item rows':>10} {'system':20} {'ms/step':>9} {'peak RSS GiB':>12} {'growth, 95% CI':>22} "
          f"{f'/ {base}, 95% CI':>24}")
    for (size, system), rs in results.items():
        ms = 1000 * statistics.median(steps(size, system))
        rss = statistics.median(r["peak_rss_bytes"] for r in rs) / 2**30
        growth = ratio([a / b for a, b in zip(steps(size, system), steps(sizes[0], system), strict=True)])
        over = ratio([a / b for a, b in zip(steps(size, system), steps(size, base), strict=True)])
        print(f"{size:>10,} {LABELS.get(system, system):20} {ms:>9.2f} {rss:>12.2f} {growth:>22} {over:>24}")
    if peers and TREC in systems:
        for size in sizes:
            fastest = [min(col) for col in zip(*(steps(size, s) for s in peers), strict=True)]
            x = ratio([f / t for f, t in zip(fastest, steps(size, base), strict=True)])
            print(f"{size:>10,} rows: {base} x the fastest peer (per repetition) {x}")
    print(f"batch {args.batch}, {args.steps} steps per system and size, {args.threads} intra-op threads, "
          f"{args.repeat} repetition(s); ms/step is the median over repetitions of each run's median gap between "
          f"optimizer steps; growth = the step over its own at {sizes[0]:,} rows in the same repetition; "
          f"/ {base} = step time over {base}'s at the same size (the speed-up of {base})")


if __name__ == "__main__":
    main()
