"""Planner run time vs table count and world size, on prefixes of configs/synthetic_large.yaml.

    .venv/bin/python benchmarks/plan.py                      # 25/50/100/200 tables x 8/32/128 ranks
    .venv/bin/python benchmarks/plan.py --tables 200 --world-sizes 128

Each cell is one `planner.plan()` exactly as `trec-rank plan` runs it (trainer's sharders,
constraints, optimizer state; cuda topology, 8 ranks per host), timed without model building.
The search is dominated by proposals x ranks: every proposal is partitioned over all ranks, and
row-wise options carry one shard per rank.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from trec_rank.config.experiment import ExperimentConfig  # noqa: E402
from trec_rank.config.typed import from_dict, read_yaml  # noqa: E402
from trec_rank.plan.planning import Cluster, plan_cluster  # noqa: E402
from trec_rank.plan.report import grid, shortfall, summary  # noqa: E402
from trec_rank.runtime.model import ranking_spec  # noqa: E402


def prefix_config(raw: dict, n_tables: int) -> ExperimentConfig:
    """The config restricted to its first `n_tables` tables (and the features/constraints on them)."""
    raw = copy.deepcopy(raw)
    schema = raw["schema"]
    schema["tables"] = schema["tables"][:n_tables]
    names = {t["name"] for t in schema["tables"]}
    schema["features"] = [f for f in schema["features"] if f.get("table") in names or f["kind"] in ("dense", "label")]
    constraints = raw.get("sharding", {}).get("constraints", {})
    raw.setdefault("sharding", {})["constraints"] = {k: v for k, v in constraints.items() if k in names}
    if raw["data"].get("group_by") not in {f["name"] for f in schema["features"]}:
        raw["data"]["group_by"] = ""
    return from_dict(ExperimentConfig, raw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/synthetic_large.yaml")
    p.add_argument("--tables", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--hbm-gb", type=float, default=80.0)
    args = p.parse_args()
    raw = read_yaml(args.config)
    rows = []
    for n in args.tables:
        cfg = prefix_config(raw, n)
        cells = [f"{len(cfg.schema.tables)}"]
        for ws in args.world_sizes:
            t0 = time.perf_counter()
            result = plan_cluster(ranking_spec(cfg), Cluster(ws, min(ws, 8), args.device, hbm_gb=args.hbm_gb))
            wall = time.perf_counter() - t0
            s = summary(result)
            note = "fits" if result.fits else f"no fit: {shortfall(s['diagnosis'])}"
            cells.append(f"{result.seconds:.1f} s ({result.num_proposals} prop., {note}; {wall:.1f} s wall)")
            print(f"tables={n} world={ws}: {cells[-1]}", file=sys.stderr, flush=True)
        rows.append(cells)
    print(f"\nplanner.plan() seconds on this machine ({os.cpu_count()} CPUs), {args.device}, "
          f"{args.hbm_gb:g} GiB HBM/rank, 8 ranks/host; wall includes the meta model and the no-fit diagnosis")
    print(grid(["tables"] + [f"world {ws}" for ws in args.world_sizes], rows))


if __name__ == "__main__":
    main()
