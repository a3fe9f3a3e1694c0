"""Typed params of the feature encoder's parts (DIN attention, feedback, L2, HSTU tokens); here, not
beside the modules that read them, so a config is typed at load without importing model code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trec_rank.config.schema import Schema
from trec_rank.config.typed import ConfigError, check_min

Activation = Literal["dice", "prelu", "relu"]
Interaction = Literal["query", "key", "diff", "prod", "outer"]


@dataclass
class AttentionParams:
    """hidden/activation: the activation unit's MLP (paper: 80-40, Dice). interaction: the terms
    concatenated per behaviour; the default is q, k, q - k, q * k. "outer" adds the outer product
    q k^T of the paper's figure: flattened (D*D features) with outer_dim 0, or reduced to outer_dim
    bilinear forms q^T W_r k, i.e. the flattened product through a learned projection."""

    hidden: list[int] = field(default_factory=lambda: [80, 40])
    activation: Activation = "dice"
    interaction: list[Interaction] = field(default_factory=lambda: ["query", "key", "diff", "prod"])
    outer_dim: int = 0
    attention_norm: Literal["none", "softmax"] = "none"

    def post_load(self, key: str) -> None:
        if not self.interaction:
            raise ConfigError(f"{key}.interaction: needs at least one term")
        if len(set(self.interaction)) != len(self.interaction):
            raise ConfigError(f"{key}.interaction: repeated term in {self.interaction}")
        check_min(self, key, 0, "outer_dim")


@dataclass
class FeedbackParams:
    """Switch `enabled` off for the ablation. Feature names refer to the schema: `user` features
    (any sparse ones), `history` (all behaviours, mean pooled into u; empty: u from the user
    features only), `positive`/`negative` sequences and the `target` item, which must share the
    positive/negative table's embedding width."""

    enabled: bool = False
    user: list[str] = field(default_factory=list)
    history: str = ""
    positive: str = ""
    negative: str = ""
    target: str = ""
    hidden: list[int] = field(default_factory=lambda: [64])
    similarity: Literal["cosine", "dot"] = "cosine"
    pooling: Literal["mean", "items"] = "mean"
    tau: float = 0.5
    weight: float = 0.1
    table_grad_scale: float = 1.0

    def post_load(self, key: str) -> None:
        if not self.enabled:
            return
        for name in ("positive", "negative", "target"):
            if not getattr(self, name):
                raise ConfigError(f"{key}.{name}: required when feedback is enabled")
        if not self.user and not self.history:
            raise ConfigError(f"{key}.user: u needs user features or a history")
        if self.tau <= 0:
            raise ConfigError(f"{key}.tau: must be > 0, got {self.tau}")
        check_min(self, key, 0, "weight")
        if not 0.0 <= self.table_grad_scale <= 1.0:
            raise ConfigError(f"{key}.table_grad_scale: must be in [0, 1], got {self.table_grad_scale}")


@dataclass
class L2Params:
    """weight: lambda (0 switches the regulariser off); tables: which tables (empty: every table)."""

    weight: float = 0.0
    tables: list[str] = field(default_factory=list)

    def post_load(self, key: str) -> None:
        check_min(self, key, 0, "weight")

    def counted_tables(self, schema: Schema, key: str = "model.params.encoder.l2") -> list[str]:
        """The tables whose id frequencies n_j the regulariser needs: the configured ones (or all)
        that some sparse or sequence feature reads, sorted."""
        known = [t.name for t in schema.tables]
        for i, t in enumerate(self.tables):
            if t not in known:
                raise ConfigError(f"{key}.tables[{i}]: unknown table '{t}' (tables: {', '.join(known)})")
        tables = self.tables or known
        return sorted({f.table for f in schema.features if f.kind in ("sparse", "sequence") and f.table in tables})


@dataclass
class HSTUConfig:
    """HSTU encoder hyperparameters (defaults: the reference ML-1M HSTU except dqk = dv = 64)."""

    num_blocks: int = 2
    num_heads: int = 1
    dqk: int = 64  # per-head query/key width
    dv: int = 64  # per-head value width
    input_dropout: float = 0.2  # on item embedding * sqrt(D) + position embedding
    linear_dropout: float = 0.2  # on u * LayerNorm(A v), before the output projection
    num_time_buckets: int = 128

    def post_load(self, key: str) -> None:
        check_min(self, key, 1, "num_blocks", "num_heads", "dqk", "dv", "num_time_buckets")
        for name in ("input_dropout", "linear_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{key}.{name}: must be in [0, 1), got {getattr(self, name)}")


@dataclass
class HSTUTokenParams:
    """What the target-aware encoder reads: history tokens (item + action embedding), then the target.

    `history` is a sequence feature and `target` a single-id feature on the same table (both in
    the EmbeddingCollection); `action_side`/`time_side` name side columns of `history` ('' = none).
    Action ids are side values in [0, num_actions); 0 is reserved for the target (action unknown).
    Shared by the `hstu` over-arch and the feature encoder's `hstu:` option (any tower stack).
    """

    encoder: HSTUConfig = field(default_factory=HSTUConfig)
    history: str = "hist_item_id"
    target: str = "item_id"
    action_side: str = "rating"
    time_side: str = "timestamp"
    num_actions: int = 6


@dataclass
class FeaturePair:
    target: str
    history: str


@dataclass
class KeySide:
    """A side column of a history (e.g. the behaviour's own rating) as side information of the key:
    values in [0, num_values) look up a small learned embedding of the key's width that is added to
    key_j. The query (the candidate) has no such value, so the unit can weigh a liked and a disliked
    similar behaviour differently, and the pooled output carries what the user thought of them."""

    history: str
    side: str
    num_values: int

    def post_load(self, key: str) -> None:
        check_min(self, key, 1, "num_values")


@dataclass
class AttentionGroup:
    """Histories attended together: query = concat(target embs), key_j = concat(history embs at j)
    (+ the key-side embeddings). The histories must be aligned element by element (e.g.
    hist_item_id and hist_genre)."""

    pairs: list[FeaturePair]
    unit: AttentionParams = field(default_factory=AttentionParams)
    key_sides: list[KeySide] = field(default_factory=list)

    def post_load(self, key: str) -> None:
        if not self.pairs:
            raise ConfigError(f"{key}.pairs: needs at least one (target, history) pair")


@dataclass
class EncoderParams:
    history_pooling: Literal["mean", "sum"] = "mean"
    attention: list[AttentionGroup] = field(default_factory=list)
    feedback: FeedbackParams = field(default_factory=FeedbackParams)
    l2: L2Params = field(default_factory=L2Params)
    hstu: HSTUTokenParams | None = None  # target-aware HSTU over [history..., target]: one [B, D] part


@dataclass
class SASRecConfig:
    """SASRec retrieval encoder hyperparameters (defaults: the reference ML-1M SASRec)."""

    num_blocks: int = 2
    num_heads: int = 1
    ffn_dim: int = 0  # 0: the embedding dim (the reference's ffn_hidden_dim = D)
    dropout: float = 0.2  # input, attention-weight and FFN dropout

    def post_load(self, key: str) -> None:
        check_min(self, key, 1, "num_blocks", "num_heads")
        if self.ffn_dim < 0:
            raise ConfigError(f"{key}.ffn_dim: must be >= 0, got {self.ffn_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout: must be in [0, 1), got {self.dropout}")
