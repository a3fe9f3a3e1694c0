"""The shared feature encoder: sparse/sequence/dense inputs -> one [B, out_dim] vector (+ aux loss).

Every model in this package (DIN, the multi-task towers, ESMM) sits on top of it, so the same
options compose everywhere: DIN target attention over (target, history) feature groups (keys may
carry the behaviour's side columns, e.g. its rating, as learned embeddings), the explicit-feedback
user vector, the target-aware HSTU (`hstu:`, the history with its actions then the candidate, see
`hstu.HSTUTargetEncoder`), and the mini-batch-aware L2. With none of them it is the base
model's input: pooled EBC features, pooled EC features, dense features.

Layout of the output (concatenated along dim 1, all [B, *], padded-free):
  pooled EBC values | each EC feature not attended (sum/mean pooled) | one attention output per
  group | the HSTU output at the target token when `hstu` is set | dense | s(u, target) when
  feedback is on.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from trec_rank.config.encoder import AttentionGroup, EncoderParams, FeedbackParams, KeySide
from trec_rank.config.schema import Schema
from trec_rank.config.typed import ConfigError
from trec_rank.data.batch import Batch
from trec_rank.models.attention import TargetAttention
from trec_rank.models.embeddings import pool, pooled_dim, pooled_values
from trec_rank.models.feedback import ExplicitFeedback
from trec_rank.models.hstu import HSTUTargetEncoder
from trec_rank.models.regularizer import MiniBatchL2

KEY = "model.params.encoder"


class SideEmbedding(nn.Embedding):
    """A key-side embedding that starts at zero: the model starts as plain DIN (nn.Embedding's
    N(0, 1) would swamp item rows initialised at ~1/sqrt(rows)) and learns the side's offsets."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class Encoded(NamedTuple):
    h: torch.Tensor  # [B, out_dim]
    aux: torch.Tensor | None  # scalar auxiliary loss (training only), None when there is none


class FeatureEncoder(nn.Module):
    def __init__(self, schema: Schema, params: EncoderParams, device: torch.device) -> None:
        super().__init__()
        self.pooled_names = [f.name for f in schema.pooled_features]
        self.ec_names = {f.name for f in schema.sequence_features}
        self.dims = {f.name: schema.table(f.table).embedding_dim for f in schema.features if f.table}
        self.pooling = {f.name: (f.pooling if f.kind == "sparse" else params.history_pooling)
                        for f in schema.features if f.table}
        self.groups = [self._check_group(g, f"{KEY}.attention[{i}]") for i, g in enumerate(params.attention)]
        attended = {h for _, hists in self.groups for h in hists}
        self.pooled_ec = [f.name for f in schema.sequence_features if f.name not in attended]
        units = [TargetAttention(sum(self.dims[h] for h in hists), g.unit, device)
                 for (_, hists), g in zip(self.groups, params.attention, strict=True)]
        self.attention = nn.ModuleList(units)
        self.key_sides = [[self._check_side(s, hists, schema, f"{KEY}.attention[{i}].key_sides[{j}]")
                           for j, s in enumerate(g.key_sides)]
                          for i, ((_, hists), g) in enumerate(zip(self.groups, params.attention, strict=True))]
        self.side_embeddings = nn.ModuleList(
            [nn.ModuleList([SideEmbedding(s.num_values, unit.dim, device=device) for s in g.key_sides])
             for unit, g in zip(units, params.attention, strict=True)])
        self.out_dim = (pooled_dim(schema) + sum(self.dims[n] for n in self.pooled_ec)
                        + sum(a.dim for a in units) + len(schema.dense))
        self.fb_params, self.feedback = params.feedback, None
        if params.feedback.enabled:
            self.feedback = self._build_feedback(params.feedback, device)
            self.out_dim += 1
        self.hstu = None
        if params.hstu is not None:
            self.hstu = HSTUTargetEncoder.from_schema(schema, params.hstu, device, key=f"{KEY}.hstu")
            self.out_dim += self.dims[params.hstu.history]
        self.l2 = None
        if params.l2.weight > 0:
            self.l2 = MiniBatchL2(schema, params.l2, f"{KEY}.l2")

    @property
    def needs_batch(self) -> bool:
        """Aux losses need the batch in training (ids for the L2, row weights to skip padding rows);
        key sides and HSTU read the side columns it carries, in eval too."""
        return (self.l2 is not None or self.feedback is not None or any(self.key_sides) or self.hstu is not None
                or any(len(hists) > 1 for _, hists in self.groups))  # aligned histories: Batch.host_lengths

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

    def _check_side(self, side: KeySide, hists: list[str], schema: Schema, key: str) -> str:
        """-> the Batch.side key "<history>/<side>" (its values' range is checked by the loader:
        `config.models.side_bounds`)."""
        if side.history not in hists:
            raise ConfigError(f"{key}.history: '{side.history}' is not a history of this group "
                              f"({', '.join(hists)})")
        known = schema.feature(side.history).side
        if side.side not in known:
            raise ConfigError(f"{key}.side: '{side.history}' has no side '{side.side}' in the schema "
                              f"(its sides: {', '.join(sorted(known)) or 'none'})")
        return f"{side.history}/{side.side}"

    def _build_feedback(self, p: FeedbackParams, device: torch.device) -> ExplicitFeedback:
        key = f"{KEY}.feedback"
        for i, name in enumerate(p.user):
            self._feature(name, f"{key}.user[{i}]")
        for role in ("history", "positive", "negative") if p.history else ("positive", "negative"):
            if self._feature(getattr(p, role), f"{key}.{role}") not in self.ec_names:
                raise ConfigError(f"{key}.{role}: '{getattr(p, role)}' must be looked up by the "
                                  "EmbeddingCollection")
        item_dim = self.dims[self._feature(p.target, f"{key}.target")]
        for role in ("positive", "negative"):
            if self.dims[getattr(p, role)] != item_dim:
                raise ConfigError(f"{key}.{role}: needs the target's embedding width {item_dim}")
        user_dim = sum(self.dims[n] for n in self._user_inputs(p))
        return ExplicitFeedback(user_dim, item_dim, p, device)

    @staticmethod
    def _user_inputs(p: FeedbackParams) -> list[str]:
        return [*p.user, p.history] if p.history else list(p.user)

    def _embed(self, name: str, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None
               ) -> torch.Tensor:
        """[B, D] of one feature, pooled with its own pooling, whichever collection looked it up."""
        if name in self.ec_names:
            assert jagged is not None, name
            return pool(jagged[name], self.pooling[name])
        assert pooled is not None, name
        return pooled[name]

    def _attend(self, unit: TargetAttention, targets: list[str], hists: list[str], pooled: KeyedTensor | None,
                jagged: dict[str, JaggedTensor], sides: list[str] | None = None,
                side_embs: nn.ModuleList | None = None, batch: Batch | None = None) -> torch.Tensor:
        lengths = jagged[hists[0]].lengths()  # the group's histories are parallel: check_aligned
        query = torch.cat([self._embed(t, pooled, jagged) for t in targets], dim=1)
        keys = torch.cat([jagged[h].values() for h in hists], dim=1)  # [N, dim], jagged
        for name, emb in zip(sides or [], side_embs or [], strict=True):
            keys = keys + emb(self._side_values(name, keys.shape[0], batch))
        return unit(query, keys, lengths)

    @staticmethod
    def _side_values(name: str, n: int, batch: Batch | None) -> torch.Tensor:
        """The side column [N] aligned with the history's jagged values, as embedding indices."""
        if batch is None or name not in batch.side:
            raise ValueError(f"attention key side '{name}' is missing from the batch (is it declared as a "
                             "side column of the history in the schema?)")
        values = batch.side[name]
        assert values.shape[0] == n, f"side '{name}' has {values.shape[0]} values for {n} behaviours"
        return values.long()

    def check_aligned(self, jagged: dict[str, JaggedTensor], batch: Batch | None) -> None:
        """The histories of one attention group must be parallel lists (equal lengths in every row).

        Decided on the loader's host copies of the lengths (`Batch.host_lengths`), so it costs no device
        read (a stall per step on a GPU). It reads values, so it runs outside any graph: `forward` runs it
        eagerly; under `train.compile` the compiled forward's caller does (runtime/model.py); an exported
        program gives each group one value-count dimension instead and its callers check rows."""
        host = batch.host_lengths if batch is not None else {}
        for _, hists in self.groups:
            if len(hists) < 2:
                continue
            lens = [host[h] for h in hists] if all(h in host for h in hists) else [jagged[h].lengths() for h in hists]
            for h, other in zip(hists[1:], lens[1:], strict=True):
                if not torch.equal(other, lens[0]):
                    raise ValueError(f"attention histories '{hists[0]}' and '{h}' are not aligned "
                                     "(different lengths in some row); they must be parallel lists")

    def forward(self, pooled: KeyedTensor | None, jagged: dict[str, JaggedTensor] | None, dense: torch.Tensor,
                batch: Batch | None = None) -> Encoded:
        parts = [] if pooled is None else [pooled_values(pooled, self.pooled_names)]
        seq = {} if jagged is None else jagged  # None only without sequence features: nothing reads it
        if not torch.compiler.is_compiling():
            self.check_aligned(seq, batch)
        parts += [pool(seq[n], self.pooling[n]) for n in self.pooled_ec]
        for unit, (targets, hists), sides, embs in zip(self.attention, self.groups, self.key_sides,
                                                       self.side_embeddings, strict=True):
            assert isinstance(unit, TargetAttention) and isinstance(embs, nn.ModuleList)
            parts.append(self._attend(unit, targets, hists, pooled, seq, sides, embs, batch))
        if self.hstu is not None:
            assert batch is not None, "needs_batch is set when hstu is: RankingModel passes the batch"
            parts.append(self.hstu(jagged, batch.side, batch.host_lengths))  # [B, D] at the target tokens
        parts.append(dense)
        aux = []
        if self.feedback is not None:
            p = self.fb_params
            user_in = torch.cat([self._embed(n, pooled, jagged) for n in self._user_inputs(p)], dim=1)
            feature, fb_aux = self.feedback(user_in, self._embed(p.target, pooled, jagged), seq[p.positive],
                                            seq[p.negative], None if batch is None else batch.weights)
            parts.append(feature)
            if fb_aux is not None:
                aux.append(fb_aux)
        if self.l2 is not None and self.training and batch is not None:
            aux.append(self.l2(pooled, jagged, batch))
        return Encoded(torch.cat(parts, dim=1), sum(aux) if aux else None)
