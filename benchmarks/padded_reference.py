"""A padded, reference-layout implementation of the HSTU retrieval step: the speed baseline and a test oracle.

It computes exactly what `HSTUEncoder` + `SequenceHead` compute, with the same parameters, but laid
out the way the reference research code lays it out (generative-recommenders' research path;
docs/hstu.md states the equations):
  * the encoder runs every layer on padded [B, L, D] (LayerNorms, projections and gating on the
    padding too), rebuilds the relative bias in every layer, and un-pads once at the end;
  * the loss gathers each position's R negative embeddings into [P, R, D] and L2-normalises every
    gathered copy (the reference's per-position gather + normalisation, most of its step time).
`benchmarks/hstu.py` times it against the jagged path in the same run; tests check both agree.
It lives with the benchmarks, not in the package: nothing in trec-rank runs it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trec_rank.models.hstu import HSTUEncoder, pad_ints, time_buckets
from trec_rank.retrieval.batch import RetrievalBatch
from trec_rank.retrieval.model import RetrievalModel, next_item_split, normalize


def padded_hstu(enc: HSTUEncoder, emb: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor,
                query_ts: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as `enc(...)` (jagged [N, D] in and out); padded [B, L, D] inside."""
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.long())
    b, length = lengths.numel(), int(lengths.max())
    x = torch.ops.fbgemm.jagged_to_padded_dense(emb, [offsets], [length], 0.0)  # [B, L, D]
    dim = x.shape[-1]
    x = enc.input.dropout(x * math.sqrt(dim) + enc.input.weight[:length])
    query, keys = pad_ints(query_ts, offsets, length), pad_ints(timestamps, offsets, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=emb.device).tril()
    idx = torch.arange(length, device=emb.device)
    for layer in enc.layers:
        h, dqk, dv = layer.heads, layer.dqk, layer.dv
        uvqk = F.silu(F.layer_norm(x, (dim,), eps=1e-6) @ layer.uvqk)
        u, v, q, k = uvqk.split([h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        rel = idx.unsqueeze(0) - idx.unsqueeze(1) + layer.rab.max_len - 1
        buckets = time_buckets(query.unsqueeze(2) - keys.unsqueeze(1), layer.rab.num_buckets)
        rab = layer.rab.pos_w[rel] + layer.rab.ts_w[buckets]  # [B, L, L], rebuilt per layer
        q, k, v = (t.reshape(b, length, h, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
        attn = F.silu(q @ k.transpose(-1, -2) + rab.unsqueeze(1)) / layer.max_len * causal
        av = (attn @ v).transpose(1, 2).reshape(b, length, h * dv)
        y = u * F.layer_norm(av, (h * dv,), eps=1e-6)
        x = x + F.linear(layer.dropout(y), layer.out_w, layer.out_b)
    return torch.ops.fbgemm.dense_to_jagged(x, [offsets], total_L=emb.shape[0])[0]


def gathered_sampled_softmax(user: torch.Tensor, pos_raw: torch.Tensor, cand_raw: torch.Tensor,
                             neg_index: torch.Tensor, hit: torch.Tensor, weights: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """The reference's loss layout: user [P, D] unit norm; pos_raw [P, D], cand_raw [U, D] raw; neg_index,
    hit [P, R]; weights [P]. Every position's negatives are gathered to [P, R, D] and normalised there."""
    p, r = neg_index.shape
    neg = normalize(cand_raw[neg_index.reshape(-1)].reshape(p, r, -1))  # [P, R, D]
    pos_logit = (user * normalize(pos_raw)).sum(-1, keepdim=True)
    neg_logit = torch.einsum("pd,prd->pr", user, neg).masked_fill(hit, float("-inf"))
    nll = -F.log_softmax(torch.cat([pos_logit, neg_logit], dim=1) / temperature, dim=1)[:, 0]
    return (nll * weights).sum() / weights.sum().clamp(min=1.0)


def padded_step_loss(model: RetrievalModel, batch: RetrievalBatch) -> torch.Tensor:
    """The whole HSTU retrieval loss in the reference layout, with `model`'s own parameters: what
    `model(batch)[0]` computes through the jagged path."""
    emb = model.ec(batch.ids)
    seq, lengths = emb["seq"], emb["seq"].lengths()
    inp, tgt = next_item_split(lengths, seq.values().shape[0])
    user = normalize(padded_hstu(model.head.encoder, seq.values()[inp], lengths - 1, batch.timestamps[inp],
                                 batch.timestamps[tgt]))
    weights = torch.repeat_interleave(batch.weights, lengths.long() - 1)
    return gathered_sampled_softmax(user, seq.values()[tgt], emb["neg"].values(), batch.neg_index, batch.hit,
                                    weights, model.head.temperature)
