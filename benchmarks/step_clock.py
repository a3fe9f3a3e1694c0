"""Per-step wall times and peak memory from any torch training loop, without editing the loop.

    .venv/bin/python benchmarks/step_clock.py OUT.json -- train CONFIG --run-dir DIR [--set k=v ...]

Imported by benchmarks/peer_models.py (in .venv-peers) and run as above for trec-rank: the second
form runs `trec-rank ARGS` in this process under the clock and writes OUT.json.

Why a global optimizer hook: every library under comparison (DeepCTR-Torch's `model.fit`,
torch-rechub's trainers, trec-rank's TrainPipelineSparseDist loop) calls a torch optimizer's `step()`
exactly once per batch, so `torch.optim.optimizer.register_optimizer_step_post_hook` stamps the end of
every step in all of them alike. The gap between two consecutive stamps is one whole step as the
library runs it: batch assembly, forward, backward, the optimizer, and any per-step bookkeeping.
The first step (warm-up, lazy initialisation, trec-rank's pipeline fill) has no gap before it and so
never enters the median. Peak RSS is the kernel's high-water mark (VmHWM) read at the steps (at most
every 50 ms), so a checkpoint written after training does not count.
"""

from __future__ import annotations

import json
import runpy
import statistics
import sys
import time
from collections import Counter, defaultdict

from torch.optim.optimizer import register_optimizer_step_post_hook

# VmHWM at most every 50 ms: reading /proc/self/status costs ~21 us, and the hook runs once per optimizer,
# 3-4 times a step in trec-rank (its optimizers are nested) and once in the peers, so a read on every stamp
# was a ~3% bias against trec-rank. (getrusage's ru_maxrss would be cheap, but after fork + exec it carries
# the parent's peak.) Memory is steady over a training loop, so the last read is the peak of the loop.
RSS_EVERY_S = 0.05


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class StepClock:
    """Stamps the end of every optimizer step of every optimizer in this process."""

    def __init__(self) -> None:
        self.stamps: dict[int, list[float]] = defaultdict(list)
        self.peak_rss, self._rss_read = 0, float("-inf")
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, opt: object, args: tuple, kwargs: dict) -> None:
        now = time.perf_counter()
        self.stamps[id(opt)].append(now)
        if now - self._rss_read >= RSS_EVERY_S:
            self.peak_rss, self._rss_read = _vm_hwm_bytes(), now

    def close(self) -> None:
        self._handle.remove()

    def intervals(self) -> list[float]:
        """Seconds between consecutive training steps.

        A wrapper optimizer (torchrec's CombinedOptimizer) and the optimizers inside it are all
        stamped once per batch, so they agree on the step count; an optimizer also stepped outside
        the loop (trec-rank's inner dense Adam has one stamp more than its batches, from set-up)
        does not. The step count most optimizers share is the loop's.
        """
        if not self.stamps:
            return []
        counts = Counter(len(t) for t in self.stamps.values())
        n = max(counts, key=lambda c: (counts[c], c))
        times = next(t for t in self.stamps.values() if len(t) == n)
        return [b - a for a, b in zip(times, times[1:])]

    def summary(self) -> dict:
        gaps = self.intervals()
        return {"steps_timed": len(gaps), "step_median_s": statistics.median(gaps) if gaps else float("nan"),
                "peak_rss_bytes": self.peak_rss}


def main() -> None:
    out, sep, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    assert sep == "--", "usage: step_clock.py OUT.json -- TREC_RANK_ARGS"
    clock = StepClock()
    sys.argv = ["trec-rank", *args]
    try:
        runpy.run_module("trec_rank.cli", run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    clock.close()
    with open(out, "w") as f:
        json.dump(clock.summary(), f)


if __name__ == "__main__":
    main()
