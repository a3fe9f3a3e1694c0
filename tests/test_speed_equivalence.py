"""The training-speed rewrites compute what the plain formulas compute (issue 4).

Each optimised piece is compared with a reference kept here, written the way the code was before:
Dice through autograd over its defining formula, the activation unit over the concatenated
[q, k, q - k, q * k] interaction, the dense Adam as torch's per-tensor loop
(not fused), the loader converting every batch on its own. Then whole DIN training runs
are compared loss by loss with the references swapped in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import ROOT
from trec_rank.config.experiment import OptimConfig, load_config
from trec_rank.models import attention, dice
from trec_rank.models.attention import AttentionParams, TargetAttention, segment_softmax
from trec_rank.models.dice import Dice
from trec_rank.models.embeddings import segment_ids
from trec_rank.runtime import model as runtime_model


# ---- references (the computation before the speed work) ----------------------------------------
def reference_dice(self: Dice, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, self.width)
    n = flat.shape[0]
    if self.training and n > 0:
        mean = flat.mean(dim=0)
        var = flat.var(dim=0, unbiased=False)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            if n > 1:
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
    else:
        mean, var = self.running_mean, self.running_var
    p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
    return p * x + (1.0 - p) * self.alpha * x


def reference_weights(self: TargetAttention, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
    segments = segment_ids(lengths, keys.shape[0])
    scores = self.score(self.mlp(self.interaction(query[segments], keys))).squeeze(-1)
    if self.params.attention_norm == "softmax":
        return segment_softmax(scores, segments, lengths.numel())
    return scores


def reference_dense_optimizer(params: dict[str, nn.Parameter], cfg: OptimConfig, betas: tuple = (0.9, 0.999)):  # noqa: ANN201
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    return KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr, eps=cfg.eps,
                                                                     weight_decay=cfg.weight_decay))


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, inputs, g))


# ---- Dice ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3000, 64), (7, 3), (4, 5, 2), (256, 200)])
def test_dice_forward_backward_and_running_stats_match_autograd(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    fast, ref = Dice(shape[-1]), Dice(shape[-1])
    with torch.no_grad():
        alpha = torch.randn(shape[-1]) * 0.5
        fast.alpha.copy_(alpha)
        ref.alpha.copy_(alpha)
    x = (torch.randn(*shape) * 3 + 1).requires_grad_()
    for step in range(3):  # running statistics accumulate over steps
        out_fast = fast(x * (step + 1))
        out_ref = reference_dice(ref, x * (step + 1))
        torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(_grads(out_fast, [x, fast.alpha]), _grads(out_ref, [x, ref.alpha]), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast.running_mean, ref.running_mean)
        torch.testing.assert_close(fast.running_var, ref.running_var)
    fast.eval()
    ref.eval()
    y = torch.randn(*shape)
    torch.testing.assert_close(fast(y), reference_dice(ref, y), rtol=1e-5, atol=1e-6)


def test_dice_single_row_gradient_is_exact() -> None:
    """n = 1: z = 0 and the statistics' gradient cancels exactly; dx = dy * (alpha + (1 - alpha) / 2)."""
    d = Dice(4)
    with torch.no_grad():
        d.alpha.copy_(torch.tensor([0.1, -0.3, 0.5, 0.0]))
    x = torch.randn(1, 4, requires_grad=True)
    dy = torch.randn(1, 4)
    (dx,) = torch.autograd.grad(d(x), [x], dy)
    torch.testing.assert_close(dx, dy * (d.alpha.detach() + (1 - d.alpha.detach()) * 0.5))


# ---- the activation unit -------------------------------------------------------------------------
@pytest.mark.parametrize(("interaction", "outer_dim", "hidden", "norm"), [
    (["query", "key", "diff", "prod"], 0, [64, 32], "none"),
    (["query", "key", "diff", "prod"], 0, [16], "softmax"),
    (["key", "outer", "query"], 0, [8], "none"),
    (["prod", "outer", "diff"], 3, [8], "none"),
    (["diff", "key"], 0, [], "none"),
])
def test_factorised_activation_unit_matches_the_concatenated_interaction(
        interaction: list[str], outer_dim: int, hidden: list[int], norm: str) -> None:
    torch.manual_seed(0)
    dim = 4 if "outer" in interaction else 32
    params = AttentionParams(hidden=hidden, activation="dice", interaction=interaction, outer_dim=outer_dim,
                             attention_norm=norm)
    fast, ref = TargetAttention(dim, params), TargetAttention(dim, params)
    ref.load_state_dict(fast.state_dict())
    lengths = torch.randint(0, 30, (64,))
    lengths[:2] = 0  # rows without behaviours
    query = torch.randn(64, dim, requires_grad=True)
    keys = torch.randn(int(lengths.sum()), dim, requires_grad=True)
    out_fast = fast(query, keys, lengths)
    seg = segment_ids(lengths, keys.shape[0])
    w = reference_weights(ref, query, keys, lengths)
    out_ref = torch.zeros(64, dim).index_add(0, seg, w.unsqueeze(1) * keys)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    inputs_fast, inputs_ref = [query, keys, *fast.parameters()], [query, keys, *ref.parameters()]
    for a, b in zip(_grads(out_fast, inputs_fast), _grads(out_ref, inputs_ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- the dense optimizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_fused_dense_optimizer_follows_the_reference_update(kind: str) -> None:
    cfg = OptimConfig(dense=kind, dense_lr=1e-2, weight_decay=0.01 if kind == "adamw" else 0.0)
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 102), (64,), (4, 102), (1, 32), (1,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    fast = {f"p{i}": nn.Parameter(t.clone()) for i, t in enumerate(init)}
    ref = {f"p{i}": nn.Parameter(t.clone()) for i, t in enumerate(init)}
    opt_fast = runtime_model.dense_optimizer(fast, cfg)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt_ref = cls(list(ref.values()), lr=cfg.dense_lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    for _ in range(40):
        for name, t in fast.items():
            t.grad = torch.randn(t.shape, generator=g)
            ref[name].grad = t.grad.clone()
        opt_fast.step()
        opt_ref.step()
    for name, t in fast.items():
        torch.testing.assert_close(t, ref[name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(t, init[int(name[1:])])


# ---- whole training runs --------------------------------------------------------------------------
def _train_losses(cfg_path: str, sets: list[str], run_dir: Path) -> list[float]:
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.train.loop import Trainer

    cfg = load_config(ROOT / cfg_path, sets)
    env = init_distributed("cpu")
    try:
        Trainer(cfg, env, run_dir).fit()
    finally:
        shutdown()
    lines = (run_dir / "rows" / "rank-0.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.parametrize("config", ["configs/ml100k_din_feedback.yaml", "configs/adult_mmoe.yaml"])
def test_training_losses_match_the_reference_step_by_step(config: str, ml100k_dir: Path, adult_dir: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ml100k_dir / "ranking" if "ml100k" in config else adult_dir / "adult"
    sets = [f"data.path={data}", "data.batch_size=128", "train.max_steps=12", "train.log_rows=true",
            "data.eval_splits=[]", "train.checkpoint_every=1000"]
    fast = _train_losses(config, sets, tmp_path / "fast")
    monkeypatch.setattr(dice.Dice, "forward", reference_dice)
    monkeypatch.setattr(attention.TargetAttention, "weights", reference_weights)
    monkeypatch.setattr(runtime_model, "dense_optimizer", reference_dense_optimizer)
    ref = _train_losses(config, sets, tmp_path / "ref")
    assert len(fast) == len(ref) == 12
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=2e-5, atol=1e-6)
    assert fast[0] != fast[-1]  # it trained


# ---- the loader ------------------------------------------------------------------------------------
def _same_kjt(a, b) -> bool:  # noqa: ANN001
    return (a.keys() == b.keys() and a.stride() == b.stride() and torch.equal(a.values(), b.values())
            and torch.equal(a.lengths(), b.lengths()) and a.values().dtype == b.values().dtype
            and a.lengths().dtype == b.lengths().dtype)


@pytest.mark.parametrize("drop_last", [True, False])
def test_window_conversion_cut_into_batches_equals_converting_each_batch(ml100k_dir: Path, drop_last: bool) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from trec_rank.data.convert import to_batch, to_batches

    cfg = load_config(ROOT / "configs/ml100k_din.yaml", [f"data.path={ml100k_dir}/ranking",
                                                         "schema.features.8.max_len=7"])  # truncating histories
    table = pq.read_table(ml100k_dir / "ranking" / "train").slice(100, 1000)
    rows = np.arange(100, 1100)
    batches = to_batches(table, cfg.schema, rows, "w", 96, drop_last)
    assert len(batches) == (1000 // 96 if drop_last else -(-1000 // 96))
    for i, got in enumerate(batches):
        ref = to_batch(table.slice(i * 96, 96), cfg.schema, rows[i * 96:(i + 1) * 96], "w")
        assert _same_kjt(got.sparse, ref.sparse) and _same_kjt(got.sequence, ref.sequence)
        assert got.side.keys() == ref.side.keys() and got.labels.keys() == ref.labels.keys()
        for k in ref.side:
            assert torch.equal(got.side[k], ref.side[k])
        for k in ref.labels:
            assert torch.equal(got.labels[k], ref.labels[k])
        assert torch.equal(got.dense, ref.dense) and torch.equal(got.weights, ref.weights)
        assert torch.equal(got.row_index, ref.row_index)
