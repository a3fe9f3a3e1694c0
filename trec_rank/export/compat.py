"""What torch.export needs around TorchRec's modules, for the trace only.

torch.export runs the model on fake tensors (shapes, no values). The model code itself is export-aware
(`torch.compiler.is_exporting()`: HSTU plans one padded group, `hstu_jagged.padded_layout`; DIN's aligned-
history check is left to the input contract). What remains is TorchRec's side:
- TorchRec's int8 EmbeddingCollection regroups its input by table, so the traced value count of each
  feature's output is a fresh data-dependent size, unrelated to the input's; the model's check that a
  side column has one value per behaviour then cannot be decided. `SizedLookup` states the relation
  (output values of a feature = its input values) with `torch._check`, for the trace only.
- Sizes are traced size-obliviously (`backed_size_oblivious`): by default export reasons as if every input
  size were >= 2, and stating the relation above would carry that bound to the value counts, so a batch
  with a single id (or an empty history) for a feature would be refused by the program.
- TorchRec's int8 modules also expose each table as a buffer that views the fbgemm weights, for
  `state_dict()`; their forward never reads it, but the program would save it as a second copy of every
  table. It is detached for the trace.
- TorchRec's int8 tables keep fbgemm counters (TorchBind objects); tracing needs TorchRec's fake classes
  for them (`torchrec.pt2.utils.register_fake_classes`), registered for the trace only.
Real tensors always take the original paths, so eager scoring is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.fx.experimental import _config as fx_config
from torchrec.pt2.utils import deregister_fake_classes, register_fake_classes
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from trec_rank.models.ranking import RankingModel


class SizedLookup(nn.Module):
    """An EmbeddingCollection whose per-feature output lengths are stated to equal the input's."""

    def __init__(self, ec: nn.Module) -> None:
        super().__init__()
        self.ec = ec

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        out = self.ec(features)
        for key, n in zip(features.keys(), features.length_per_key(), strict=True):
            torch._check(out[key].values().shape[0] == n)
        return out


@contextlib.contextmanager
def traceable(model: RankingModel) -> Iterator[None]:
    """Within: the model's EmbeddingCollection is a `SizedLookup`, int8 table views are detached, sizes are
    size-oblivious and TorchRec's fake classes are registered (see the module docstring)."""
    ec = model.ec
    register_fake_classes()
    if ec is not None:
        model.ec = SizedLookup(ec)
    facades = [(m, name, getattr(m, name)) for m in model.modules() for name in ("embeddings", "embedding_bags")
               if isinstance(m, QuantEmbeddingCollection | QuantEmbeddingBagCollection)
               and isinstance(getattr(m, name, None), nn.ModuleDict)]
    for m, name, _ in facades:  # per-table views of the TBE weights, for state_dict() only: forward never reads them
        setattr(m, name, nn.ModuleDict())
    try:
        with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
            yield
    finally:
        for m, name, views in facades:
            setattr(m, name, views)
        model.ec = ec
        deregister_fake_classes()
