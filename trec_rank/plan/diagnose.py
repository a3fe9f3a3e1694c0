"""Why a model does not fit a cluster, in terms a config author can act on.

torchrec's PlannerError reports global byte counts of the last proposal it tried. Here the whole
search space (every option the constraints allow, with per-shard storage estimates that include
the optimizer state) gives lower bounds per memory tier: each table at its cheapest option. That
names the tables behind the shortfall, the tables no single rank can hold, and what would fit:
more ranks, a sharding type that splits rows, a caching kernel, or a smaller embedding_dim.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from torchrec import EmbeddingCollection
from torchrec.distributed.planner.types import ShardingOption

from trec_rank.plan.planning import PlanResult

GB = 1024**3
CACHING = "fused_uvm_caching"


@dataclass
class Diagnosis:
    tier: str  # "hbm" or "ddr": the memory that runs out
    shortfall_gb: float | None  # missing capacity of the cluster, or of one rank for a table too large for
    # any; None when the dense part alone does not fit (torchrec reports only text then)
    tables: list[str]  # tables named as the cause, largest first
    lines: list[str] = field(default_factory=list)  # what is wrong
    suggestions: list[str] = field(default_factory=list)  # what would fit

    @property
    def message(self) -> str:
        out = [f"does not fit: {line}" if i == 0 else f"  {line}" for i, line in enumerate(self.lines)]
        if self.suggestions:
            out.append("what would fit:")
            out += [f"  - {s}" for s in self.suggestions]
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


def _by_table(space: list[ShardingOption]) -> dict[str, list[ShardingOption]]:
    out: dict[str, list[ShardingOption]] = defaultdict(list)
    for so in space:
        out[so.name].append(so)
    return out


def _shape(options: list[ShardingOption]) -> str:
    rows, dim = options[0].tensor.shape
    return f"{rows}x{dim}"


def _reservation_failure(result: PlanResult) -> Diagnosis:
    tier = "hbm" if result.cluster.device == "cuda" else "ddr"
    cap = getattr(result.topology.devices[0].storage, tier) / GB
    first = str(result.error).strip().splitlines()[0] if result.error else ""
    return Diagnosis(tier, None, [], [
        f"{result.cluster.label}: the dense model, input buffers and the 15% margin alone exceed one rank's "
        f"{tier.upper()} ({cap:.1f} GiB)", first],
        [f"more {tier.upper()} per rank (--hbm-gb/--ddr-gb)",
         f"a smaller per-rank batch (--batch-size, now {result.batch_size})"])


def diagnose(result: PlanResult) -> Diagnosis:
    """Explain a failed `plan_cluster` result (result.fits is False)."""
    assert not result.fits, "diagnose() is for plans that do not fit"
    if result.reserved is None:
        return _reservation_failure(result)
    cl, tables = result.cluster, _by_table(result.search_space)
    tiers = ("hbm", "ddr") if cl.device == "cuda" else ("ddr",)
    for tier in tiers:
        free_rank = min(getattr(d.storage, tier) for d in result.reserved.devices)
        free_total = sum(getattr(d.storage, tier) for d in result.reserved.devices)
        need = {t: min(getattr(so.total_storage, tier) for so in opts) for t, opts in tables.items()}
        # the smallest possible largest-shard of each table: what one rank must hold at least
        piece = {t: min(max(getattr(s.storage, tier) for s in so.shards) for so in opts)
                 for t, opts in tables.items()}
        too_big = sorted((t for t in tables if piece[t] > free_rank), key=lambda t: -piece[t])
        short = sum(need.values()) - free_total
        if short <= 0 and not too_big:
            continue
        return _explain(result, tables, tier, need, piece, too_big, short, free_rank, free_total)
    return Diagnosis(tiers[0], 0.0, [], [
        f"{cl.label}: enough memory in total, but no placement satisfied the constraints",
        str(result.error).strip().splitlines()[0]],
        ["relax sharding.constraints (more sharding types/kernels per table)", "more ranks"])


def _explain(result: PlanResult, tables: dict[str, list[ShardingOption]], tier: str, need: dict[str, int],
             piece: dict[str, int], too_big: list[str], short: int, free_rank: int,
             free_total: int) -> Diagnosis:
    cl, name = result.cluster, tier.upper()
    lines, suggestions = [], []
    ranked = sorted(need, key=lambda t: -need[t])
    if short > 0:
        named: list[str] = []
        covered = 0.0
        for t in ranked[:5]:  # the biggest contributors: at least three, until they cover the shortfall
            if covered >= short and len(named) >= 3:
                break
            named.append(t)
            covered += need[t]
        lines.append(f"{cl.label}: the tables need at least {sum(need.values()) / GB:.1f} GiB of {name}, the "
                     f"{cl.world_size} ranks have {free_total / GB:.1f} GiB left after reservations (dense "
                     f"model, input buffers, 15% margin): short by {short / GB:.1f} GiB")
        lines.append("largest tables (at their cheapest allowed option): " + ", ".join(
            f"{t} {_shape(tables[t])} ({need[t] / GB:.1f} GiB)" for t in named))
        per_rank = free_total / cl.world_size
        ranks = math.ceil(sum(need.values()) / per_rank / cl.local_world_size) * cl.local_world_size
        suggestions.append(f"more ranks: about {ranks} ({ranks // cl.local_world_size} hosts of "
                           f"{cl.local_world_size}) with this {name} per rank")
    else:
        named = []
    shortfall = short
    if too_big:
        worst = too_big[0]
        lines.append(f"too large for one rank ({free_rank / GB:.1f} GiB of {name} free per rank): " + ", ".join(
            f"{t} {_shape(tables[t])} (smallest shard {piece[t] / GB:.1f} GiB)" for t in too_big))
        shortfall = max(short, piece[worst] - free_rank)
    named = list(dict.fromkeys(too_big + named))
    suggestions += _split_and_cache(result, tables, named, need, tier)
    suggestions += _smaller_dims(tables, too_big + ranked, need, piece, too_big, short, free_rank)
    return Diagnosis(tier, round(shortfall / GB, 3), named, lines, suggestions)


def _split_and_cache(result: PlanResult, tables: dict[str, list[ShardingOption]], named: list[str],
                     need: dict[str, int], tier: str) -> list[str]:
    cl, out = result.cluster, []
    for t in named:
        cons = result.constraints.get(t)
        allowed = {so.sharding_type for so in tables[t]}
        if isinstance(tables[t][0].module[1], EmbeddingCollection):
            candidates = ["row_wise"]  # the EmbeddingCollection sharder has no table_row_wise
        elif cl.device == "cuda":
            candidates = ["row_wise", "table_row_wise"]
        else:
            candidates = ["column_wise"]  # EmbeddingBagCollection on cpu: no row-wise types
        missing = [s for s in candidates if s not in allowed]
        if missing:
            out.append(f"{missing[0].replace('_', '-')} sharding: add {' or '.join(missing)} to "
                       f"sharding.constraints.{t}.sharding_types (~{need[t] / cl.world_size / GB:.1f} GiB "
                       f"per rank if spread over all {cl.world_size} ranks)")
        kernels = cons.compute_kernels if cons is not None else None
        if cl.device == "cuda" and tier == "hbm" and kernels and CACHING not in kernels:
            out.append(f"a caching kernel: add {CACHING} to sharding.constraints.{t}.compute_kernels "
                       "(rows live in host DDR, HBM keeps a cache of the hot ones)")
    return out


def _smaller_dims(tables: dict[str, list[ShardingOption]], candidates: list[str], need: dict[str, int],
                  piece: dict[str, int], too_big: list[str], short: int, free_rank: int) -> list[str]:
    """Dims that make it fit: too-large tables scaled to one rank, then the largest halved (up to 8).

    Storage is about linear in embedding_dim (weights; row-wise optimizer state is small)."""
    changes: dict[str, int] = {}
    for t in too_big:
        dim = tables[t][0].tensor.shape[1]
        changes[t] = max(4, int(dim * free_rank / piece[t]) // 4 * 4)  # fbgemm wants dims % 4 == 0
    saved = sum(need[t] * (1 - changes[t] / tables[t][0].tensor.shape[1]) for t in changes)
    for t in candidates:
        if saved >= short or len(changes) >= 8:
            break
        if t not in changes:
            changes[t] = max(4, tables[t][0].tensor.shape[1] // 2 // 4 * 4)
            saved += need[t] * (1 - changes[t] / tables[t][0].tensor.shape[1])
    if not changes:
        return []
    what = ", ".join(f"{t} {tables[t][0].tensor.shape[1]} -> {d}" for t, d in changes.items())
    enough = "" if saved >= short else f", not enough alone (short {short / GB:.1f} GiB)"
    return [f"smaller embedding_dim: {what} (saves ~{saved / GB:.1f} GiB{enough})"]
