"""The shared feature encoder: sparse/sequence/dense inputs -> one [B, out_dim] vector (+ aux loss).

Every model in this package (DIN, the multi-task towers, ESMM) sits on top of it, so the same
options compose everywhere: DIN target attention over (target, history) feature groups, the
explicit-feedback user vector, and the mini-batch-aware L2. With none of them it is the base
model's input: pooled EBC features, pooled EC features, dense features.

Layout of the output (concatenated along dim 1, all [B, *], padded-free):
  pooled EBC values | each EC feature not attended (sum/mean pooled) | one attention output per
  group | dense | s(u, target) when feedback is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.typed import ConfigError
from trec_rank.data.batch import Batch
from trec_rank.models.attention import AttentionParams, TargetAttention
from trec_rank.models.embeddings import pool, pooled_dim, pooled_values
from trec_rank.models.feedback import ExplicitFeedback, FeedbackParams
from trec_rank.models.frequency import id_counts, train_split_dir
from trec_rank.models.regularizer import L2Params, MiniBatchL2

KEY = "model.params.encoder"


@dataclass
class FeaturePair:
    target: str
    history: str


@dataclass
class AttentionGroup:
    """Histories attended together: query = concat(target embs), key_j = concat(history embs at j).
    The histories must be aligned element by element (e.g. hist_item_id and hist_genre)."""

    pairs: list[FeaturePair]
    unit: AttentionParams = field(default_factory=AttentionParams)

    def post_load(self, key: str) -> None:
        if not self.pairs:
            raise ConfigError(f"{key}.pairs: needs at least one (target, history) pair")


@dataclass
class EncoderParams:
    history_pooling: Literal["mean", "sum"] = "mean"
    attention: list[AttentionGroup] = field(default_factory=list)
    feedback: FeedbackParams = field(default_factory=FeedbackParams)
    l2: L2Params = field(default_factory=L2Params)


class Encoded(NamedTuple):
    h: torch.Tensor  # [B, out_dim]
    aux: torch.Tensor | None  # scalar auxiliary loss (training only), None when there is none


class FeatureEncoder(nn.Module):
    def __init__(self, cfg: ExperimentConfig, params: EncoderParams, device: torch.device) -> None:
        super().__init__()
        schema = cfg.schema
        self.pooled_names = [f.name for f in schema.pooled_features]
        self.ec_names = {f.name for f in schema.sequence_features}
        self.dims = {f.name: schema.table(f.table).embedding_dim for f in schema.features if f.table}
        self.pooling = {f.name: (f.pooling if f.kind == "sparse" else params.history_pooling)
                        for f in schema.features if f.table}
        self.groups = [self._check_group(g, f"{KEY}.attention[{i}]") for i, g in enumerate(params.attention)]
        attended = {h for _, hists in self.groups for h in hists}
        self.pooled_ec = [f.name for f in schema.sequence_features if f.name not in attended]
        self.attention = nn.ModuleList(
            [TargetAttention(sum(self.dims[h] for h in hists), g.unit, device)
             for (_, hists), g in zip(self.groups, params.attention, strict=True)])
        self.out_dim = (pooled_dim(schema) + sum(self.dims[n] for n in self.pooled_ec)
                        + sum(a.dim for a in self.attention) + len(schema.dense))
        self.fb_params, self.feedback = params.feedback, None
        if params.feedback.enabled:
            self.feedback = self._build_feedback(params.feedback, device)
            self.out_dim += 1
        self.l2 = None
        if params.l2.weight > 0:
            self.l2 = MiniBatchL2(schema, params.l2, partial(id_counts, schema, train_split_dir(cfg)), f"{KEY}.l2")

    @property
    def needs_batch(self) -> bool:
        """Aux losses need the batch in training: ids for the L2, row weights to skip padding rows."""
        return self.l2 is not None or self.feedback is not None

    def _feature(self, name: str, key: str) -> str:
        if name not in self.dims:
            raise ConfigError(f"{key}: '{name}' is not a sparse or sequence feature "
                              f"(known: {', '.join(sorted(self.dims))})")
        return name

    def _check_group(self, group: AttentionGroup, key: str) -> tuple[list[str], list[str]]:
        targets = [self._feature(p.target, f"{key}.pairs[{i}].target") for i, p in enumerate(group.pairs)]
        hists = [self._feature(p.history, f"{key}.pairs[{i}].history") for i, p in enumerate(group.pairs)]
        for i, (t, h) in enumerate(zip(targets, hists, strict=True)):
            if h not in self.ec_names:
                raise ConfigError(f"{key}.pairs[{i}].history: '{h}' is not looked up by the "
                                  "EmbeddingCollection (it must be a sequence feature or share its table)")
            if self.dims[t] != self.dims[h]:
                raise ConfigError(f"{key}.pairs[{i}]: target '{t}' ({self.dims[t]}-d) and history '{h}' "
                                  f"({self.dims[h]}-d) need one embedding width")
        return targets, hists

    def _build_feedback(self, p: FeedbackParams, device: torch.device) -> ExplicitFeedback:
        key = f"{KEY}.feedback"
        for i, name in enumerate(p.user):
            self._feature(name, f"{key}.user[{i}]")
        for role in ("history", "positive", "negative"):
            if self._feature(getattr(p, role), f"{key}.{role}") not in self.ec_names:
                raise ConfigError(f"{key}.{role}: '{getattr(p, role)}' must be looked up by the "
                                  "EmbeddingCollection")
        item_dim = self.dims[self._feature(p.target, f"{key}.target")]
        for role in ("positive", "negative"):
            if self.dims[getattr(p, role)] != item_dim:
                raise ConfigError(f"{key}.{role}: needs the target's embedding width {item_dim}")
        user_dim = sum(self.dims[n] for n in p.user) + self.dims[p.history]
        return ExplicitFeedback(user_dim, item_dim, p, device)

    def _embed(self, name: str, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None
               ) -> torch.Tensor:
        """[B, D] of one feature, pooled with its own pooling, whichever collection looked it up."""
        if name in self.ec_names:
            return pool(jagged[name], self.pooling[name])
        return pooled[name]

    def _attend(self, unit: TargetAttention, targets: list[str], hists: list[str], pooled: KeyedTensor | None,
                jagged: dict[str, JaggedTensor]) -> torch.Tensor:
        lengths = jagged[hists[0]].lengths()
        for h in hists[1:]:
            if not torch.equal(jagged[h].lengths(), lengths):
                raise ValueError(f"attention histories '{hists[0]}' and '{h}' are not aligned "
                                 "(different lengths in some row); they must be parallel lists")
        query = torch.cat([self._embed(t, pooled, jagged) for t in targets], dim=1)
        keys = torch.cat([jagged[h].values() for h in hists], dim=1)
        return unit(query, keys, lengths)

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None, dense: torch.Tensor,
                batch: Batch | None = None) -> Encoded:
        parts = [] if pooled is None else [pooled_values(pooled, self.pooled_names)]
        parts += [pool(jagged[n], self.pooling[n]) for n in self.pooled_ec]
        for unit, (targets, hists) in zip(self.attention, self.groups, strict=True):
            parts.append(self._attend(unit, targets, hists, pooled, jagged))
        parts.append(dense)
        aux = []
        if self.feedback is not None:
            p = self.fb_params
            user_in = torch.cat([self._embed(n, pooled, jagged) for n in [*p.user, p.history]], dim=1)
            feature, fb_aux = self.feedback(
                user_in, self._embed(p.target, pooled, jagged),
                pool(jagged[p.positive], "mean"), jagged[p.positive].lengths(),
                pool(jagged[p.negative], "mean"), jagged[p.negative].lengths(),
                None if batch is None else batch.weights)
            parts.append(feature)
            if fb_aux is not None:
                aux.append(fb_aux)
        if self.l2 is not None and self.training and batch is not None:
            aux.append(self.l2(pooled, jagged, batch))
        return Encoded(torch.cat(parts, dim=1), sum(aux) if aux else None)
