"""What a sharding plan depends on, and a short hash of it.

A plan is a list of shard placements for named tables of named modules; it stays valid exactly
as long as the table shapes, the module paths, the sharders, the world size, the ranks per host
(placements name `cuda:K` with K = rank % local_world_size) and the device type stay the same.
Batch size, capacities and the optimizer change which plan is best, not whether one loads, so
they are recorded in the JSON but not hashed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from trec_rank.parallel.sharding import sharders


def table_shapes(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """{module path: {table: [rows, dim]}} for every embedding module of `model`."""
    out: dict[str, dict[str, list[int]]] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            configs = module.embedding_bag_configs()
        elif isinstance(module, EmbeddingCollection):
            configs = module.embedding_configs()
        else:
            continue
        out[path] = {c.name: [c.num_embeddings, c.embedding_dim] for c in configs}
    return out


def plan_inputs(model: nn.Module, world_size: int, local_world_size: int, device_type: str) -> dict[str, Any]:
    sharder_names = [f"{type(s).__module__}.{type(s).__qualname__}" for s in sharders()]
    return {"tables": table_shapes(model), "sharders": sharder_names, "world_size": world_size,
            "local_world_size": local_world_size, "device": device_type}


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _shape(shape: list[int] | None) -> str:
    return "absent" if shape is None else f"{shape[0]}x{shape[1]}"


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two `plan_inputs` (for refusal messages)."""
    out = [f"{key}: plan has {saved.get(key)!r}, this job has {current[key]!r}"
           for key in ("world_size", "local_world_size", "device", "sharders") if saved.get(key) != current[key]]
    saved_tables, tables = saved.get("tables", {}), current["tables"]
    for module in sorted(set(saved_tables) | set(tables)):
        old, new = saved_tables.get(module, {}), tables.get(module, {})
        for table in sorted(set(old) | set(new)):
            if old.get(table) != new.get(table):
                out.append(f"table {module}.{table}: plan has {_shape(old.get(table))}, "
                           f"config has {_shape(new.get(table))}")
    return out
