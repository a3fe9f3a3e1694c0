"""HSTU and SASRec encoders: jagged == an independent dense reference, causality, no softmax, rab buckets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trec_rank.config.encoder import SASRecConfig
from trec_rank.models.embeddings import materialize
from trec_rank.models.hstu import HSTUConfig, HSTUEncoder, RelativeBias, pointwise_attention, time_buckets
from trec_rank.models.sasrec import SASRecEncoder

D, MAX_LEN = 16, 12


def make_hstu(heads: int = 2, dqk: int = 4, dv: int = 6, blocks: int = 2) -> HSTUEncoder:
    torch.manual_seed(0)
    cfg = HSTUConfig(num_blocks=blocks, num_heads=heads, dqk=dqk, dv=dv, input_dropout=0.0, linear_dropout=0.0,
                     num_time_buckets=16)
    enc = materialize(HSTUEncoder(D, MAX_LEN, cfg, torch.device("meta")), torch.device("cpu")).eval()
    with torch.no_grad():  # position/time biases big enough to matter in the comparison
        for layer in enc.layers:
            layer.rab.pos_w.normal_(std=0.5)
            layer.rab.ts_w.normal_(std=0.5)
    return enc


def random_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jagged embeddings [N, D], lengths [B], timestamps and query timestamps [N] (seconds, increasing)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    emb = torch.randn(n, D, generator=g)
    ts = torch.cat([torch.cumsum(torch.randint(0, 10**6, (k,), generator=g), 0) for k in lengths])
    query = ts + torch.randint(0, 10**5, (n,), generator=g)
    return emb, torch.tensor(lengths), ts, query


def reference_hstu(enc: HSTUEncoder, emb: torch.Tensor, lengths: torch.Tensor, ts: torch.Tensor,
                   query: torch.Tensor) -> torch.Tensor:
    """Dense, padded, loop-based HSTU written from the paper's equations (not from the module's code)."""
    b, length = len(lengths), int(lengths.max())
    x = torch.zeros(b, length, D)
    ts_p = torch.zeros(b, length, dtype=torch.long)
    q_p = torch.zeros_like(ts_p)
    start = 0
    for r, n in enumerate(lengths.tolist()):
        x[r, :n], ts_p[r, :n], q_p[r, :n] = emb[start:start + n], ts[start:start + n], query[start:start + n]
        start += n
    x = x * math.sqrt(D) + enc.input.weight[:length]
    for layer in enc.layers:
        h, dqk, dv = layer.heads, layer.dqk, layer.dv
        u, v, q, k = F.silu(F.layer_norm(x, (D,), eps=1e-6) @ layer.uvqk).split([h * dv, h * dv, h * dqk, h * dqk], -1)
        rab = torch.zeros(b, length, length)
        for r in range(b):
            for i in range(length):
                for j in range(length):
                    dt = abs(int(q_p[r, i]) - int(ts_p[r, j]))
                    bucket = min(int(math.log(max(dt, 1)) / 0.301), layer.rab.num_buckets)
                    rab[r, i, j] = layer.rab.pos_w[j - i + layer.rab.max_len - 1] + layer.rab.ts_w[bucket]
        av = torch.zeros(b, length, h * dv)
        for head in range(h):
            qh, kh = q[..., head * dqk:(head + 1) * dqk], k[..., head * dqk:(head + 1) * dqk]
            a = F.silu(qh @ kh.transpose(1, 2) + rab) / layer.max_len * torch.ones(length, length).tril()
            av[..., head * dv:(head + 1) * dv] = a @ v[..., head * dv:(head + 1) * dv]
        x = x + (u * F.layer_norm(av, (h * dv,), eps=1e-6)) @ layer.out_w.T + layer.out_b
    return torch.cat([x[r, :n] for r, n in enumerate(lengths.tolist())])


@pytest.mark.parametrize("lengths", [[5, 1, 12, 3], [7], [2, 9, 9, 4, 1, 6]])
def test_jagged_hstu_matches_dense_reference(lengths: list[int]) -> None:
    enc = make_hstu()
    emb, lens, ts, query = random_batch(lengths, seed=len(lengths))
    with torch.no_grad():
        got = enc(emb, lens, ts, query)
        want = reference_hstu(enc, emb, lens, ts, query)
    assert got.shape == (sum(lengths), D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_output_does_not_depend_on_batch_padding() -> None:
    """N in A/N is the configured max length: a row's output is the same alone or beside a longer row."""
    enc = make_hstu()
    emb, lens, ts, query = random_batch([4, 11])
    with torch.no_grad():
        together = enc(emb, lens, ts, query)[:4]
        alone = enc(emb[:4], lens[:1], ts[:4], query[:4])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [make_hstu, lambda: make_sasrec()])
def test_causal_output_independent_of_later_items(make) -> None:  # noqa: ANN001
    enc = make()
    emb, lens, ts, query = random_batch([8, 6])
    t = 3  # positions 0..3 of row 0 must not see items 4..7, nor row 1 anything of row 0
    changed = emb.clone()
    changed[t + 1:8] += torch.randn(8 - t - 1, D)
    with torch.no_grad():
        before, after = enc(emb, lens, ts, query), enc(changed, lens, ts, query)
    torch.testing.assert_close(before[:t + 1], after[:t + 1], rtol=0, atol=0)
    torch.testing.assert_close(before[8:], after[8:], rtol=0, atol=0)
    assert not torch.allclose(before[t + 1:8], after[t + 1:8])


def test_pointwise_attention_is_not_a_softmax() -> None:
    """Constant q, k, v: softmax attention would return v at every position; HSTU's sums SiLU(q.k)/n over
    the i+1 visible keys, so position i returns (i + 1) * SiLU(c) / n * v."""
    b, length, h, d, n = 1, 5, 1, 3, 20
    q = torch.full((b, length, h, d), 0.5)
    k = torch.ones(b, length, h, d)
    v = torch.full((b, length, h, 2), 2.0)
    out = pointwise_attention(q, k, v, torch.zeros(b, length, length), torch.ones(length, length).tril(), n)
    c = F.silu(torch.tensor(1.5))
    want = torch.stack([(i + 1) * c / n * 2.0 for i in range(length)])
    torch.testing.assert_close(out[0, :, 0, 0], want)
    torch.testing.assert_close(2 * pointwise_attention(q, k, v, torch.zeros(b, length, length),
                                                       torch.ones(length, length).tril(), 2 * n), out)


def test_time_buckets_are_log_buckets_of_abs_gap() -> None:
    dt = torch.tensor([0, 1, -1, 2, 10, -10, 3600, 86400, 10**9, 2**62])
    # floor(ln(max(|dt|, 1)) / 0.301), capped at num_buckets: ln 2 = 0.693 -> 2; ln 10 = 2.303 -> 7;
    # ln 3600 = 8.19 -> 27; ln 86400 = 11.37 -> 37; ln 1e9 = 20.7 -> 68; ln 2^62 = 43.0 -> 142 -> cap 128
    assert time_buckets(dt, 128).tolist() == [0, 0, 0, 2, 7, 7, 27, 37, 68, 128]
    assert time_buckets(dt, 30).tolist() == [0, 0, 0, 2, 7, 7, 27, 30, 30, 30]


def test_relative_bias_indexes_position_and_time_tables() -> None:
    rab = RelativeBias(max_len=6, num_buckets=8)
    with torch.no_grad():
        rab.pos_w.copy_(torch.arange(11.0) * 100)  # pos_w[j - i + 5]
        rab.ts_w.copy_(torch.arange(9.0))
    buckets = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 0]]])
    out = rab(buckets)[0]
    for i in range(3):
        for j in range(3):
            assert out[i, j] == (j - i + 5) * 100 + buckets[0, i, j]


def make_sasrec() -> SASRecEncoder:
    torch.manual_seed(0)
    cfg = SASRecConfig(num_blocks=2, num_heads=2, dropout=0.0)
    return materialize(SASRecEncoder(D, MAX_LEN, cfg, torch.device("meta")), torch.device("cpu")).eval()


def test_sasrec_is_a_softmax_transformer_on_padded_rows() -> None:
    """One row alone or padded beside a longer one gives the same outputs; rows differ from each other."""
    enc = make_sasrec()
    emb, lens, ts, query = random_batch([3, 10])
    with torch.no_grad():
        together = enc(emb, lens, ts, query)
        alone = enc(emb[:3], lens[:1], ts[:3], query[:3])
    torch.testing.assert_close(together[:3], alone, rtol=0, atol=1e-6)
    assert together.shape == (13, D) and torch.isfinite(together).all()


def test_meta_build_initialises_every_parameter() -> None:
    """DMP materialises meta modules through reset_parameters(): nothing may stay uninitialised."""
    enc = make_hstu(heads=1, dqk=8, dv=8, blocks=1)
    for name, p in enc.named_parameters():
        assert torch.isfinite(p).all() and p.abs().sum() > 0, name
        assert p.abs().max() < 10, name
