"""Two spots of the model code that torch.export cannot trace as written, handled for the trace only.

torch.export runs the model on fake tensors (shapes, no values), so Python that reads tensor values
cannot be traced:
- `FeatureEncoder._attend` checks with `torch.equal` that the histories of one attention group are
  parallel lists. The check is about the input, not the computation: in the program the group shares
  one value-count dimension (contract.py), and the row lengths are the caller's to keep aligned, as in
  the training data. During the trace `torch.equal` of fake tensors is taken as true.
- HSTU's length grouping (`hstu_jagged.plan`) reads the sorted lengths back to the host to cut the batch
  into groups padded to their own longest row. The trace uses one group of every row padded to the
  encoder's max_len instead: the same per-row result (rows never attend to each other, padding sits
  after each row's end and the 1/N scale is max_len), with static shapes.
- TorchRec's int8 EmbeddingCollection regroups its input by table, so the traced value count of each
  feature's output is a fresh data-dependent size, unrelated to the input's; the model's check that a
  side column has one value per behaviour then cannot be decided. `SizedLookup` states the relation
  (output values of a feature = its input values) with `torch._check`, for the trace only.
- Sizes are traced size-obliviously (`backed_size_oblivious`): by default export reasons as if every input
  size were >= 2, and stating the relation above would carry that bound to the value counts, so a batch
  with a single id (or an empty history) for a feature would be refused by the program.
- TorchRec's int8 tables keep fbgemm counters (TorchBind objects); tracing needs TorchRec's fake classes
  for them (`torchrec.pt2.utils.register_fake_classes`), registered for the trace only.
Real tensors always take the original paths, so eager scoring is untouched. The model-side changes that
would make this module unnecessary are in docs/export.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental import _config as fx_config
from torchrec.pt2.utils import deregister_fake_classes, register_fake_classes
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from trec_rank.models import hstu_encoder
from trec_rank.models.hstu_jagged import Group, JaggedLayout, pad_ints, time_buckets
from trec_rank.models.ranking import RankingModel


def padded_plan(lengths: torch.Tensor, timestamps: torch.Tensor, query_ts: torch.Tensor, max_len: int,
                num_buckets: int) -> JaggedLayout:
    """`hstu_jagged.plan` with one group: every row padded to max_len, values in their original order."""
    n, device = timestamps.shape[0], lengths.device
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.long())
    query, keys = pad_ints(query_ts, offsets, max_len), pad_ints(timestamps, offsets, max_len)  # [B, L]
    i = torch.arange(max_len, device=device)
    group = Group(0, n, offsets, max_len, time_buckets(query.unsqueeze(2) - keys.unsqueeze(1), num_buckets),
                  torch.ones(max_len, max_len, device=device).tril(), i.unsqueeze(0) - i.unsqueeze(1) + max_len - 1)
    return JaggedLayout(torch.arange(n, device=device), torch.ops.fbgemm.offsets_range(offsets, n), [group])


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
    """Within: `torch.equal` of fake tensors is True, HSTU plans one padded group, the model's
    EmbeddingCollection is a `SizedLookup` (see the module docstring)."""
    equal, plan, ec = torch.equal, hstu_encoder.plan, model.ec

    def fake_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
        if isinstance(a, FakeTensor) or isinstance(b, FakeTensor):
            return True
        return equal(a, b)

    torch.equal = fake_equal  # type: ignore[assignment]
    hstu_encoder.plan = padded_plan
    register_fake_classes()
    if ec is not None:
        model.ec = SizedLookup(ec)
    try:
        with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
            yield
    finally:
        model.ec = ec
        deregister_fake_classes()
        torch.equal = equal
        hstu_encoder.plan = plan
