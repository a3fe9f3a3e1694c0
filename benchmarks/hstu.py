"""HSTU retrieval step speed: jagged (our path) vs padded (the reference layout), same parameters, same batch.

Shape (the issue's): B = 64 real ml-100k training windows (lengths up to 200 inputs, the real
length mix), D = dqk = dv = 64, 2 blocks, 1 head, 128 uniform negatives per position, train mode.
Stages, each timed for both implementations, interleaved round by round so machine load hits both:
  forward      encoder only, eval mode, no_grad (jagged [N, D] embeddings in, jagged out)
  fwd+bwd      encoder only, train mode, backward of a fixed random projection of the outputs
  train step   item lookup (EmbeddingCollection) + encoder + sampled softmax + backward + AdamW step
Peak memory: each (implementation, stage) runs in its own subprocess; the figure is the growth of
the process's peak RSS (VmHWM, reset after setup) over its RSS once model and batch are built.
The padded baseline is `trec_rank/retrieval/padded.py` (tests check it computes the same values).
`--lengths reference` swaps the batch for the one the ~1.1 s reference figure was measured on
(input lengths U[10, 200], mean ~105, ids over 3,706 items), for a like-for-like ratio to it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hstu.py --rounds 5 --steps 3
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hstu.py --rounds 5 --steps 3 --lengths reference
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from padded_reference import padded_hstu, padded_step_loss

from trec_rank.models.embeddings import materialize
from trec_rank.retrieval.batch import NegativeSampler, RetrievalBatch, train_batch
from trec_rank.retrieval.config import load_retrieval_config
from trec_rank.retrieval.data import SplitReader, Window, read_sequences
from trec_rank.retrieval.model import RetrievalModel, build_retrieval_model, next_item_split

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_STEP_S = 1.1  # the reference research code's full step at this shape on this machine (notes, section 5)
REFERENCE_ITEMS = 3706  # that measurement's corpus (ML-1M) and lengths U[10, 200]: `--lengths reference`
IMPLS = ("jagged", "padded")
STAGES = ("forward", "fwd+bwd", "train step")
SHAPE = ["data.batch_size=64", "data.max_seq_len=200", "item.embedding_dim=64", "loss.num_negatives=128",
         "model.params={num_blocks: 2, num_heads: 1, dqk: 64, dv: 64}"]


def synthetic_window(rng: np.random.Generator, batch: int, items: int) -> Window:
    """The reference measurement's batch: input lengths U[10, 200] (+1 target token), ids U[1, items]."""
    lengths = rng.integers(10, 201, size=batch) + 1
    ts = np.concatenate([np.cumsum(rng.integers(1, 10**6, size=n)) for n in lengths])
    return Window(rng.integers(1, items + 1, size=int(lengths.sum())), ts, lengths, np.arange(batch), 1.0)


def setup(seed: int = 0, lengths: str = "ml-100k") -> tuple[RetrievalModel, RetrievalBatch, torch.optim.Optimizer]:
    """The model and one batch: real ml-100k training windows, or `reference` (U[10, 200], 3,706 items)."""
    extra = [f"item.num_embeddings={REFERENCE_ITEMS + 1}"] if lengths == "reference" else []
    cfg = load_retrieval_config(ROOT / "configs/ml100k_hstu.yaml", SHAPE + extra)
    if lengths == "reference":
        window = synthetic_window(np.random.default_rng(seed), 64, REFERENCE_ITEMS)
        corpus = np.arange(1, REFERENCE_ITEMS + 1)
    else:
        seqs = read_sequences(Path(cfg.data.path), cfg.data.items_column, cfg.data.time_column, cfg.item.num_embeddings)
        _, window = next(SplitReader(seqs, "train", cfg, cfg.data.batch_size, 0, 1, shuffle=True).batches(0))
        corpus = seqs.corpus()
    sampler = NegativeSampler(corpus, cfg.loss.num_negatives, "uniform", cfg.item.num_embeddings, seed)
    torch.manual_seed(seed)
    model = materialize(build_retrieval_model(cfg), torch.device("cpu")).train()
    return model, train_batch(window, sampler, 0, 0, 0), torch.optim.AdamW(model.parameters(), lr=1e-3)


def encoder_inputs(model: RetrievalModel, batch: RetrievalBatch) -> tuple[torch.Tensor, ...]:
    """(jagged input embeddings [N, D], input lengths [B], timestamps [N], query timestamps [N])."""
    seq = model.ec(batch.ids)["seq"]
    inp, tgt = next_item_split(seq.lengths(), seq.values().shape[0])
    return seq.values()[inp].detach(), seq.lengths() - 1, batch.timestamps[inp], batch.timestamps[tgt]


def stage_fn(impl: str, stage: str, model: RetrievalModel, batch: RetrievalBatch, opt: torch.optim.Optimizer):  # noqa: ANN201
    """A zero-argument callable running one iteration of `stage` with `impl`."""
    enc = model.head.encoder
    encode = enc if impl == "jagged" else lambda *a: padded_hstu(enc, *a)
    inputs = encoder_inputs(model, batch)
    proj = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            encode(*inputs)
        model.train()

    def fwd_bwd() -> None:
        emb = inputs[0].clone().requires_grad_()
        (encode(emb, *inputs[1:]) * proj).sum().backward()

    def step() -> None:
        loss = model(batch)[0] if impl == "jagged" else padded_step_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return {"forward": forward, "fwd+bwd": fwd_bwd, "train step": step}[stage]


def time_all(rounds: int, steps: int, lengths: str) -> dict[tuple[str, str], list[float]]:
    model, batch, opt = setup(lengths=lengths)
    fns = {(i, s): stage_fn(i, s, model, batch, opt) for s in STAGES for i in IMPLS}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            fn()  # warm-up of this round
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return times


def _status_kib(field: str) -> int:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_peak(impl: str, stage: str, lengths: str) -> None:
    """In a fresh process: reset the peak-RSS mark after setup, run two iterations, print the peak growth.

    (getrusage's ru_maxrss would carry the parent's peak over fork + exec; VmHWM is per process image
    and `echo 5 > /proc/self/clear_refs` resets it to the current RSS.)
    """
    model, batch, opt = setup(lengths=lengths)
    fn = stage_fn(impl, stage, model, batch, opt)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    for _ in range(2):
        fn()
    print(_status_kib("VmHWM") - base)


def peak_rss_mib(impl: str, stage: str, lengths: str) -> float:
    """Peak RSS growth of two iterations over the setup, in a fresh process (MiB)."""
    code = "import sys; sys.path.insert(0, %r); from benchmarks.hstu import measure_peak; measure_peak(%r, %r, %r)"
    out = subprocess.run([sys.executable, "-c", code % (str(ROOT), impl, stage, lengths)], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed iterations per stage per round")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--lengths", choices=["ml-100k", "reference"], default="ml-100k",
                   help="real ml-100k windows (the issue's shape), or the reference measurement's U[10, 200] batch")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if threads != 1:
        print(f"warning: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; the reference figure is for 1 "
              "thread per process on a shared 2-core box (set OMP_NUM_THREADS=1)", file=sys.stderr)
    model, batch, _ = setup(lengths=args.lengths)
    lengths = model.ec(batch.ids)["seq"].lengths() - 1
    print(f"batch: {args.lengths}, B={lengths.numel()}, input lengths {int(lengths.min())}..{int(lengths.max())} (mean "
          f"{float(lengths.float().mean()):.0f}), P={batch.neg_index.shape[0]} positions x "
          f"{batch.neg_index.shape[1]} negatives, {batch.ids['neg'].values().numel()} distinct candidates, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch threads {torch.get_num_threads()}")
    times = time_all(args.rounds, args.steps, args.lengths)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {} if args.no_memory else {(i, s): peak_rss_mib(i, s, args.lengths) for s in STAGES for i in IMPLS}
    print("\n| stage | jagged ms | padded ms | padded / jagged | jagged peak MiB | padded peak MiB |")
    print("|---|---|---|---|---|---|")
    for s in STAGES:
        j, pd = med[("jagged", s)], med[("padded", s)]
        mj, mp = mem.get(("jagged", s), float("nan")), mem.get(("padded", s), float("nan"))
        print(f"| {s} | {1e3 * j:.1f} | {1e3 * pd:.1f} | {pd / j:.2f}x | {mj:.0f} | {mp:.0f} |")
    step = med[("jagged", "train step")]
    print(f"\njagged train step {step:.3f} s: {REFERENCE_STEP_S / step:.2f}x faster than the reference's "
          f"~{REFERENCE_STEP_S} s (target >= 3x, <= {REFERENCE_STEP_S / 3:.2f} s)")
    print(f"({args.rounds} rounds x {args.steps} timed iterations, medians; peak MiB = peak-RSS growth over setup)")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_s": {f"{i}/{s}": v for (i, s), v in med.items()},
                                               "peak_mib": {f"{i}/{s}": v for (i, s), v in mem.items()},
                                               "all_s": {f"{i}/{s}": v for (i, s), v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
