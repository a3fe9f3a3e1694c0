"""The fast HSTU retrieval paths compute what the padded reference layout computes: outputs and gradients.

Compared: the length-grouped jagged encoder vs `padded_hstu` (every layer on [B, L, D], bias rebuilt
per layer), the [positions x distinct] loss vs the per-position gathered [P, R, D] loss, and a whole
retrieval step (item lookup + encoder + loss) vs the same step on the padded path, gradient by gradient.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.padded_reference import gathered_sampled_softmax, padded_hstu, padded_step_loss
from tests.helpers import ROOT
from trec_rank.models.embeddings import materialize
from trec_rank.models.hstu import HSTUConfig, HSTUEncoder
from trec_rank.models.hstu_jagged import GROUP_RATIO, plan, table_gather
from trec_rank.retrieval.batch import NegativeSampler, train_batch
from trec_rank.retrieval.config import load_retrieval_config
from trec_rank.retrieval.data import SplitReader, read_sequences
from trec_rank.retrieval.loss import sampled_softmax_loss
from trec_rank.retrieval.model import build_retrieval_model, normalize

D, MAX_LEN = 16, 40
LENGTHS = [40, 3, 33, 1, 17, 39, 8, 25, 2, 31]  # several length groups, rows out of order


def batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    ts = torch.cat([torch.cumsum(torch.randint(0, 10**6, (k,), generator=g), 0) for k in lengths])
    return torch.randn(n, D, generator=g), torch.tensor(lengths), ts, ts + torch.randint(0, 10**5, (n,), generator=g)


def encoder(heads: int = 2) -> HSTUEncoder:
    torch.manual_seed(0)
    cfg = HSTUConfig(num_blocks=2, num_heads=heads, dqk=4, dv=6, input_dropout=0.0, linear_dropout=0.0,
                     num_time_buckets=16)
    enc = materialize(HSTUEncoder(D, MAX_LEN, cfg, torch.device("meta")), torch.device("cpu")).train()
    with torch.no_grad():
        for layer in enc.layers:
            layer.rab.pos_w.normal_(std=0.5)
            layer.rab.ts_w.normal_(std=0.5)
    return enc


def test_plan_groups_cover_every_row_once_with_bounded_padding() -> None:
    lengths = torch.tensor(LENGTHS + [0])
    _, _, ts, query = batch(LENGTHS)
    layout = plan(lengths, ts, query, MAX_LEN, 16)
    assert sorted(layout.perm.tolist()) == list(range(sum(LENGTHS)))
    rows = [length for g in layout.groups for length in g.offsets.diff().tolist()]
    assert sorted(rows) == sorted(LENGTHS) and len(layout.groups) > 1
    for g in layout.groups:
        lens = g.offsets.diff()
        assert int(lens.max()) == g.length and bool((lens >= GROUP_RATIO * g.length).all())
        assert g.buckets.shape == (lens.numel(), g.length, g.length)
    assert layout.groups[0].start == 0 and layout.groups[-1].end == sum(LENGTHS)


@pytest.mark.parametrize("heads", [1, 2])
def test_grouped_jagged_encoder_matches_padded_outputs_and_gradients(heads: int) -> None:
    enc = encoder(heads)
    emb, lengths, ts, query = batch(LENGTHS)
    proj = torch.randn(emb.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for run in (enc, lambda *a: padded_hstu(enc, *a)):
        enc.zero_grad()
        x = emb.clone().requires_grad_()
        out = run(x, lengths, ts, query)
        (out * proj).sum().backward()
        grads.append((out.detach(), x.grad, {n: p.grad.clone() for n, p in enc.named_parameters()}))
    (out_j, gx_j, gp_j), (out_p, gx_p, gp_p) = grads
    torch.testing.assert_close(out_j, out_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_j, gx_p, rtol=1e-4, atol=1e-5)
    assert gp_j.keys() == gp_p.keys()
    for name in gp_j:
        torch.testing.assert_close(gp_j[name], gp_p[name], rtol=1e-4, atol=1e-5, msg=name)
        assert gp_j[name].abs().sum() > 0, name


def test_table_gather_gradient_equals_autograd_indexing() -> None:
    w = torch.randn(9, requires_grad=True)
    idx = torch.randint(0, 9, (3, 5, 5))
    g = torch.randn(3, 5, 5)
    (table_gather(w, idx) * g).sum().backward()
    want = torch.autograd.grad((w[idx] * g).sum(), w)[0]
    torch.testing.assert_close(w.grad, want)


def test_distinct_candidate_loss_matches_per_position_gather() -> None:
    gen = torch.Generator().manual_seed(0)
    p, r, u, d = 50, 12, 30, 8
    user0, pos0, cand0 = (torch.randn(n, d, generator=gen) for n in (p, p, u))
    neg_index = torch.randint(0, u, (p, r), generator=gen)
    hit = torch.rand(p, r, generator=gen) < 0.1
    weights = (torch.rand(p, generator=gen) > 0.2).float()
    results = []
    for fast in (True, False):
        user, pos, cand = (t.clone().requires_grad_() for t in (user0, pos0, cand0))
        if fast:
            loss = sampled_softmax_loss(normalize(user), normalize(pos), normalize(cand), neg_index, hit, weights, 0.05)
        else:
            loss = gathered_sampled_softmax(normalize(user), pos, cand, neg_index, hit, weights, 0.05)
        loss.backward()
        results.append((loss.detach(), user.grad, pos.grad, cand.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_retrieval_step_matches_padded_step_gradient_by_gradient(ml100k_dir) -> None:  # noqa: ANN001
    """Real ml-100k windows, the whole forward (sharded-table features seq + neg) and backward."""
    cfg = load_retrieval_config(ROOT / "configs/ml100k_hstu.yaml", [
        f"data.path={ml100k_dir / 'sequences'}", "data.max_seq_len=60", "data.batch_size=24",
        "item.embedding_dim=16", "loss.num_negatives=16",
        "model.params={num_blocks: 2, num_heads: 1, dqk: 8, dv: 8, input_dropout: 0.0, linear_dropout: 0.0}"])
    seqs = read_sequences(cfg.data.path, cfg.data.items_column, cfg.data.time_column, cfg.item.num_embeddings)
    sampler = NegativeSampler(seqs.corpus(), 16, "uniform", cfg.item.num_embeddings, 0)
    _, window = next(SplitReader(seqs, "train", cfg, 24, 0, 1, shuffle=True).batches(0))
    b = train_batch(window, sampler, 0, 0, 0)
    torch.manual_seed(0)
    model = materialize(build_retrieval_model(cfg), torch.device("cpu")).train()
    grads = []
    for fast in (True, False):
        model.zero_grad()
        loss = model(b)[0] if fast else padded_step_loss(model, b)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_j, g_j), (loss_p, g_p) = grads
    torch.testing.assert_close(loss_j, loss_p, rtol=1e-5, atol=1e-6)
    assert g_j.keys() == g_p.keys() and any("ec" in n for n in g_j)
    for name in g_j:
        torch.testing.assert_close(g_j[name], g_p[name], rtol=1e-4, atol=1e-6, msg=name)
