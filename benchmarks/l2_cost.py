"""Forward + backward time of DIN's mini-batch-aware L2 alone, this checkout vs a git revision.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/l2_cost.py --baseline REV [--batches 20]

The whole-trainer A/B (train_cpu_ab.py) cannot resolve a few ms on a shared machine, so this
times only `MiniBatchL2` at the benchmark DIN's shapes (benchmarks/configs/din.yaml, batch 256,
lambda 0.01): real ml-100k batches, their EmbeddingBagCollection / EmbeddingCollection outputs
computed once, then the penalty and its backward into the looked-up rows, for the regulariser
of this checkout and of revision REV in turn. Both must give the same loss. REV's regularizer reads this
checkout's `Batch`, so REV must be 43b558e (2026-12-06) or later: older ones read `Batch.seq_feature`,
which that commit removed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor
from train_throughput import ROOT, export_revision  # a sibling script: benchmarks/ is on sys.path when run

from trec_rank.config.experiment import load_config
from trec_rank.data.dataset import ParquetDataset
from trec_rank.data.frequency import train_id_counts
from trec_rank.models import regularizer
from trec_rank.models.embeddings import build_ebc, build_ec

CPU = torch.device("cpu")


def revision_module(code: Path):  # noqa: ANN201
    """trec_rank/models/regularizer.py of an exported revision, imported under its own name."""
    spec = importlib.util.spec_from_file_location("l2_baseline", code / "trec_rank/models/regularizer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["l2_baseline"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def with_counts(module, schema, weight: float, counts: dict) -> torch.nn.Module:  # noqa: ANN001
    """`module`'s MiniBatchL2 holding the training id counts, the way its revision takes them: the
    `counts` property (set before any step) since 2026-12-06, a callback argument before."""
    if isinstance(getattr(module.MiniBatchL2, "counts", None), property):
        l2 = module.MiniBatchL2(schema, module.L2Params(weight=weight))
        l2.counts = counts
        return l2
    return module.MiniBatchL2(schema, module.L2Params(weight=weight), lambda _: counts)


def time_l2(l2: torch.nn.Module, inputs: list, reps: int = 3) -> tuple[float, float]:
    """(best seconds per batch of forward + backward, loss of the first batch)."""
    def once() -> float:
        first = None
        for pooled, jagged, batch in inputs:
            p = KeyedTensor(pooled.keys(), pooled.length_per_key(), pooled.values().detach().requires_grad_())
            j = {k: JaggedTensor(values=v.values().detach().requires_grad_(), lengths=v.lengths())
                 for k, v in jagged.items()}
            loss = l2(p, j, batch)
            loss.backward()
            first = loss.item() if first is None else first
        return first

    first = once()  # warm-up, and the inverse frequencies' first load
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        best = min(best, (time.perf_counter() - t0) / len(inputs))
    return best, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="git revision whose regularizer.py to compare with")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--data", default=str(ROOT / "data/ml-100k/ranking"))
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the tables' init, so that loss[0] is reproducible
    cfg = load_config(ROOT / "benchmarks/configs/din.yaml", [f"data.path={args.data}"])
    ebc, ec = build_ebc(cfg.schema, CPU), build_ec(cfg.schema, CPU)
    reader = ParquetDataset(cfg.data.split_path("train"), cfg.schema, cfg.data.batch_size, shuffle=True)
    inputs = []
    with torch.no_grad():
        for batch in reader.batches():
            inputs.append((ebc(batch.sparse), ec(batch.sequence), batch))
            if len(inputs) == args.batches:
                break
    params = cfg.model.typed_params.encoder.l2
    counts = train_id_counts(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        export_revision(args.baseline, Path(tmp))
        old = revision_module(Path(tmp))
        try:
            (t_old, loss_old) = time_l2(with_counts(old, cfg.schema, params.weight, counts), inputs)
        except AttributeError as err:
            sys.exit(f"error: {args.baseline}'s MiniBatchL2 does not read this checkout's Batch ({err}); "
                     "compare with 43b558e or later")
    t_new, loss_new = time_l2(with_counts(regularizer, cfg.schema, params.weight, counts), inputs)
    print(f"{'code':12} {'ms/batch':>9} {'loss[0]':>12}")
    print(f"{args.baseline[:12]:12} {1000 * t_old:>9.2f} {loss_old:>12.8f}")
    print(f"{'this':12} {1000 * t_new:>9.2f} {loss_new:>12.8f}")
    print(f"speed-up {t_old / t_new:.2f}x over {len(inputs)} batches of {cfg.data.batch_size} "
          f"(MiniBatchL2 forward + backward, 1 thread, best of 3)")
    assert abs(loss_old - loss_new) <= 1e-6 * abs(loss_old), "the two regularisers disagree"


if __name__ == "__main__":
    main()
