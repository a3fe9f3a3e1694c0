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

    Never use `kt.values()` directly: a sharded EBC orders its output keys by sharding type, so the
    column order would change with the plan and a checkpoint would not transfer to another one."""
    parts = kt.to_dict()
    return torch.cat([parts[n] for n in names], dim=1)


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """Row index of every jagged value: lengths [B] -> [N]."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths.long())


def pool(jt: JaggedTensor, mode: str = "mean") -> torch.Tensor:
    """Sum/mean of a jagged [N, D] per row -> padded-free [B, D]; empty rows give zeros."""
    values, lengths = jt.values(), jt.lengths()
    out = torch.zeros(lengths.numel(), values.shape[-1], dtype=values.dtype, device=values.device)
    out = out.index_add(0, segment_ids(lengths), values)
    if mode == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(-1).to(values.dtype)
    return out


def to_padded(values: torch.Tensor, lengths: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged [N, D] -> padded [B, max_len, D] (zeros after each row's end) and mask [B, max_len]."""
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.long())
    padded = torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], 0.0)
    mask = torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    return padded, mask


def materialize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Allocate meta parameters on `device` and initialise them, as DMP does for unsharded modules.

    Used where no DMP is involved (single-process scoring, tests): every module that owns a meta
    parameter gets real storage and its `reset_parameters()` call.
    """
    for module in model.modules():
        has_meta = False
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device=device),
                                                              requires_grad=p.requires_grad)
                has_meta = True
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.zeros_like(b, device=device)
        if has_meta and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model.to(device)
