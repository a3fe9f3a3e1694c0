"""The exported program's inputs: a `Batch` as one flat, ordered tuple of plain tensors, and back inside it.

A deployable program takes tensors, not KeyedJaggedTensors or dicts, so a batch travels as (B rows):

    dense               float32 [B, n_dense]   padded-free: every row has every dense feature
    <feature>.values    int64   [N_f]          jagged ids of the feature, rows end to end (table rows,
                                               after the oov policy), first every pooled feature, then
                                               every sequence-KJT feature, each in the schema's order
    <feature>.lengths   int32   [B]            ids per row (sum = N_f)
    <feature>/<side>    int64   [N_f]          a side column, aligned element by element with its
                                               feature's values

One values tensor per feature rather than the KJT's concatenated values: each feature's value count
is then a dimension of the program, so a side column provably has its feature's length and histories
that a model attends together (parallel lists) provably have one length; with one concatenated
tensor torch.export sees the per-feature counts as unrelated data-dependent sizes and refuses those
checks. `FlatModel` rebuilds the two KJTs (with their per-key lengths known) and the side dict, runs
the model, and returns sigmoid probabilities in `outputs` order: exactly `trec-rank score`'s p_<key>.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from trec_rank.config.encoder import EncoderParams, HSTUTokenParams
from trec_rank.config.experiment import ExperimentConfig
from trec_rank.data.batch import Batch

EXAMPLE_ROWS = 4  # > 1: torch.export specialises sizes 0 and 1


@dataclass(frozen=True)
class Contract:
    pooled: list[str]  # features of the sparse KJT (EmbeddingBagCollection), in order
    sequence: list[str]  # features of the sequence KJT (EmbeddingCollection), in order
    side: list[list[str]]  # [Batch.side key "<feature>/<side>", feature], in order
    n_dense: int
    aligned: list[list[str]]  # groups of features whose rows the model requires to be equally long
    single: list[str]  # features the model requires to hold exactly one id per row (HSTU's target)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Contract:
        schema = cfg.schema
        side = [[f"{f.name}/{s}", f.name] for f in schema.features if f.kind in ("sparse", "sequence")
                for s in f.side]
        encoder = getattr(cfg.model.typed_params, "encoder", None)
        groups = encoder.attention if isinstance(encoder, EncoderParams) else []
        aligned = [sorted({p.history for p in g.pairs}) for g in groups]
        tokens = [t for t in (cfg.model.typed_params, getattr(encoder, "hstu", None)) if isinstance(t, HSTUTokenParams)]
        return cls([f.name for f in schema.pooled_features], [f.name for f in schema.sequence_features], side,
                   len(schema.dense), [a for a in aligned if len(a) > 1], sorted({t.target for t in tokens}))

    @classmethod
    def from_json(cls, blob: dict[str, Any]) -> Contract:
        return cls(**{k: blob[k] for k in ("pooled", "sequence", "side", "n_dense", "aligned", "single")})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dims(self) -> dict[str, str]:
        """feature -> the name of its value count: B for single-valued ones, one N per group of aligned ones."""
        out = {f: "B" if f in self.single else f"N_{f}" for f in [*self.pooled, *self.sequence]}
        for group in self.aligned:
            for f in group:
                out[f] = f"N_{group[0]}"
        return out

    def tensors(self) -> list[dict[str, Any]]:
        """The input tuple, entry by entry, for artifact.json: name, dtype, shape (symbolic), layout."""
        dims = self.dims()
        out: list[dict[str, Any]] = [{"name": "dense", "dtype": "float32", "shape": ["B", self.n_dense],
                                      "layout": "padded-free"}]
        for kjt, names in (("sparse", self.pooled), ("sequence", self.sequence)):
            for f in names:
                out.append({"name": f"{f}.values", "dtype": "int64", "shape": [dims[f]], "layout": "jagged",
                            "kjt": kjt})
                out.append({"name": f"{f}.lengths", "dtype": "int32", "shape": ["B"], "layout": "lengths",
                            "kjt": kjt})
        out += [{"name": key, "dtype": "int64", "shape": [dims[f]], "layout": f"jagged, aligned with {f}.values"}
                for key, f in self.side]
        return out

    def flatten(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Batch -> the input tuple (the KJTs cut per feature; dtypes as the contract states)."""
        out = [batch.dense.float()]
        for kjt, names in ((batch.sparse, self.pooled), (batch.sequence, self.sequence)):
            parts = kjt.to_dict() if names else {}
            for f in names:
                out += [parts[f].values().long(), parts[f].lengths().int()]
        out += [batch.side[key].long() for key, _ in self.side]
        return tuple(out)

    def dynamic_shapes(self) -> tuple[tuple[dict[int, Dim], ...]]:
        """B and every N free (one Dim per aligned group); export refuses any other relation it finds."""
        counts = {name: Dim(name, min=0) for name in set(self.dims().values()) - {"B"}}
        rows = counts["B"] = Dim("B", min=1)
        dims = self.dims()
        shapes: list[dict[int, Dim]] = [{0: rows}]
        for f in [*self.pooled, *self.sequence]:
            shapes += [{0: counts[dims[f]]}, {0: rows}]
        shapes += [{0: counts[dims[f]]} for _, f in self.side]
        return (tuple(shapes),)  # FlatModel.forward(*inputs): one variadic argument

    def example(self, max_lens: dict[str, int]) -> tuple[torch.Tensor, ...]:
        """Example inputs to trace with: EXAMPLE_ROWS rows, every value count distinct from B and from every
        other group's (so export cannot mistake a coincidence for a rule), lengths within max_len."""
        dims = self.dims()
        group_of = {name: i for i, name in enumerate(sorted(set(dims.values())))}
        out = [torch.zeros(EXAMPLE_ROWS, self.n_dense)]
        counts: dict[str, int] = {}
        for f in [*self.pooled, *self.sequence]:
            ones = torch.ones(EXAMPLE_ROWS, dtype=torch.int32)
            lengths = ones if dims[f] == "B" else self._lengths(group_of[dims[f]], max_lens.get(f, 0))
            counts[f] = int(lengths.sum())
            out += [torch.zeros(counts[f], dtype=torch.long), lengths]
        out += [torch.zeros(counts[f], dtype=torch.long) for _, f in self.side]
        return tuple(out)

    @staticmethod
    def _lengths(group: int, max_len: int) -> torch.Tensor:
        """Row lengths whose sum is EXAMPLE_ROWS + 2 + group (capped rows of at most max_len, when set)."""
        total = EXAMPLE_ROWS + 2 + group
        cap = max_len or total
        lengths = [0] * EXAMPLE_ROWS
        for i in range(total):  # round-robin, so a short max_len still fits
            lengths[i % EXAMPLE_ROWS] += 1
        assert max(lengths) <= cap, f"example lengths {lengths} exceed max_len {cap}"
        return torch.tensor(lengths, dtype=torch.int32)


def _kjt(names: list[str], values: list[torch.Tensor], lengths: list[torch.Tensor], rows: int,
         like: torch.Tensor) -> KeyedJaggedTensor:
    if not names:
        return KeyedJaggedTensor(keys=[], values=like.new_zeros(0, dtype=torch.long),
                                 lengths=like.new_zeros(0, dtype=torch.int32), stride=rows)
    return KeyedJaggedTensor(keys=names, values=torch.cat(values), lengths=torch.cat(lengths), stride=rows,
                             length_per_key=[v.shape[0] for v in values])


class FlatModel(nn.Module):
    """The ranking model behind the flat input tuple: (*inputs) -> probabilities, one [B] per output."""

    def __init__(self, model: nn.Module, contract: Contract, outputs: list[str]) -> None:
        super().__init__()
        self.model, self.contract, self.outputs = model, contract, outputs

    def batch(self, inputs: tuple[torch.Tensor, ...]) -> Batch:
        c = self.contract
        dense, rest = inputs[0], list(inputs[1:])
        rows = dense.shape[0]
        a, b = 2 * len(c.pooled), 2 * (len(c.pooled) + len(c.sequence))  # rest = pooled | sequence | side
        pooled, seq, side = rest[:a], rest[a:b], rest[b:]
        return Batch(dense=dense, sparse=_kjt(c.pooled, pooled[0::2], pooled[1::2], rows, dense),
                     sequence=_kjt(c.sequence, seq[0::2], seq[1::2], rows, dense),
                     side={key: t for (key, _), t in zip(c.side, side, strict=True)})

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(self.batch(inputs))
        return tuple(torch.sigmoid(logits[k].float()) for k in self.outputs)
