"""Full-corpus evaluation on a sharded item table: brute-force MIPS over every corpus item.

The candidate matrix is gathered from the sharded EmbeddingCollection *through its own lookup*:
rank r looks up an equal slice of the corpus ids (feature `neg`), and an all_gather gives every
rank the full [C, D] table. This works for any sharding type (TW/RW/CW) without touching
ShardedTensor internals, costs one lookup of C rows per evaluation, and needs C x D floats per
rank (ML-20M: 27k x 256 = 27 MB). For corpora too large to replicate, score shard by shard
instead (each rank scores all users against its rows and the top-k are merged); not needed at
MovieLens scale.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from trec_rank.retrieval.batch import eval_batch, item_kjt
from trec_rank.retrieval.data import SplitReader
from trec_rank.retrieval.metrics import RankingMetrics, target_ranks
from trec_rank.retrieval.model import RetrievalModel, normalize
from trec_rank.runtime.eval_rows import EvalResult


@torch.no_grad()
def item_table(model: RetrievalModel, corpus: np.ndarray, device: torch.device) -> torch.Tensor:
    """Unit-norm embeddings of every corpus id, [C, D], identical on all ranks (collective)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    per = math.ceil(len(corpus) / world)
    mine = corpus[rank * per:(rank + 1) * per]
    mine = np.concatenate([mine, np.full(per - len(mine), corpus[0])])  # equal sizes for all_gather
    kjt = item_kjt(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64), mine).to(device)
    rows = model.ec(kjt)["neg"].values()
    if world > 1:
        parts = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(parts, rows.contiguous())
        rows = torch.cat(parts)
    return normalize(rows[:len(corpus)])


def corpus_columns(corpus: np.ndarray, device: torch.device) -> torch.Tensor:
    """item id -> its column in the [C, D] corpus table: [max id + 1] long, -1 off the corpus."""
    column = torch.full((int(corpus.max()) + 1,), -1, dtype=torch.long, device=device)
    column[torch.from_numpy(corpus).to(device)] = torch.arange(len(corpus), device=device)
    return column


@torch.no_grad()
def evaluate_split(model: RetrievalModel, reader: SplitReader, corpus: np.ndarray, ks: list[int],
                   device: torch.device) -> EvalResult:
    """HR/NDCG/MRR of every user's target (the last token of its window) against the whole corpus.

    `model` is the unwrapped module (DMP's `.module`); collective: call on all ranks together.
    The result is the metrics dict, carrying every user's (user, target, rank, metrics) in `.rows`.
    """
    was_training = model.training
    model.eval()
    table = item_table(model, corpus, device)  # [C, D]
    column = corpus_columns(corpus, device)
    metrics = RankingMetrics(ks, device)
    for _, window in reader.batches():
        batch = eval_batch(window).to(device)
        seq = model.ec(batch.ids)["seq"]
        lengths = seq.lengths().long()
        user = model.head.last_states(seq.values(), lengths, batch.timestamps, batch.actions,
                                      batch.host_lengths)  # [B, D]
        ids = batch.ids["seq"].values()
        is_target = torch.zeros_like(ids, dtype=torch.bool)
        is_target[torch.cumsum(lengths, 0) - 1] = True
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=ids.numel())
        seen = ~is_target  # the history window: filtered out of the ranking
        ranks = target_ranks(user @ table.T, column[ids[is_target]], rows[seen], column[ids[seen]])
        metrics.update(ranks, batch.weights, batch.users, ids[is_target])
    model.train(was_training)
    return EvalResult(metrics.compute(), metrics.per_user())
