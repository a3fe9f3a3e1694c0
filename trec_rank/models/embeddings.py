"""Sparse arch: the schema's tables as TorchRec modules, and jagged helpers for the over-arches.

Pooled features go to an EmbeddingBagCollection; tables read by histories go to one
EmbeddingCollection (see `Schema` for the routing rule). Both are built on whatever device the
caller passes (normally `meta`); DistributedModelParallel shards and materialises them.
"""

from __future__ import annotations

import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.schema import Schema


def build_ebc(schema: Schema, device: torch.device) -> EmbeddingBagCollection | None:
    tables = []
    for t in schema.pooled_tables:
        feats = [f for f in schema.pooled_features if f.table == t.name]
        tables.append(EmbeddingBagConfig(
            name=t.name, embedding_dim=t.embedding_dim, num_embeddings=schema.table_rows(t.name),
            feature_names=[f.name for f in feats],
            pooling=PoolingType.MEAN if feats[0].pooling == "mean" else PoolingType.SUM))
    return EmbeddingBagCollection(tables=tables, device=device) if tables else None


def build_ec(schema: Schema, device: torch.device) -> EmbeddingCollection | None:
    tables = [EmbeddingConfig(name=t.name, embedding_dim=t.embedding_dim, num_embeddings=schema.table_rows(t.name),
                              feature_names=[f.name for f in schema.sequence_features if f.table == t.name])
              for t in schema.sequence_tables]
    return EmbeddingCollection(tables=tables, device=device) if tables else None


def pooled_dim(schema: Schema) -> int:
    """Width of the EBC output (KeyedTensor.values(): [B, sum of pooled feature dims])."""
    return sum(schema.table(f.table).embedding_dim for f in schema.pooled_features)


def pooled_values(kt: KeyedTensor, names: list[str]) -> torch.Tensor:
    """EBC output as [B, sum D] in the schema's feature order.

    `kt.values()` itself only when its keys are already in that order (one sharding type: the usual
    case, and then no split and concat per step): a sharded EBC orders its output keys by sharding
    type, so with several the column order changes with the plan, and a checkpoint would not transfer
    to another plan if the model read the columns in the plan's order."""
    if kt.keys() == names:
        return kt.values()
    parts = kt.to_dict()
    return torch.cat([parts[n] for n in names], dim=1)


def segment_ids(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Row index of every jagged value: lengths [B] -> [N], N = `total` = lengths.sum().

    The caller passes N from the values' shape: without it repeat_interleave reads the lengths back
    to size its output, a host sync on every call on GPU."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths.long(),
                                   output_size=total)


def pool(jt: JaggedTensor, mode: str = "mean") -> torch.Tensor:
    """Sum/mean of a jagged [N, D] per row -> padded-free [B, D]; empty rows give zeros."""
    values, lengths = jt.values(), jt.lengths()
    out = torch.zeros(lengths.numel(), values.shape[-1], dtype=values.dtype, device=values.device)
    out = out.index_add(0, segment_ids(lengths, values.shape[0]), values)
    if mode == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(-1).to(values.dtype)
    return out


def _allocate(module: torch.nn.Module, device: torch.device) -> bool:
    """Give `module`'s own meta parameters (and buffers, zero-filled) real storage; True if any."""
    found = False
    for name, p in list(module._parameters.items()):
        if p is not None and p.is_meta:
            module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device=device),
                                                          requires_grad=p.requires_grad)
            found = True
    for name, b in list(module._buffers.items()):
        if b is not None and b.is_meta:
            module._buffers[name] = torch.zeros_like(b, device=device)
    return found


def materialize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Allocate meta parameters on `device` and initialise them, as DMP does for unsharded modules.

    Used where no DMP is involved (single-process scoring, tests): every module that owns a meta
    parameter gets real storage and its `reset_parameters()` call. Embedding collections are reset
    as a whole, so their tables get the table config's init rather than nn.Embedding's N(0, 1).
    """
    collections = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection | EmbeddingCollection)]
    inside = {id(m) for coll in collections for m in coll.modules()}
    for coll in collections:
        if any([_allocate(m, device) for m in coll.modules()]):
            # coll.reset_parameters() is a no-op for a collection built on meta: apply the configs' init.
            if isinstance(coll, EmbeddingBagCollection):
                tables = [(c, coll.embedding_bags[c.name]) for c in coll.embedding_bag_configs()]
            else:
                tables = [(c, coll.embeddings[c.name]) for c in coll.embedding_configs()]
            with torch.no_grad():
                for config, module in tables:
                    config.init_fn(module.weight)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if id(module) not in inside and _allocate(module, device) and reset is not None:
            reset()
    return model.to(device)

