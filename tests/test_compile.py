"""`train.compile`: the over-arch under torch.compile trains like the eager one, without recompiling.

The shipped DIN and MMoE configs train a few steps on small generated Parquet splits (the synthetic
generator, with DIN's parallel histories made parallel), once eager and once compiled, from the same
seed, through the real Trainer (DMP, fused tables, TrainPipelineSparseDist, the loader). Inductor
fuses and reorders float arithmetic, so "equal" is within a tolerance: logits of the first batch to
LOGITS_ATOL, the loss of every step to LOSS_RTOL (measured: below 1e-7 relative for both models).
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torch._dynamo.utils import counters
from torch.optim.optimizer import register_optimizer_step_post_hook

from tests.helpers import ROOT, run_cli
from trec_rank.config.experiment import load_config
from trec_rank.config.typed import ConfigError
from trec_rank.data.prepare.synthetic import prepare_synthetic
from trec_rank.models.ranking import RankingModel
from trec_rank.parallel.env import init_distributed, shutdown
from trec_rank.runtime.model import compile_over_arch
from trec_rank.train.loop import Trainer

LOGITS_ATOL, LOSS_RTOL = 1e-5, 1e-4
STEPS, WARMUP = 8, 1  # steps trained; steps after which no new graph may be compiled
CONFIGS = {"din": "configs/ml100k_din.yaml", "mmoe": "configs/adult_mmoe.yaml"}


def _parallel_histories(split: Path) -> None:
    """hist_genre as the genre of each hist_item_id (same lengths): DIN attends over both in one unit."""
    for path in split.glob("*.parquet"):
        table = pq.read_table(path)
        items = table.column("hist_item_id").combine_chunks()
        genres = pa.ListArray.from_arrays(items.offsets, pc.remainder(items.values, 20))
        pq.write_table(table.set_column(table.schema.get_field_index("hist_genre"), "hist_genre", genres), path)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, config in CONFIGS.items():
        root = tmp_path_factory.mktemp(name)
        prepare_synthetic(load_config(ROOT / config).schema, 1200, root, seed=1)
        if name == "din":
            for split in ("train", "valid", "test"):
                _parallel_histories(root / split)
        out[name] = root
    return out


def _sets(root: Path, compiled: bool) -> list[str]:
    """The whole epoch: 960 train rows in batches of 128, the last one of 64 rows (B changes); the
    jagged lengths change on every batch."""
    return [f"data.path={root}", "data.batch_size=128", "data.drop_last=false", f"train.max_steps={STEPS}",
            "data.eval_splits=[valid]", "train.log_rows=true", f"train.compile={str(compiled).lower()}"]


def _train(config: str, root: Path, compiled: bool, run_dir: Path
           ) -> tuple[dict, list[float], list[int], int, list[str]]:
    """(logits of the first train batch at init, loss per step, graphs compiled after each step, after fit,
    the state dict's keys)."""
    cfg = load_config(ROOT / config, _sets(root, compiled))
    env = init_distributed("cpu")
    graphs: list[int] = []
    hook = None
    try:
        trainer = Trainer(cfg, env, run_dir)
        # the first batch at init, in train mode and with grad on like the training steps (the same graph);
        # the forward moves Dice's running statistics, which are put back before training
        buffers = {name: b.clone() for name, b in trainer.model.named_buffers() if b.is_floating_point()}
        _, (_, logits, _) = trainer.model(next(iter(trainer.train_ds.batches())))
        now = dict(trainer.model.named_buffers())
        with torch.no_grad():
            for name, b in buffers.items():
                now[name].copy_(b)
        hook = register_optimizer_step_post_hook(  # the dense Adam steps once per training step
            lambda opt, *_: graphs.append(counters["stats"]["unique_graphs"]) if type(opt) is torch.optim.Adam
            else None)
        trainer.fit()
        after = counters["stats"]["unique_graphs"]
        keys = list(trainer.model.state_dict())
    finally:
        if hook is not None:
            hook.remove()
        shutdown()
    lines = (run_dir / "rows" / "rank-0.jsonl").read_text().splitlines()
    losses = [json.loads(x)["loss"] for x in lines]
    return {k: v.detach().clone() for k, v in logits.items()}, losses, graphs, after, keys


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_compiled_over_arch_trains_like_eager_and_compiles_once(model: str, data: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    torch._dynamo.reset()
    logits_e, losses_e, _, _, keys_e = _train(CONFIGS[model], data[model], False, tmp_path / "eager")
    before = counters["stats"]["unique_graphs"]
    logits_c, losses_c, graphs, after, keys_c = _train(CONFIGS[model], data[model], True, tmp_path / "compiled")
    assert keys_c == keys_e  # checkpoints of either load into the other
    assert graphs[0] > before, "train.compile=true compiled nothing"
    assert len(losses_e) == len(losses_c) == STEPS
    for task, value in logits_e.items():
        torch.testing.assert_close(logits_c[task], value, rtol=0, atol=LOGITS_ATOL)
    np.testing.assert_allclose(losses_c, losses_e, rtol=LOSS_RTOL)
    assert losses_e[0] != losses_e[-1]  # it trained
    # every later step (other jagged lengths, the last partial batch) reuses the graphs of the warm-up,
    # and the final eval, which runs eager, compiles nothing
    assert graphs[WARMUP - 1:] == [graphs[WARMUP - 1]] * (STEPS - WARMUP + 1), graphs
    assert after == graphs[-1]


def test_compile_key_is_typed_and_refused_with_hstu(data: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(ROOT / CONFIGS["mmoe"], [f"data.path={data['mmoe']}", "train.compile=fast"])
    for config in ("configs/ml100k_hstu_ranking.yaml", "configs/ml100k_hstu_esmm.yaml"):
        load_config(ROOT / config)  # fine without compiling
        with pytest.raises(ConfigError, match="train.compile: not supported with the HSTU encoder"):
            load_config(ROOT / config, ["train.compile=true"])


def test_compiled_two_gloo_ranks_match_eager(data: dict[str, Path], tmp_path: Path) -> None:
    """DDP's gradient all-reduce over the compiled backward, under torchrun: rank by rank, step by step."""
    losses = {}
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        run_cli("train", CONFIGS["mmoe"], "--run-dir", str(run), *[a for s in _sets(data["mmoe"], compiled)
                                                                   for a in ("--set", s)], nproc=2)
        losses[compiled] = [[json.loads(x)["loss"] for x in (run / "rows" / f"rank-{r}.jsonl").read_text().splitlines()]
                            for r in range(2)]
    assert [len(r) for r in losses[True]] == [STEPS, STEPS]  # 480 rows a rank: batches of 128, 128, 128, 96
    np.testing.assert_allclose(losses[True], losses[False], rtol=LOSS_RTOL)


class _TinyOver(torch.nn.Module):
    """An over-arch as RankingModel calls it: (pooled, jagged, dense, side) -> {task: logit [B]}."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, pooled: object, jagged: object, dense: torch.Tensor, side: dict) -> dict[str, torch.Tensor]:
        return {"y": self.linear(dense).squeeze(-1)}


def test_compiled_over_arch_is_freed_with_its_model_without_a_gc_pass() -> None:
    """The compiled forward set on the over-arch must not hold the over-arch: that cycle kept the module
    and its compiled code alive until a garbage-collector pass (at worst interpreter shutdown)."""
    model = RankingModel(None, None, _TinyOver())
    compile_over_arch(model)
    out = model.over(None, None, torch.ones(2, 3), {})  # compiled once
    torch.testing.assert_close(out["y"], model.over.linear(torch.ones(2, 3)).squeeze(-1))
    freed = weakref.ref(model.over)
    gc.disable()
    try:
        del model, out
        assert freed() is None
    finally:
        gc.enable()
