"""Retrieval model: sharded item EmbeddingCollection + sequence encoder (HSTU/SASRec) + sampled softmax.

`RetrievalModel.forward(batch)` hands the EmbeddingCollection a plain batch attribute
(`self.ec(batch.ids)`) and everything else to `SequenceHead`, one module without sharded children,
which TrainPipelineSparseDist's tracer treats as a leaf. The same head encodes users at eval
time. User and item embeddings are L2-normalised (eps 1e-6) before every dot product.

Action-aware models (`data.action_column`, e.g. the ratings) give every history token the action
the user took on it, with the ranking HSTU's token construction (`hstu.action_tokens`: item
embedding + action embedding) in front of either encoder, so HSTU and SASRec read the same tokens.
Candidates (positives, negatives, the corpus at eval) stay plain item embeddings: the action on
an item is known only once the user has seen it.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingCollection
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor

from trec_rank.config.encoder import HSTUConfig
from trec_rank.models.hstu import HSTUEncoder, action_tokens
from trec_rank.models.sasrec import SASRecEncoder
from trec_rank.retrieval.batch import FEATURES, RetrievalBatch
from trec_rank.retrieval.config import ITEM_TABLE, RetrievalConfig
from trec_rank.retrieval.loss import sampled_softmax_loss


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


def next_item_split(lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged rows of tokens -> (input index [P], target index [P]): tokens[:-1] and tokens[1:] of every row.

    lengths [B] (each >= 1), total = sum(lengths) = the token values' row count, read off their shape;
    P = total - B. A stable sort moving each row's last (first) position behind all others selects the
    rest without `nonzero`, whose data-dependent size would need a host sync every step.
    """
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.long())
    first = torch.zeros(total, dtype=torch.int8, device=lengths.device)
    last = torch.zeros_like(first)
    first[offsets[:-1]] = 1
    last[offsets[1:] - 1] = 1
    pairs = total - lengths.numel()
    return torch.argsort(last, stable=True)[:pairs], torch.argsort(first, stable=True)[:pairs]


class ActionEmbedding(nn.Module):
    """[num_actions, D] action table (a dense parameter, like the ranking HSTU's); row 0 = unknown."""

    def __init__(self, num_actions: int, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_actions, dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, std=0.02)  # the ranking HSTU's action init, the item table's scale


class SequenceHead(nn.Module):
    """Jagged item embeddings -> user states -> loss (training) or last-position user embeddings (eval)."""

    def __init__(self, encoder: nn.Module, temperature: float, action: ActionEmbedding | None = None) -> None:
        super().__init__()
        self.encoder, self.temperature, self.action = encoder, temperature, action

    def user_states(self, tokens: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor,
                    actions: torch.Tensor | None = None, host_lengths: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [T, D], lengths [B], timestamps [T], actions [T] (action-aware heads only),
        host_lengths [B] (the lengths on the CPU, optional: the encoder then plans without a device read)
        -> (unit-norm states [P, D], target index [P]).

        State p reads tokens (with their actions) up to its position and queries at the next token's
        timestamp; the next token's own action never enters it.
        """
        inp, tgt = next_item_split(lengths, tokens.shape[0])
        x = tokens[inp]
        if self.action is not None:
            assert actions is not None and actions.shape[0] == tokens.shape[0], "actions must align with tokens"
            x = action_tokens(x, self.action.weight, actions[inp])
        out = self.encoder(x, lengths - 1, timestamps[inp], timestamps[tgt],
                           None if host_lengths is None else host_lengths - 1)
        return normalize(out), tgt

    def last_states(self, tokens: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor,
                    actions: torch.Tensor | None = None, host_lengths: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Each row's user embedding for its last token (the eval target): [B, D] unit norm."""
        states, _ = self.user_states(tokens, lengths, timestamps, actions, host_lengths)
        return states[torch.cumsum(lengths.long() - 1, 0) - 1]

    def forward(self, emb: dict[str, JaggedTensor], timestamps: torch.Tensor, neg_index: torch.Tensor,
                hit: torch.Tensor, weights: torch.Tensor, actions: torch.Tensor | None = None,
                host_lengths: torch.Tensor | None = None) -> torch.Tensor:
        seq, cand = emb["seq"], normalize(emb["neg"].values())
        lengths = seq.lengths()
        user, tgt = self.user_states(seq.values(), lengths, timestamps, actions, host_lengths)
        pos = normalize(seq.values()[tgt])
        pos_weights = torch.repeat_interleave(weights, lengths.long() - 1, output_size=tgt.numel())
        return sampled_softmax_loss(user, pos, cand, neg_index, hit, pos_weights, self.temperature)


class RetrievalModel(nn.Module):
    """batch -> (loss, (loss.detach(),)), TorchRec's train-pipeline convention."""

    def __init__(self, ec: EmbeddingCollection, head: SequenceHead) -> None:
        super().__init__()
        self.ec, self.head = ec, head

    def forward(self, batch: RetrievalBatch) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        emb = self.ec(batch.ids)
        loss = self.head(emb, batch.timestamps, batch.neg_index, batch.hit, batch.weights, batch.actions,
                         batch.host_lengths)
        return loss, (loss.detach(),)


def build_encoder(cfg: RetrievalConfig, device: torch.device) -> nn.Module:
    enc = cfg.model.typed_params
    if isinstance(enc, HSTUConfig):
        return HSTUEncoder(cfg.item.embedding_dim, cfg.data.max_seq_len, enc, device)
    return SASRecEncoder(cfg.item.embedding_dim, cfg.data.max_seq_len, enc, device)


def build_retrieval_model(cfg: RetrievalConfig, device: torch.device | None = None) -> RetrievalModel:
    """On `meta` by default: DMP shards the table and materialises the rest (reset_parameters)."""
    device = device or torch.device("meta")
    table = EmbeddingConfig(name=ITEM_TABLE, num_embeddings=cfg.item.num_embeddings,
                            embedding_dim=cfg.item.embedding_dim, feature_names=list(FEATURES),
                            init_fn=partial(nn.init.normal_, std=0.02))  # the reference's item init
    ec = EmbeddingCollection(tables=[table], device=device)
    action = ActionEmbedding(cfg.data.num_actions, cfg.item.embedding_dim, device) if cfg.data.action_column else None
    return RetrievalModel(ec, SequenceHead(build_encoder(cfg, device), cfg.loss.temperature, action))
