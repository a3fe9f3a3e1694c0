"""Where a steady-state training step of the real trainer goes: torch.profiler over N steps after warm-up.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_step.py {din,mmoe} [--warmup 30] [--steps 60]
        [--batch 256] [--compile] [--top 25] [--set key=value ...]

din is configs/ml100k_din.yaml, mmoe configs/adult_mmoe.yaml, as shipped except batch size, no eval
splits and no checkpoint inside the profiled window. One process (a one-rank gloo group), the real
Trainer: DMP, fused tables, its loop (`pipelined()`), the Parquet loader, the loss window and logging.
The machine this runs on is shared, so read shares and op counts, not milliseconds:

  top ops     the self-CPU table of the profiled steps (the top `--top` rows).
  phases      each step cut by the loop's `## ... ##` ranges (the pipeline's; the plain loop, one CPU
              rank's default, marks the same names) plus an `over-arch forward` range put around the
              dense over-arch (a forward wrapper on the module, added here only):
              batch (the loader's next batch), input dist (KJT splits and all-to-alls), embedding
              forward (sharded lookups and output dist), over-arch forward, rest of forward (the loss,
              the wrapper, pipeline glue), backward (of which the fused TBE backward), optimizer
              (zero_grad + step), and outside the step (the trainer loop: loss window, feed,
              progress bar, logging and the host sync every log_every steps).
  per step    aten ops dispatched, host reads of a tensor (aten::item / _local_scalar_dense) and
              collectives, per step.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

from trec_rank.config.experiment import load_config
from trec_rank.parallel.env import init_distributed, shutdown
from trec_rank.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"din": "configs/ml100k_din.yaml", "mmoe": "configs/adult_mmoe.yaml"}
OVER = "over-arch forward"
PHASES = [  # (phase, pattern of a top-level range), first match wins
    ("batch", r"## (next_batch|copy_batch_to_gpu|load_batch)"),
    ("input dist", r"## (start_sparse_data_dist|wait_sparse_data_dist|wait_for_batch)"),
    ("forward", r"## forward"),
    ("backward", r"## backward"),
    ("optimizer", r"## (optimizer|zero_grad)"),
]
OUTSIDE, EMB, REST, TBE = "outside", "embeddings", "rest of forward", "fused TBE backward"
INPUT_DIST = re.compile(r"\[splits_dist\]|## KJT\w*Awaitable wait\(\) ##")  # inside the plain loop's forward
EMBEDDING = re.compile(r"\[(lookup|output_dist)\]|## \w+Awaitable wait\(\) ##|## runtime_forward")
TBE_BACKWARD = re.compile(r"fbgemm::split_embedding.*backward|backward.*codegen", re.IGNORECASE)


class ProfiledTrainer(Trainer):
    """The Trainer, stepping the profiler's schedule between two pipeline steps (outside every range)."""

    profiler: torch.profiler.profile

    def _steps(self, feed) -> Iterator[torch.Tensor]:  # noqa: ANN001
        for loss in super()._steps(feed):
            self.profiler.step()
            yield loss


class Marked(torch.nn.Module):
    """The over-arch inside a record_function range (benchmark only; outside any torch.compile'd call)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        with record_function(OVER):
            return self.inner(*args, **kwargs)


def mark_over_arch(trainer: Trainer) -> None:
    ranking = next(m for name, m in trainer.model.named_modules() if name.endswith("module.model"))
    ranking.over = Marked(ranking.over)


def phase_of(name: str) -> str:
    for phase, pattern in PHASES:
        if re.match(pattern, name):
            return phase
    return OUTSIDE


def forward_parts(event) -> dict[str, float]:  # noqa: ANN001 - a profiler FunctionEvent
    """Microseconds of a `## forward ##` range by part: embeddings, over-arch, the rest."""
    parts: dict[str, float] = defaultdict(float)
    stack = list(event.cpu_children)
    while stack:
        e = stack.pop()
        if e.name.endswith(".forward") and e.cpu_children:  # a wrapper (DDP): look inside
            stack += e.cpu_children
            continue
        us = e.time_range.elapsed_us()
        parts["input dist" if INPUT_DIST.match(e.name) else EMB if EMBEDDING.match(e.name)
              else OVER if e.name == OVER else REST] += us
    return parts


def summarise(prof: torch.profiler.profile, steps: int, top: int) -> None:
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    events = prof.events()
    us: dict[str, float] = defaultdict(float)
    parts: dict[str, float] = defaultdict(float)  # inside the forward ranges
    total = 0.0
    for step in (e for e in events if e.name.startswith("ProfilerStep")):
        total += step.time_range.elapsed_us()
        for e in step.cpu_children:
            phase = phase_of(e.name)
            us[phase] += e.time_range.elapsed_us()
            if phase == "forward":
                for part, t in forward_parts(e).items():
                    parts[part] += t
    us[OUTSIDE] += total - sum(us[p] for p, _ in PHASES) - us[OUTSIDE]  # the steps' own time between ranges
    parts[REST] += us["forward"] - sum(parts.values())  # the forward range's own time
    for part, t in parts.items():  # the plain loop distributes the input inside its forward
        us[part] += t
    us[TBE] = sum(e.self_cpu_time_total for e in events if TBE_BACKWARD.search(e.name))
    rows = [("batch", "batch (loader next + copy)"), ("input dist", "input dist (KJT splits, all-to-all)"),
            (EMB, "embedding forward (lookups, output dist)"), (OVER, OVER), (REST, "rest of forward (loss, glue)"),
            ("backward", "backward"), (TBE, "  of which fused TBE backward"),
            ("optimizer", "optimizer (zero_grad + step)"), (OUTSIDE, "outside the step (trainer loop)")]
    print(f"\n{steps} steps profiled, {total / steps / 1000:.2f} ms/step (shared machine: read the shares)")
    for key, label in rows:
        print(f"  {label:42} {100 * us[key] / total:6.1f}%  {us[key] / steps / 1000:7.3f} ms")
    ops = Counter(e.name for e in events)
    n_aten = sum(c for n, c in ops.items() if n.startswith("aten::"))
    coll = {n: c for n, c in ops.items() if n.startswith(("c10d::", "gloo:"))}
    print(f"per step: {n_aten / steps:.0f} aten ops, {ops['aten::item'] / steps:.2f} host reads (aten::item), "
          f"{ops['aten::_local_scalar_dense'] / steps:.2f} aten::_local_scalar_dense; collectives: "
          + (", ".join(f"{n} {c / steps:.2f}" for n, c in sorted(coll.items())) or "none"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(CONFIGS))
    p.add_argument("--warmup", type=int, default=30, help="steps before the profiled window")
    p.add_argument("--steps", type=int, default=60, help="profiled steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--compile", action="store_true", help="train.compile=true (the over-arch under torch.compile)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--set", action="append", default=[], help="further config overrides")
    args = p.parse_args()
    total = args.warmup + args.steps + 2
    sets = [f"data.batch_size={args.batch}", "data.eval_splits=[]", f"train.max_steps={total}", "train.epochs=1000",
            "train.checkpoint_every=0", *(["train.compile=true"] if args.compile else []), *args.set]
    cfg = load_config(ROOT / CONFIGS[args.model], sets)
    env = init_distributed("cpu")
    schedule = torch.profiler.schedule(wait=args.warmup - 1, warmup=1, active=args.steps, repeat=1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ProfiledTrainer(cfg, env, tmp)
        mark_over_arch(trainer)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule) as prof:
            trainer.profiler = prof
            trainer.fit()
    summarise(prof, args.steps, args.top)
    shutdown()


if __name__ == "__main__":
    main()
