"""The feature schema: one declarative description read by data, models and the planner.

Tables and features are separate so several features can read one table (the target item id
and the item history share the item table). Routing rule, fixed here so every consumer agrees:
a table read by any `sequence` feature lives in the EmbeddingCollection (jagged, unpooled), and
every feature on it - sequence or sparse - travels in the `sequence` KJT; all other sparse
features travel in the `sparse` KJT and are pooled by the EmbeddingBagCollection.

A config names its schema inline or by file (`inline_schema`): configs over one dataset share
one file and state only how they differ from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trec_rank.config.typed import ConfigError, check_min, from_dict, read_yaml

FeatureKind = Literal["sparse", "sequence", "dense", "label"]
# Names become torch module keys and TorchRec feature/table names: no '.', '/', spaces.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_name(name: str, key: str) -> None:
    if not _NAME.match(name):
        raise ConfigError(f"{key}.name: '{name}' must be letters, digits and '_' (it names modules and "
                          f"metrics), e.g. '{re.sub(r'[^A-Za-z0-9_]', '_', name) or 'x'}'")
OovPolicy = Literal["error", "hash", "oov_row"]


@dataclass
class TableConfig:
    """One embedding table. `num_embeddings` is the id range [0, num_embeddings)."""

    name: str
    num_embeddings: int
    embedding_dim: int

    def post_load(self, key: str) -> None:
        _check_name(self.name, key)
        check_min(self, key, 1, "num_embeddings", "embedding_dim")


@dataclass
class FeatureConfig:
    """One input column.

    sparse: int64 (single id) or list<int64> (multi-valued ids), pooled with `pooling`.
    sequence: list<int64> of ids in time order; the last `max_len` are kept; `side` maps a side
      name (e.g. timestamp, rating) to a list column aligned element by element with the ids.
    dense: one float column. label: one numeric column of 0/1, a binary training target.
    `oov` decides ids outside [0, num_embeddings): `error` rejects the data, `hash` takes the id
    modulo num_embeddings, `oov_row` sends it to one extra row appended to the table.
    With `hash`, ids may also be strings (or list<string>): each is hashed with BLAKE2b-64 and
    taken modulo num_embeddings (trec_rank/data/convert.py), and negative integer ids are mapped too.
    Under `error` and `oov_row` negative ids are rejected: they signal a broken upstream join.
    """

    name: str
    kind: FeatureKind
    column: str = ""
    table: str = ""
    pooling: Literal["sum", "mean"] = "sum"
    max_len: int = 0
    side: dict[str, str] = field(default_factory=dict)
    oov: OovPolicy = "error"

    def post_load(self, key: str) -> None:
        _check_name(self.name, key)
        if not self.column:
            self.column = self.name
        has_table = self.kind in ("sparse", "sequence")
        if has_table and not self.table:
            raise ConfigError(f"{key}.table: a {self.kind} feature needs an embedding table")
        if not has_table and self.table:
            raise ConfigError(f"{key}.table: a {self.kind} feature has no embedding table")
        if self.kind == "sequence" and self.max_len < 1:
            raise ConfigError(f"{key}.max_len: a sequence feature needs max_len >= 1")
        check_min(self, key, 0, "max_len")
        if self.side and self.kind != "sequence":
            raise ConfigError(f"{key}.side: only sequence features have side columns")


@dataclass
class Schema:
    tables: list[TableConfig]
    features: list[FeatureConfig]

    def post_load(self, key: str) -> None:
        key = key or "schema"
        tables = [t.name for t in self.tables]
        dup = {n for n in tables if tables.count(n) > 1}
        if dup:
            raise ConfigError(f"{key}.tables: duplicate table name(s) {sorted(dup)}")
        names = [f.name for f in self.features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"{key}.features: duplicate feature name(s) {sorted(dup)}")
        for i, f in enumerate(self.features):
            if f.table and f.table not in tables:
                raise ConfigError(f"{key}.features[{i}].table: unknown table '{f.table}' "
                                  f"(tables: {', '.join(tables)})")
        seq_tables = {f.table for f in self.features if f.kind == "sequence"}
        dims = {t.embedding_dim for t in self.tables if t.name in seq_tables}
        if len(dims) > 1:
            raise ConfigError(f"{key}.tables: tables read by sequence features share one "
                              f"EmbeddingCollection and need one embedding_dim, got {sorted(dims)}")
        for name in tables:
            pools = {f.pooling for f in self.features if f.table == name and f.kind == "sparse"}
            if len(pools) > 1 and name not in seq_tables:
                raise ConfigError(f"{key}.features: sparse features on table '{name}' disagree on "
                                  f"pooling {sorted(pools)}; TorchRec pools per table")
        if not self.labels and not self.features:
            raise ConfigError(f"{key}.features: empty")

    # ---- views every consumer uses -------------------------------------------------------
    def of_kind(self, kind: str) -> list[FeatureConfig]:
        return [f for f in self.features if f.kind == kind]

    @property
    def dense(self) -> list[FeatureConfig]:
        return self.of_kind("dense")

    @property
    def labels(self) -> list[FeatureConfig]:
        return self.of_kind("label")

    @property
    def sequence_tables(self) -> list[TableConfig]:
        names = {f.table for f in self.features if f.kind == "sequence"}
        return [t for t in self.tables if t.name in names]

    @property
    def pooled_tables(self) -> list[TableConfig]:
        seq = {t.name for t in self.sequence_tables}
        used = {f.table for f in self.features if f.kind == "sparse"}
        return [t for t in self.tables if t.name in used and t.name not in seq]

    @property
    def pooled_features(self) -> list[FeatureConfig]:
        """Features in the `sparse` KJT, looked up by the EmbeddingBagCollection."""
        seq = {t.name for t in self.sequence_tables}
        return [f for f in self.features if f.kind == "sparse" and f.table not in seq]

    @property
    def sequence_features(self) -> list[FeatureConfig]:
        """Features in the `sequence` KJT (jagged, looked up by the EmbeddingCollection)."""
        seq = {t.name for t in self.sequence_tables}
        return [f for f in self.features if f.kind in ("sparse", "sequence") and f.table in seq]

    def table(self, name: str) -> TableConfig:
        return next(t for t in self.tables if t.name == name)

    def feature(self, name: str) -> FeatureConfig:
        for f in self.features:
            if f.name == name:
                return f
        raise ConfigError(f"unknown feature '{name}' (features: {', '.join(f.name for f in self.features)})")

    def table_rows(self, name: str) -> int:
        """Rows to allocate: num_embeddings, plus one shared OOV row if any feature asks for it."""
        extra = any(f.table == name and f.oov == "oov_row" for f in self.features)
        return self.table(name).num_embeddings + int(extra)


@dataclass
class SchemaFile:
    """`schema: {include: FILE, drop: [...], tables: [...], features: [...]}`: FILE's schema without the
    dropped features, then the listed tables and features. FILE is relative to the file naming it and
    may include another; `schema: FILE` is the same with nothing dropped or added."""

    include: str
    drop: list[str] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    features: list[dict[str, Any]] = field(default_factory=list)


def inline_schema(raw: Any, base: Path, key: str = "schema") -> Any:
    """Schema files expanded into the inline mapping {tables, features} that `Schema` reads."""
    if isinstance(raw, str):
        raw = {"include": raw}
    if not isinstance(raw, dict) or "include" not in raw:
        return raw
    spec = from_dict(SchemaFile, raw, key)
    path = base / spec.include
    if not path.is_file():
        raise ConfigError(f"{key}.include: schema file not found: {path}")
    inner = inline_schema(read_yaml(path), path.parent, f"{key}.include ({path})")
    features = inner.get("features", [])
    names = [f.get("name") if isinstance(f, dict) else None for f in features]
    for i, name in enumerate(spec.drop):
        if name not in names:
            raise ConfigError(f"{key}.drop[{i}]: '{name}' is not a feature of {path}")
    return {"tables": [*inner.get("tables", []), *spec.tables],
            "features": [f for f, n in zip(features, names, strict=True) if n not in spec.drop] + spec.features}
