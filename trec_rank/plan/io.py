"""Sharding plans as versioned JSON (no pickle), and the trainer's checked way to load one.

A pickle ties a plan to torchrec's class layout and can run code on load; JSON is diffable,
reviewable and survives upgrades. Each file carries the fingerprint of what the plan depends on
(fingerprint.py): `load_plan` refuses a plan made for other table shapes, sharders, world size,
ranks per host or device, and says which of them differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any

from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torchrec.distributed.types import (
    BoundsCheckMode,
    DataType,
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingPlan,
)

from trec_rank.plan.fingerprint import differences, fingerprint, plan_inputs
from trec_rank.runtime.model import ModelSpec

FORMAT = "trec-rank-plan"
VERSION = 1
_CORE = ("sharding_type", "compute_kernel", "ranks", "sharding_spec")
# Optional ParameterSharding fields this format carries: name -> enum type (None: plain bool).
_OPTIONAL: dict[str, type[Enum] | None] = {"enforce_hbm": None, "stochastic_rounding": None,
                                           "bounds_check_mode": BoundsCheckMode, "output_dtype": DataType}


def _param_to_dict(where: str, ps: ParameterSharding) -> dict[str, Any]:
    out: dict[str, Any] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                           "ranks": ps.ranks, "shards": None}
    if ps.sharding_spec is not None:
        if not isinstance(ps.sharding_spec, EnumerableShardingSpec):
            raise ValueError(f"{where}: sharding spec {type(ps.sharding_spec).__name__} has no JSON form")
        out["shards"] = [{"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes),
                          "placement": str(s.placement)} for s in ps.sharding_spec.shards]
    for f in dataclasses.fields(ps):
        value = getattr(ps, f.name)
        if f.name in _CORE or value is None:
            continue
        if f.name not in _OPTIONAL:
            raise ValueError(f"{where}: ParameterSharding.{f.name} is set; plan JSON v{VERSION} cannot carry it")
        out[f.name] = value.name if isinstance(value, Enum) else value
    return out


def plan_to_dict(plan: ShardingPlan) -> dict[str, dict[str, dict[str, Any]]]:
    """{module path: {table: {sharding_type, compute_kernel, ranks, shards, ...}}}."""
    return {module: {table: _param_to_dict(f"{module}.{table}", ps) for table, ps in mplan.items()}
            for module, mplan in plan.plan.items()}


def _param_from_dict(where: str, d: dict[str, Any]) -> ParameterSharding:
    try:
        spec = None if d["shards"] is None else EnumerableShardingSpec(
            [ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"], placement=s["placement"])
             for s in d["shards"]])
        extras = {}
        for name, enum in _OPTIONAL.items():
            if d.get(name) is not None:
                extras[name] = enum[d[name]] if enum is not None else bool(d[name])
        return ParameterSharding(sharding_type=d["sharding_type"], compute_kernel=d["compute_kernel"],
                                 ranks=d["ranks"], sharding_spec=spec, **extras)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{where}: malformed parameter sharding ({type(err).__name__}: {err})") from None


def plan_from_dict(data: dict[str, Any], where: str = "plan") -> ShardingPlan:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of module path -> tables")
    return ShardingPlan({module: EmbeddingModuleShardingPlan(
        {table: _param_from_dict(f"{where}: {module}.{table}", d) for table, d in tables.items()})
        for module, tables in data.items()})


def save_plan(path: str | Path, plan: ShardingPlan, inputs: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write atomically (tmp + rename): a half-written plan must never be loadable."""
    path = Path(path)
    doc = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint(inputs), "inputs": inputs,
           **extra, "plan": plan_to_dict(plan)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def read_plan_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--plan: plan file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON plan ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a trec-rank plan (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: plan format version {doc.get('version')!r} is not supported "
                         f"(this trec-rank reads version {VERSION}); re-run `trec-rank plan`")
    return doc


def load_plan(path: str | Path, spec: ModelSpec, world_size: int, local_world_size: int,
              device_type: str) -> ShardingPlan:
    """The plan in `path`, if it was made for this config's tables and this job's world and device."""
    doc = read_plan_file(path)
    current = plan_inputs(spec.build(), world_size, local_world_size, device_type)
    if doc.get("fingerprint") != fingerprint(current):
        diff = differences(doc.get("inputs", {}), current) or ["(plan inputs were edited)"]
        raise ValueError(f"{path}: plan does not match this job (fingerprint {doc.get('fingerprint')} != "
                         f"{fingerprint(current)}): {'; '.join(diff)}. Re-plan: trec-rank plan CONFIG "
                         f"--world-size {world_size} --local-world-size {local_world_size} "
                         f"--device {device_type} --out {path}")
    plan = doc.get("plan")
    if not isinstance(plan, dict):
        raise ValueError(f"{path}: no 'plan' object in the file; re-plan: trec-rank plan CONFIG --out {path}")
    return plan_from_dict(plan, str(path))
