"""`trec-rank plan`: the argparse side. Heavy imports wait until the command runs.

Exit codes: 0 planned (and written with --out); 1 the model does not fit (the message names the
tables, the shortfall and what would fit; with --compare: no cluster fits); 2 a user error
(ValueError, printed by trec_rank.cli as `error: ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

DESCRIPTION = """\
Compute the sharding plan `trec-rank train` would use, for any cluster, in this one process:
no GPU, no process group and no data are needed. Uses the trainer's sharders, per-table
constraints (sharding.constraints), batch size and sparse optimizer (its state is planned too).
Prints, per embedding module, each table's sharding type, compute kernel, ranks and shard sizes;
per rank, the memory used and the estimated embedding time; then totals and imbalance."""

EPILOG = """\
examples:
  trec-rank plan configs/synthetic_large.yaml --world-size 128 --local-world-size 8 --device cuda --hbm-gb 80
  trec-rank plan configs/synthetic_large.yaml --device cuda --compare ws=64,lws=8,hbm=80 ws=128,lws=8,hbm=40
  trec-rank plan configs/ml100k_base.yaml --world-size 2 --device cpu --out plan.json
  torchrun --nproc_per_node 2 -m trec_rank.cli train configs/ml100k_base.yaml --run-dir runs/x --plan plan.json

exit codes: 0 planned, 1 does not fit (with --compare: no cluster fits), 2 bad input"""

SPEC_KEYS: dict[str, tuple[str, type]] = {"ws": ("world_size", int), "lws": ("local_world_size", int),
                                          "device": ("device", str), "hbm": ("hbm_gb", float),
                                          "ddr": ("ddr_gb", float), "bs": ("batch_size", int)}


def add_subcommand(sub: Any, load_job: Callable[[str, list[str]], tuple[Any, Any]]) -> None:
    """Register `plan` on trec-rank's subparsers (`sub` from ArgumentParser.add_subparsers());
    `load_job(config, overrides)` gives the (config, ModelSpec) of a ranking or retrieval config."""
    p = sub.add_parser("plan", help="sharding plan for any cluster, from one process (what-if, --out plan.json)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML; its data is never opened")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="total ranks of the cluster (required unless every --compare SPEC sets ws=)")
    p.add_argument("--local-world-size", type=int, metavar="M",
                   help="ranks per host (default: min(N, 8)); must divide N. Training must run with the same "
                        "value (torchrun --nproc_per_node); cuda placements are cuda:(rank %% M)")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="device the ranks compute on (default: the config's sharding.device unless 'auto'). "
                        "cuda plans need no GPU here; cpu offers no row-wise EmbeddingBag sharding")
    p.add_argument("--hbm-gb", type=float, metavar="X",
                   help="accelerator memory per rank in GiB (2^30 bytes: the unit of every *_gb value and of the "
                        "report; torch.cuda.mem_get_info shows an 80GB H100 as 79.6). Default: sharding.hbm_gb, "
                        "else this machine's GPU memory when it has one, else torchrec's 32; cpu ranks have none")
    p.add_argument("--ddr-gb", type=float, metavar="Y",
                   help="host memory per rank in GiB (default: sharding.ddr_gb, else torchrec's 128); holds "
                        "everything on cpu, and UVM/caching-kernel rows on cuda")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="per-rank training batch (default: data.batch_size); sizes input buffers and the "
                        "communication estimates")
    p.add_argument("--out", metavar="PLAN_JSON",
                   help="write the plan as versioned JSON (with a fingerprint of table shapes, sharders, world "
                        "size, ranks per host and device) for `trec-rank train --plan`; one cluster only")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table: text tables (default); json: the same numbers as one JSON document on stdout")
    p.add_argument("--compare", nargs="+", metavar="SPEC",
                   help="plan several clusters side by side. SPEC is comma-separated key=value with keys "
                        f"{', '.join(SPEC_KEYS)} (world size, ranks per host, device, HBM GiB, DDR GiB, batch); "
                        "keys left out come from the options above. e.g. ws=8,lws=8,hbm=80 ws=16,lws=8,hbm=40")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.batch_size=2048 (repeatable; value parsed "
                        "as YAML); the plan's fingerprint follows the changed tables")
    p.set_defaults(func=lambda args: run(args, load_job(args.config, args.set)[1]))


def parse_spec(spec: str) -> dict[str, Any]:
    """'ws=8,lws=8,hbm=80' -> {'world_size': 8, 'local_world_size': 8, 'hbm_gb': 80.0}."""
    out: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or key.strip() not in SPEC_KEYS:
            raise ValueError(f"--compare {spec!r}: '{item}' is not KEY=VALUE with KEY one of {', '.join(SPEC_KEYS)}")
        name, kind = SPEC_KEYS[key.strip()]
        try:
            out[name] = kind(raw.strip())
        except ValueError:
            raise ValueError(f"--compare {spec!r}: {key}={raw!r} is not a valid {kind.__name__}") from None
    return out


def _cluster(fields: dict[str, Any]):  # noqa: ANN202 (Cluster import is deferred)
    from trec_rank.plan.planning import Cluster

    if fields["world_size"] is None:
        raise ValueError("--world-size is required (or set ws= in every --compare SPEC)")
    if fields["device"] is None:
        raise ValueError("--device: the config's sharding.device is 'auto'; say cuda or cpu")
    if fields["local_world_size"] is None:
        fields = {**fields, "local_world_size": min(fields["world_size"], 8)}
    return Cluster(**fields)


def run(args: argparse.Namespace, spec: Any) -> None:
    """Plan `spec` (a trec_rank.runtime.model.ModelSpec) for the clusters the arguments name."""
    from trec_rank.plan.fingerprint import plan_inputs
    from trec_rank.plan.io import save_plan
    from trec_rank.plan.planning import plan_cluster
    from trec_rank.plan.report import render_compare, render_text, summary, to_json

    device = spec.inputs.sharding.device
    base = {"world_size": args.world_size, "local_world_size": args.local_world_size,
            "device": args.device or (None if device == "auto" else device),
            "hbm_gb": args.hbm_gb, "ddr_gb": args.ddr_gb, "batch_size": args.batch_size}
    clusters = [_cluster({**base, **parse_spec(s)}) for s in args.compare] if args.compare else [_cluster(base)]
    if args.out and args.compare:
        raise ValueError("--out writes one plan: drop --compare, or plan the chosen cluster again with --out")
    results = [plan_cluster(spec, c) for c in clusters]
    if args.compare:
        print(json.dumps([summary(r) for r in results], indent=1) if args.format == "json"
              else render_compare(results))
        if not any(r.fits for r in results):
            raise SystemExit(1)
        return
    result = results[0]
    print(json.dumps(to_json(result, args.config), indent=1) if args.format == "json"
          else render_text(result, args.config))
    if not result.fits:
        raise SystemExit(1)
    if args.out:
        c = result.cluster
        inputs = plan_inputs(result.model, c.world_size, c.local_world_size, c.device)
        save_plan(args.out, result.plan, inputs, {"planned_for": {
            "config": args.config, "overrides": args.set, "cluster": asdict(c), "batch_size": result.batch_size,
            "sparse_optimizer": spec.optim.sparse}, "summary": summary(result)})
        print(f"plan written to {args.out}", file=sys.stderr)
