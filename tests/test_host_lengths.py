"""HSTU and SASRec plan their padding from lengths the loader keeps on the host, never from a device read.

Issue 14: `.tolist()` on the device lengths in HSTU's length grouping (and `int(lengths.max())` in
SASRec) stall a GPU on every step. The loaders now carry each batch's sequence lengths on the CPU
(`Batch.host_lengths`, `RetrievalBatch.host_lengths`), which `to()` leaves in place. The proof that
no device value is read: the encoders run with every tensor on the `meta` device (which holds no
data, so any host read raises) once the CPU lengths are given, and fail without them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from tests.helpers import ROOT
from trec_rank.config.encoder import SASRecConfig
from trec_rank.config.experiment import load_config
from trec_rank.models import registry
from trec_rank.models.hstu import HSTUConfig, HSTUEncoder
from trec_rank.models.hstu_jagged import plan
from trec_rank.models.sasrec import SASRecEncoder
from trec_rank.parallel.env import DistEnv
from trec_rank.retrieval.batch import NegativeSampler, eval_batch, train_batch
from trec_rank.retrieval.data import Window
from trec_rank.retrieval.model import SequenceHead
from trec_rank.train.build import open_split

META, D = torch.device("meta"), 16
LENGTHS = [7, 3, 0, 12, 5, 11, 2]


def hstu(device: torch.device) -> HSTUEncoder:
    cfg = HSTUConfig(num_blocks=2, num_heads=2, dqk=4, dv=6, input_dropout=0.0, linear_dropout=0.0,
                     num_time_buckets=16)
    return HSTUEncoder(D, 40, cfg, device)


def jagged_inputs(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    n = sum(lengths)
    ts = torch.arange(n) * 1000
    return (torch.randn(n, D).to(device), torch.tensor(lengths).to(device), ts.to(device), (ts + 7).to(device))


def test_plan_from_host_lengths_equals_plan_from_device_lengths() -> None:
    _, lengths, ts, query = jagged_inputs(LENGTHS, torch.device("cpu"))
    a = plan(lengths, ts, query, 40, 16)
    b = plan(lengths, ts, query, 40, 16, host_lengths=lengths.clone())
    assert torch.equal(a.perm, b.perm) and torch.equal(a.positions, b.positions)
    assert [(g.start, g.end, g.length) for g in a.groups] == [(g.start, g.end, g.length) for g in b.groups]
    for ga, gb in zip(a.groups, b.groups, strict=True):
        assert torch.equal(ga.offsets, gb.offsets) and torch.equal(ga.buckets, gb.buckets)


@pytest.mark.parametrize("make", [hstu, lambda d: SASRecEncoder(D, 40, SASRecConfig(num_blocks=1, num_heads=2,
                                                                                     ffn_dim=D, dropout=0.0), d)],
                         ids=["hstu", "sasrec"])
def test_encoders_read_no_device_value_given_host_lengths(make) -> None:  # noqa: ANN001
    enc = make(META)
    args = jagged_inputs(LENGTHS, META)
    out = enc(*args, host_lengths=torch.tensor(LENGTHS))
    assert out.shape == (sum(LENGTHS), D) and out.device == META
    with pytest.raises((NotImplementedError, RuntimeError), match="(?i)meta"):  # the old path: a host read
        enc(*args)


def test_retrieval_batches_carry_host_lengths_and_the_head_uses_them() -> None:
    lengths = np.array([4, 2, 6], dtype=np.int64)
    n = int(lengths.sum())
    w = Window(items=np.arange(1, n + 1), timestamps=np.arange(n) * 10, lengths=lengths,
               users=np.arange(3), weight=1.0)
    sampler = NegativeSampler(np.arange(1, 50), 3, "uniform", 50, seed=0)
    for batch in (train_batch(w, sampler, 0, 0, 0), eval_batch(w)):
        assert batch.host_lengths is not None and batch.host_lengths.tolist() == lengths.tolist()
        assert torch.equal(batch.ids["seq"].lengths().long(), batch.host_lengths)
        moved = batch.to(META)
        assert moved.timestamps.device == META and moved.host_lengths.device.type == "cpu"
    head = SequenceHead(hstu(META), temperature=0.05)
    tokens, lens, ts, _ = jagged_inputs(lengths.tolist(), META)
    states, tgt = head.user_states(tokens, lens, ts, host_lengths=torch.from_numpy(lengths))
    assert states.shape == (n - 3, D) and states.device == META


def test_ranking_batches_carry_host_lengths_and_the_hstu_over_arch_uses_them(ml100k_dir: Path) -> None:
    config = ROOT / "configs" / "ml100k_hstu_ranking.yaml"
    cfg = load_config(config, [f"data.path={ml100k_dir / 'ranking'}", "data.eval_batch_size=16"])
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    batch = next(open_split(cfg, "valid", env, train=False).batches())
    assert set(batch.host_lengths) == set(batch.sequence.keys())
    for name, host in batch.host_lengths.items():
        assert host.device.type == "cpu" and torch.equal(batch.sequence[name].lengths().long(), host)
    assert batch.to(META).host_lengths["hist_item_id"].device.type == "cpu"

    over = registry.build_model(cfg, META).over.target_encoder
    hist, target = batch.sequence["hist_item_id"], batch.sequence["item_id"]
    jagged = {"hist_item_id": JaggedTensor(values=torch.empty(hist.values().numel(), 32, device=META),
                                           lengths=hist.lengths().to(META)),
              "item_id": JaggedTensor(values=torch.empty(16, 32, device=META), lengths=target.lengths().to(META))}
    side = {k: v.to(META) for k, v in batch.side.items()}
    assert over(jagged, side, batch.host_lengths).shape == (16, 32)
    with pytest.raises((NotImplementedError, RuntimeError), match="(?i)meta"):
        over(jagged, side)


def test_din_checks_parallel_histories_on_host_lengths(ml100k_dir: Path) -> None:
    """DIN's check that a group's histories are parallel lists reads the loader's host lengths (no device
    read per step) and still refuses misaligned rows."""
    cfg = load_config(ROOT / "configs" / "ml100k_din.yaml",
                      [f"data.path={ml100k_dir / 'ranking'}", "data.eval_batch_size=16"])
    batch = next(open_split(cfg, "valid", DistEnv(0, 1, 0, 1, torch.device("cpu")), train=False).batches())
    enc = registry.build_model(cfg, META).over.encoder
    (targets, hists), unit = enc.groups[0], enc.attention[0]
    assert len(hists) == 2
    jagged = {name: JaggedTensor(values=torch.empty(batch.sequence[name].values().numel(), enc.dims[name],
                                                    device=META), lengths=batch.sequence[name].lengths().to(META))
              for name in batch.sequence.keys()}
    on_meta = batch.to(META)
    enc.check_aligned(jagged, on_meta)  # host lengths: decided without reading the meta (device) tensors
    assert enc._attend(unit, targets, hists, None, jagged, enc.key_sides[0], enc.side_embeddings[0],
                       on_meta).shape[0] == 16
    with pytest.raises((NotImplementedError, RuntimeError), match="(?i)meta"):  # without host lengths: a device read
        enc.check_aligned(jagged, replace(on_meta, host_lengths={}))
    bad = dict(on_meta.host_lengths)
    bad[hists[1]] = bad[hists[1]] + 1
    with pytest.raises(ValueError, match="not aligned"):
        enc.check_aligned(jagged, replace(on_meta, host_lengths=bad))
