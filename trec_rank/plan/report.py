"""A planned result as data (JSON) and as text tables: per table, per rank, totals, comparisons.

Everything comes from the planner's own ShardingOptions (captured by planning.CapturePlan), so
the storage numbers include optimizer state and the perf numbers are torchrec's estimates (ms per
iteration: forward/backward compute and communication of the embedding lookups).
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from trec_rank.plan.diagnose import diagnose
from trec_rank.plan.planning import PlanResult

GB = 1024**3
SHORT = {"data_parallel": "DP", "table_wise": "TW", "row_wise": "RW", "column_wise": "CW",
         "table_row_wise": "TWRW", "table_column_wise": "TWCW", "grid_shard": "GRID"}


def _ranks(ranks: list[int]) -> str:
    """[0,1,2,3,8] -> '0-3,8'."""
    spans: list[list[int]] = []
    for r in sorted(set(ranks)):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _sizes(sizes: list[list[int]]) -> str:
    """Shard sizes, identical ones counted: '7812500x128 (120), 7812499x128 (8)'."""
    counts = Counter("x".join(map(str, s)) for s in sizes)
    return ", ".join(k if n == 1 else f"{k} ({n})" for k, n in counts.items())


def table_records(result: PlanResult) -> list[dict[str, Any]]:
    out = []
    for so in sorted(result.options, key=lambda so: (so.path, so.name)):
        storage = so.total_storage
        out.append({"module": so.path, "table": so.name, "rows": so.tensor.shape[0], "dim": so.tensor.shape[1],
                    "sharding_type": so.sharding_type, "compute_kernel": so.compute_kernel,
                    "ranks": [s.rank for s in so.shards], "shard_sizes": [list(s.size) for s in so.shards],
                    "hbm_gb": storage.hbm / GB, "ddr_gb": storage.ddr / GB, "perf_ms": so.total_perf})
    return out


def rank_records(result: PlanResult) -> list[dict[str, Any]]:
    """Per rank: table shards' memory, reservations (dense, KJT, margin), capacity, perf breakdown."""
    cl = result.cluster
    ranks = [{"rank": r, "host": r // cl.local_world_size, "shards": 0, "tables_hbm_gb": 0.0,
              "tables_ddr_gb": 0.0, "fwd_compute_ms": 0.0, "fwd_comms_ms": 0.0, "bwd_compute_ms": 0.0,
              "bwd_comms_ms": 0.0, "other_ms": 0.0, "perf_ms": 0.0} for r in range(cl.world_size)]
    for so in result.options:
        for shard in so.shards:
            rec, perf = ranks[shard.rank], shard.perf
            rec["shards"] += 1
            rec["tables_hbm_gb"] += shard.storage.hbm / GB
            rec["tables_ddr_gb"] += shard.storage.ddr / GB
            for part in ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms"):
                rec[f"{part}_ms"] += getattr(perf, part)
            rec["other_ms"] += perf.input_dist_comms + perf.prefetch_compute
            rec["perf_ms"] += perf.total
    assert result.reserved is not None, "rank records need the planner's reserved topology"
    for rec, dev, free in zip(ranks, result.topology.devices, result.reserved.devices):
        for tier in ("hbm", "ddr"):
            cap = getattr(dev.storage, tier) / GB
            rec[f"{tier}_cap_gb"] = cap
            rec[f"{tier}_reserved_gb"] = cap - getattr(free.storage, tier) / GB
            rec[f"{tier}_used_gb"] = rec[f"tables_{tier}_gb"] + rec[f"{tier}_reserved_gb"]
    return ranks


def _imbalance(values: list[float]) -> float:
    mean = statistics.mean(values)
    return max(values) / mean if mean > 0 else 1.0


def summary(result: PlanResult) -> dict[str, Any]:
    """The one-line-per-cluster numbers `--compare` shows side by side."""
    out: dict[str, Any] = {"cluster": result.cluster.label, "fits": result.fits, "seconds": result.seconds,
                           "proposals": result.num_proposals, "batch_size": result.batch_size}
    if not result.fits:
        return {**out, "diagnosis": diagnose(result).to_dict()}
    ranks = rank_records(result)
    perf = [r["perf_ms"] for r in ranks]
    tier = "hbm" if result.cluster.device == "cuda" else "ddr"
    used = [r[f"{tier}_used_gb"] for r in ranks]
    kinds = Counter(so.sharding_type for so in result.options)
    return {**out, "tables": len(result.options), "memory": tier,
            "max_used_gb": max(used), "cap_gb": ranks[0][f"{tier}_cap_gb"],
            "tables_gb": sum(r[f"tables_{tier}_gb"] for r in ranks),
            "max_perf_ms": max(perf), "max_perf_rank": perf.index(max(perf)), "mean_perf_ms": statistics.mean(perf),
            "perf_imbalance": _imbalance(perf), "memory_imbalance": _imbalance([r[f"tables_{tier}_gb"] for r in ranks]),
            "sharding_types": dict(kinds.most_common()),
            "compute_kernels": dict(Counter(so.compute_kernel for so in result.options).most_common())}


def to_json(result: PlanResult, config: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"config": config, "summary": summary(result)}
    if result.fits:
        doc.update(tables=table_records(result), ranks=rank_records(result))
    return doc


def grid(header: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned text columns; numbers pre-formatted by the caller."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def render_text(result: PlanResult, config: str) -> str:
    s = summary(result)
    head = (f"plan for {config} on {result.cluster.label}, batch {result.batch_size}/rank: "
            f"{result.num_proposals} proposals in {result.seconds:.1f} s")
    if not result.fits:
        return head + "\n" + s["diagnosis"]["message"]
    out = [head]
    records = table_records(result)
    for module in dict.fromkeys(r["module"] for r in records):
        out += ["", f"module {module}", grid(
            ["table", "rows x dim", "sharding", "kernel", "ranks", "shard sizes", "HBM GiB", "DDR GiB",
             "perf ms (all shards)"],
            [[r["table"], f"{r['rows']} x {r['dim']}", r["sharding_type"], r["compute_kernel"], _ranks(r["ranks"]),
              _sizes(r["shard_sizes"]), f"{r['hbm_gb']:.3f}", f"{r['ddr_gb']:.3f}", f"{r['perf_ms']:.3f}"]
             for r in records if r["module"] == module])]
    ranks = rank_records(result)
    out += ["", "per rank (used = table shards + reserved for dense model, input buffers and a 15% margin)", grid(
        ["rank", "host", "HBM GiB used/cap", "DDR GiB used/cap", "shards", "fwd comp", "fwd comm", "bwd comp",
         "bwd comm", "perf ms"],
        [[r["rank"], r["host"], f"{r['hbm_used_gb']:.2f}/{r['hbm_cap_gb']:.0f}",
          f"{r['ddr_used_gb']:.2f}/{r['ddr_cap_gb']:.0f}", r["shards"], f"{r['fwd_compute_ms']:.3f}",
          f"{r['fwd_comms_ms']:.3f}", f"{r['bwd_compute_ms']:.3f}", f"{r['bwd_comms_ms']:.3f}",
          f"{r['perf_ms']:.3f}"] for r in ranks])]
    hbm, ddr = sum(r["tables_hbm_gb"] for r in ranks), sum(r["tables_ddr_gb"] for r in ranks)
    types = ", ".join(f"{SHORT.get(k, k)} {n}" for k, n in s["sharding_types"].items())
    out += ["", f"totals: {s['tables']} tables ({types}); table shards {hbm:.2f} GiB HBM + {ddr:.2f} GiB DDR; "
            f"peak {s['memory'].upper()} {s['max_used_gb']:.2f}/{s['cap_gb']:.0f} GiB per rank",
            f"perf: max {s['max_perf_ms']:.3f} ms (rank {s['max_perf_rank']}), mean {s['mean_perf_ms']:.3f} ms; "
            f"imbalance (max/mean) perf {s['perf_imbalance']:.2f}, {s['memory'].upper()} {s['memory_imbalance']:.2f}"]
    return "\n".join(out)


def shortfall(diagnosis: dict[str, Any]) -> str:
    tier = diagnosis["tier"].upper()
    gb = diagnosis["shortfall_gb"]
    return f"dense part exceeds {tier}" if gb is None else f"short {gb:.1f} GiB {tier}"


def render_compare(results: list[PlanResult]) -> str:
    """One column per cluster, one row per headline number."""
    sums = [summary(r) for r in results]

    def row(name: str, fn: Any) -> list[str]:
        return [name] + [fn(s) if s["fits"] else "-" for s in sums]

    fits = ["fits"] + ["yes" if s["fits"] else f"no: {shortfall(s['diagnosis'])}" for s in sums]
    rows = [fits, ["plan time s"] + [f"{s['seconds']:.1f}" for s in sums],
            row("peak memory/rank GiB", lambda s: f"{s['max_used_gb']:.1f}/{s['cap_gb']:.0f} {s['memory'].upper()}"),
            row("table shards GiB", lambda s: f"{s['tables_gb']:.1f}"),
            row("max perf ms", lambda s: f"{s['max_perf_ms']:.3f}"),
            row("perf imbalance", lambda s: f"{s['perf_imbalance']:.2f}"),
            row("memory imbalance", lambda s: f"{s['memory_imbalance']:.2f}"),
            row("sharding types", lambda s: " ".join(f"{SHORT.get(k, k)}:{n}" for k, n in s["sharding_types"].items())),
            ["tables short of memory"] + [", ".join(s["diagnosis"]["tables"][:3]) if not s["fits"] else "-"
                                          for s in sums]]
    return grid(["cluster"] + [s["cluster"] for s in sums], rows)
