"""SASRec (Kang & McAuley 2018), the HSTU paper's baseline, as a jagged-in/jagged-out sequence encoder.

It follows the reference's SASRec (generative-recommenders research/modeling/sequential/sasrec.py):
the same input preprocessing as HSTU (item * sqrt(D) + absolute position, dropout), then per block
    Q = LayerNorm(x);  x = Q + MHA(Q, x, x) (causal softmax);  x = LayerNorm(x);  x = x + FFN(x)
and a final LayerNorm. Softmax attention needs the whole row at once, so the blocks run on padded
[B, L, D] (L = the batch's longest row); causal masking alone keeps padding (right of each row)
out of every real position. It takes the same arguments as HSTUEncoder so retrieval can swap them;
timestamps are unused (SASRec has no time signal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trec_rank.config.encoder import SASRecConfig
from trec_rank.config.typed import ConfigError
from trec_rank.models.hstu import SequenceInput, jagged_positions


class SASRecBlock(nn.Module):
    """Pre-norm causal self-attention + position-wise FFN on padded [B, L, D]."""

    def __init__(self, dim: int, cfg: SASRecConfig, device: torch.device | None = None) -> None:
        super().__init__()
        if dim % cfg.num_heads:
            raise ConfigError(f"model.params.num_heads: {cfg.num_heads} does not divide the embedding "
                              f"dim {dim}")
        self.heads, self.p = cfg.num_heads, cfg.dropout
        self.attn_norm = nn.LayerNorm(dim, eps=1e-8, device=device)
        self.qkv = nn.Linear(dim, 3 * dim, device=device)
        self.out = nn.Linear(dim, dim, device=device)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-8, device=device)
        self.ffn1 = nn.Linear(dim, cfg.ffn_dim or dim, device=device)
        self.ffn2 = nn.Linear(cfg.ffn_dim or dim, dim, device=device)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q_in = self.attn_norm(x)
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, bk, bv = self.qkv.bias.chunk(3)
        q, k, v = (F.linear(t, w, bias).view(b, length, self.heads, -1).transpose(1, 2)
                   for t, w, bias in ((q_in, wq, bq), (x, wk, bk), (x, wv, bv)))
        p = self.p if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = q_in + self.out(a.transpose(1, 2).reshape(b, length, dim))
        x = self.ffn_norm(x)
        return x + self.dropout(self.ffn2(self.dropout(F.relu(self.ffn1(x)))))


class SASRecEncoder(nn.Module):
    """Jagged item embeddings -> jagged SASRec outputs (not normalised: retrieval L2-normalises them)."""

    def __init__(self, dim: int, max_len: int, cfg: SASRecConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.input = SequenceInput(dim, max_len, cfg.dropout, device)
        self.blocks = nn.ModuleList(SASRecBlock(dim, cfg, device) for _ in range(cfg.num_blocks))
        self.final_norm = nn.LayerNorm(dim, eps=1e-8, device=device)

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor,
                query_ts: torch.Tensor, host_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """emb [N, D] jagged, lengths [B] -> [N, D] jagged (timestamps, query_ts: unused).

        host_lengths: `lengths` on the CPU when the caller has them: the padded length is read there,
        not off the device (a sync per step on a GPU)."""
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.long())
        known = host_lengths if host_lengths is not None else lengths
        length = int(known.max()) if known.numel() else 0
        x = self.input(emb, jagged_positions(offsets, emb.shape[0]))
        x = torch.ops.fbgemm.jagged_to_padded_dense(x, [offsets], [length], 0.0)
        for block in self.blocks:
            x = block(x)
        x = torch.ops.fbgemm.dense_to_jagged(x, [offsets], total_L=emb.shape[0])[0]
        return self.final_norm(x)
