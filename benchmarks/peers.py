"""Training speed of DIN and MMoE in trec-rank against DeepCTR-Torch and torch-rechub, one table, one run.

    bash scripts/peers_venv.sh        # once: .venv-peers with the peer libraries
    .venv/bin/python benchmarks/peers.py [--batches 256,2048] [--models din,mmoe] [--threads 2]
        [--repeat N] [--rows N] [--no-compile]   # --rows: only the first N train/valid rows (smoke runs)

Same rows for every system: trec-rank reads the Parquet splits, the peers get the same rows as numpy
arrays (benchmarks/peer_runs.py). Same shapes (issue 18):
  din:  MovieLens-100K `ranking/`: user, age, gender, occupation, target item and its genre, the
        item and genre histories (last 50); embeddings 16, Dice activation unit [64, 32] over
        [q, k, q-k, q*k], MLP [200, 80]. trec-rank: benchmarks/configs/din_peers.yaml (din.yaml on
        these features only), with its mini-batch-aware L2 and without it ("L2 off": plain DIN).
  mmoe: census `adult/`: 13 id + 6 dense features, 2 tasks (income, never_married); embeddings 8,
        4 experts [64], towers [32]. trec-rank: benchmarks/configs/mmoe.yaml.
Each system trains one epoch of the train split through its own loop (trec-rank's CLI `train`;
DeepCTR-Torch's `model.fit`; torch-rechub's trainer loop), each in its own process with the same
intra-op thread count. trec-rank also runs with `train.compile=true` ("compiled": its dense over-arch
under torch.compile), after an untimed 2-step run of the same config that fills inductor's on-disk
kernel cache, so its wall column pays dynamo's tracing and the cache load (seconds), not a cold
kernel build (tens of seconds on 2 cores; a user's first compiled run pays that once). Columns:
  wall samples/s  rows / seconds of the training loop (trec-rank: its throughput.json, which leaves
                  out start-up, planning, the evaluation and the checkpoint; peers: the fit/epoch call).
  median samples/s  batch / median gap between consecutive optimizer steps (step_clock.py): the
                  steady-state step, without start-up, first-step warm-up or the last partial batch.
  valid AUC       after the epoch, on the valid split (sanity: all should learn alike).
  x fastest peer  wall samples/s over the fastest peer's at the same model and batch, paired within each
                  repetition (every system of a repetition runs back to back, in an order rotated from one
                  repetition to the next, so all see the same machine): the geometric mean of the
                  per-repetition ratios with its 95% t-interval (on log ratios; needs --repeat >= 2),
                  and the same for the median step in parentheses. The rate columns are medians over
                  the repetitions. The machine is shared: a single run's rate moves by 20-40% within minutes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from intervals import ratio, rotated
from peer_runs import (
    LABELS,
    PEERS,
    ROOT,
    TREC,
    TREC_COMPILED,
    TREC_L2OFF,
    TRECS,
    peer_columns,
    read_split,
    run_peer,
    run_trec,
    schema_of,
    write_npz,
)

CASES = {  # model -> (trec-rank config, data dir under --data, peer table shifts (0 must be padding))
    "din": ("benchmarks/configs/din_peers.yaml", "ml-100k/ranking", {"genre": 1}),
    "mmoe": ("benchmarks/configs/mmoe.yaml", "adult/adult", {}),
}


def export(model: str, data: Path, rows: int, dest: Path) -> tuple[Path, dict[str, int]]:
    """The model's train/valid rows as the peers' npz, and {id column: table rows} for their tables."""
    config, sub, shift_tables = CASES[model]
    tables, feature_table, kinds = schema_of(ROOT / config)
    shift = {f: shift_tables[t] for f, t in feature_table.items() if t in shift_tables}
    splits = {s: peer_columns(read_split(data / sub / s, list(kinds), rows), kinds, shift) for s in ("train", "valid")}
    vocab = {f: tables[t] for f, t in feature_table.items() if kinds[f] == "sparse"}
    return write_npz(dest / f"{model}.npz", splits), vocab


def measure(model: str, batch: int, args: argparse.Namespace, tmp: Path, npz: Path, vocab: dict, rep: int) -> dict:
    config, sub, _ = CASES[model]
    results = {}
    trecs = [TREC, *([TREC_L2OFF] if model == "din" else []), *([] if args.no_compile else [TREC_COMPILED])]
    for system in rotated([*trecs, *PEERS], rep):
        name = tmp / f"{model}-{batch}-{system}-{rep}"
        if system in TRECS:
            sets = [*TRECS[system], f"data.path={Path(args.data).resolve() / sub}", f"data.batch_size={batch}",
                    "train.epochs=1", "data.eval_splits=[valid]", "data.eval_batch_size=2048",
                    "train.log_every=1000000"]
            if args.rows:
                sets.append(f"train.max_steps={max(1, args.rows // batch)}")
            if system == TREC_COMPILED and rep == 0:  # fill the kernel cache (untimed)
                run_trec(ROOT / config, [*sets, "train.max_steps=2", "data.eval_splits=[]"],
                         name.with_name(name.name + "-warm"), args.threads)
            results[system] = run_trec(ROOT / config, sets, name, args.threads)
        else:
            spec = {"library": system, "model": model, "batch": batch, "data": str(npz), "vocab": vocab,
                    "evaluate": True}
            results[system] = run_peer(spec, name.with_suffix(".json"), args.threads)
        r = results[system]
        r["wall_rate"], r["median_rate"] = r["rows"] / r["wall_s"], batch / r["step_median_s"]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data"), help="root holding ml-100k/ and adult/ (trec-rank data)")
    p.add_argument("--models", default="din,mmoe", help="comma-separated subset of din,mmoe")
    p.add_argument("--batches", default="256,2048", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every system")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of every row (>= 2 for an interval)")
    p.add_argument("--rows", type=int, default=0, help="only the first N rows of each split (0: all)")
    p.add_argument("--no-compile", action="store_true", help="leave out the trec-rank train.compile=true rows")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for model in args.models.split(","):
            npz, vocab = export(model, Path(args.data), args.rows, tmp)
            for batch in (int(b) for b in args.batches.split(",")):
                runs = [measure(model, batch, args, tmp, npz, vocab, rep) for rep in range(args.repeat)]
                for system in runs[0]:
                    rows.append((model, batch, system, runs))
    print(f"\n{'model':5} {'batch':>5} {'system':20} {'rows':>7} {'wall samples/s':>14} {'median samples/s':>16} "
          f"{'ms/step':>8} {'valid AUC':>13}  x fastest peer, 95% CI (median step)")
    for model, batch, system, runs in rows:
        r = runs[0]
        wall = statistics.median(run[system]["wall_rate"] for run in runs)
        step = statistics.median(run[system]["median_rate"] for run in runs)
        ms = statistics.median(run[system]["step_median_s"] for run in runs)
        auc = "/".join(f"{v:.3f}" for v in r[system]["auc"].values())
        x_wall = ratio([run[system]["wall_rate"] / max(run[p]["wall_rate"] for p in PEERS) for run in runs])
        x_step = statistics.geometric_mean([run[system]["median_rate"] / max(run[p]["median_rate"] for p in PEERS)
                                            for run in runs])
        print(f"{model:5} {batch:>5} {LABELS[system]:20} {r[system]['rows']:>7,} {wall:>14,.0f} {step:>16,.0f} "
              f"{1000 * ms:>8.2f} {auc:>13}  {x_wall} ({x_step:.2f}x)")
    print(f"{args.threads} intra-op threads per system, {args.repeat} repetition(s): rates are medians; x fastest "
          "peer = geometric mean of the per-repetition ratios to the fastest peer of the same repetition, "
          "[95% t-interval]; mmoe AUC is income/never_married (first repetition)")


if __name__ == "__main__":
    main()
