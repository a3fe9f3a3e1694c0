"""Collect finished retrieval runs into one table: per run, and mean +- std per encoder over seeds.

Each run is re-read from its metrics_history.jsonl with the trainer's own early-stopping rule
replayed under one budget (`--epochs`, `--patience`), so runs launched with a larger budget are
reported exactly as a run with this budget would have been (training does not depend on the cap
or the patience; they only decide where to stop and which epoch is reported). Where a run's own
budget equals the replayed one, the replay must reproduce its metrics.json (checked).

    .venv/bin/python benchmarks/hstu_collect.py runs/hstu/t0-default-s0 runs/hstu/hstu-s1 ... --epochs 50 --patience 8

Action-aware runs (`data.action_column` set) are grouped as `hstu+actions` / `sasrec+actions`; their
paired intervals come from `trec-rank compare` (benchmarks/actions_2x2.py prints both).

Runs of the reference implementation (benchmarks/hstu_reference.py, encoders `ref-hstu`, `ref-sasrec`)
can be listed with ours; each of our encoders is then also compared with its reference twin.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"]


def replay(history: list[dict], epochs: int, patience: int, key: str) -> tuple[dict, int]:
    """(the reported evaluation, the last epoch run) under the trainer's rule: strict improvement on valid."""
    best, bad, last = None, 0, 0
    for h in history:
        if h["epoch"] > epochs:
            break
        last = h["epoch"]
        if best is None or h["valid"][key] > best["valid"][key]:
            best, bad = h, 0
        else:
            bad += 1
        if 0 < patience <= bad:
            break
    assert best is not None, "empty history"
    return best, last


def collect(run: Path, epochs: int, patience: int) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    history = [json.loads(line) for line in (run / "metrics_history.jsonl").read_text().splitlines()]
    key = cfg["eval"]["early_stop_metric"]
    best, last = replay(history, epochs, patience, key)
    own = (cfg["train"]["epochs"], cfg["train"]["patience"])
    if own == (epochs, patience) and (run / "metrics.json").is_file():
        saved = json.loads((run / "metrics.json").read_text())
        assert saved == {"valid": best["valid"], "test": best["test"]}, f"{run}: replay != metrics.json"
    encoder = cfg["model"]["name"] + ("+actions" if cfg["data"].get("action_column") else "")  # a separate group
    return {"run": f"{run.parent.name}/{run.name}", "encoder": encoder, "seed": cfg["train"]["seed"],
            "best_epoch": best["epoch"], "last_epoch": last, "valid": best["valid"], "test": best["test"],
            "own_budget": own}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--patience", type=int, required=True)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = [collect(r, args.epochs, args.patience) for r in args.runs]
    print(f"budget: at most {args.epochs} epochs, patience {args.patience} on valid ndcg@10; test at the best "
          "valid epoch\n")
    print("| run | seed | best / last epoch | " + " | ".join(f"test {m}" for m in METRICS) + " | valid ndcg@10 |")
    print("|" + "---|" * (len(METRICS) + 4))
    for r in rows:
        print(f"| {r['run']} | {r['seed']} | {r['best_epoch']} / {r['last_epoch']} | "
              + " | ".join(f"{r['test'][m]:.4f}" for m in METRICS) + f" | {r['valid']['ndcg@10']:.4f} |")
    means = {}
    for enc in sorted({r["encoder"] for r in rows}):
        mine = [r for r in rows if r["encoder"] == enc]
        cells = []
        for split, m in [("test", m) for m in METRICS] + [("valid", "ndcg@10")]:
            vals = [r[split][m] for r in mine]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            means[(enc, split, m)] = statistics.mean(vals)
            cells.append(f"{statistics.mean(vals):.4f} +- {sd:.4f}")
        print(f"| **{enc}, mean +- std of {len(mine)}** | | | " + " | ".join(cells) + " |")
    for pre in ("", "ref-"):  # ours, then the reference implementation's runs when given
        hstu, sasrec = f"{pre}hstu", f"{pre}sasrec"
        if (hstu, "test", "ndcg@10") not in means or (sasrec, "test", "ndcg@10") not in means:
            continue
        for split in ("test", "valid"):
            h, s = means[(hstu, split, "ndcg@10")], means[(sasrec, split, "ndcg@10")]
            goal = " (target: >= +5% on test)" if split == "test" and not pre else ""
            print(f"\n{split} NDCG@10: {hstu} {h:.4f} vs {sasrec} {s:.4f}: {100 * (h / s - 1):+.2f}%{goal}")
            by_seed = {(r["encoder"], r["seed"]): r[split]["ndcg@10"] for r in rows}
            seeds = sorted(seed for enc, seed in by_seed if enc == hstu and (sasrec, seed) in by_seed)
            diffs = [by_seed[(hstu, seed)] - by_seed[(sasrec, seed)] for seed in seeds]
            # a mean can rest on one seed: the paired differences say how many seeds agree
            pairs = ", ".join(f"seed {seed} {d:+.4f}" for seed, d in zip(seeds, diffs, strict=True))
            ahead = sum(d > 0 for d in diffs)
            print(f"  paired by seed ({hstu} - {sasrec}): {pairs}; {hstu} ahead in {ahead} of {len(diffs)}")
    test = {(r["encoder"], r["seed"]): r["test"]["ndcg@10"] for r in rows}
    for ours in ("hstu", "sasrec"):  # runs of benchmarks/hstu_reference.py, when given: same seeds only
        seeds = sorted(seed for enc, seed in test if enc == f"ref-{ours}" and (ours, seed) in test)
        if seeds:
            o = statistics.mean(test[(ours, seed)] for seed in seeds)
            r = statistics.mean(test[(f"ref-{ours}", seed)] for seed in seeds)
            print(f"\ntest NDCG@10 over seeds {seeds}: our {ours} {o:.4f} vs the reference's {r:.4f}: "
                  f"{100 * (o / r - 1):+.2f}%")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
