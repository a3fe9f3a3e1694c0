"""The in-Python checks of scripts/gpu_smoke.sh: each prints its detail and exits 0 (pass) or 1 (fail).

    python scripts/gpu_smoke.py device|memory CONFIG|jagged|sync CONFIG RUN_DIR DATA|same A B TOL|scores A B TOL

Kept apart from the shell script so that every check is a plain function a reader can follow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

GIB = 1024**3


def device() -> int:
    """What the run stands on: torch and CUDA builds, driver, GPU and its memory."""
    import torch

    from trec_rank.parallel.env import cuda_problem

    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
    problem = cuda_problem()
    if problem:
        print(f"no usable CUDA: {problem}")
        return 1
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)
    free, total = torch.cuda.mem_get_info()
    print(f"driver {smi.stdout.strip() or '?'}; {torch.cuda.get_device_name()} ({torch.cuda.device_count()} "
          f"visible), {total / GIB:.1f} GiB, {free / GIB:.1f} GiB free")
    return 0


def memory(config: str) -> int:
    """The device's memory next to what sharding the config's model on it allocated."""
    import torch

    from trec_rank.config.experiment import load_config
    from trec_rank.parallel.env import init_distributed, shutdown
    from trec_rank.train.build import build_train_model

    env = init_distributed("cuda")
    try:
        torch.cuda.reset_peak_memory_stats()
        build_train_model(load_config(config, []), env)
        print(f"device memory {torch.cuda.mem_get_info()[1] / GIB:.1f} GiB; max_memory_allocated after sharding "
              f"{torch.cuda.max_memory_allocated() / GIB:.3f} GiB")
    finally:
        shutdown()
    return 0


def jagged(other: str = "cuda") -> int:
    """fbgemm's jagged ops (the HSTU/SASRec/DIN paths) forward and backward, GPU (`other`) against CPU."""
    import fbgemm_gpu  # noqa: F401 - registers torch.ops.fbgemm
    import torch

    torch.manual_seed(0)
    lengths = torch.randint(0, 60, (64,))
    offsets_cpu = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    values_cpu = torch.randn(int(lengths.sum()), 48, dtype=torch.float32, requires_grad=True)
    worst = 0.0
    outs = {}
    for dev in ("cpu", other):
        offsets = offsets_cpu.to(dev)
        values = values_cpu.detach().to(dev).requires_grad_()
        padded = torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [60], 0.0)
        back = torch.ops.fbgemm.dense_to_jagged(padded * 2.0, [offsets])[0]
        back.pow(2).sum().backward()
        rng = torch.ops.fbgemm.offsets_range(offsets, values.shape[0])
        outs[dev] = [padded.detach().cpu(), back.detach().cpu(), values.grad.cpu(), rng.cpu().float()]
    for name, a, b in zip(("jagged_to_padded_dense", "dense_to_jagged", "backward", "offsets_range"),
                          outs["cpu"], outs[other], strict=True):
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        worst = max(worst, diff)
        print(f"{name}: max |gpu - cpu| = {diff:.2e}")
    return 0 if worst <= 1e-5 else 1


def sync(config: str, run_dir: str, data: str) -> int:
    """A few training steps under torch.cuda.set_sync_debug_mode('warn'): every host sync, counted by source."""
    import torch

    from trec_rank.cli import main

    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # -v: the CLI filters no third-party warnings, so every sync warning reaches this list
        rc = main(["-v", "train", config, "--run-dir", run_dir, "--set", "train.max_steps=8", "--set",
                   "train.log_every=4", "--set", "sharding.device=cuda", "--set", f"data.path={data}"])
    syncs: dict[str, int] = {}
    for w in seen:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            syncs[where] = syncs.get(where, 0) + 1
    print(f"{sum(syncs.values())} synchronizing calls in 8 steps (+ eval): " +
          ", ".join(f"{k} x{v}" for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])[:8]))
    return rc


def same(a: str, b: str, tol: str) -> int:
    """Two metrics.json files agree on every shared split/metric within `tol`."""
    ma, mb = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    pairs = [(f"{s}/{k}", v, mb[s][k]) for s in ma if s in mb for k, v in ma[s].items() if k in mb[s]]
    worst = max((abs(x - y), name) for name, x, y in pairs)
    print(f"{len(pairs)} metrics compared, largest difference {worst[0]:.2e} ({worst[1]})")
    return 0 if pairs and worst[0] <= float(tol) else 1


def scores(a: str, b: str, tol: str) -> int:
    """Two scoring outputs hold the same rows and the same p_* columns within `tol`."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    ta, tb = (ds.dataset(d, format="parquet").to_table().sort_by("row_index") for d in (a, b))
    if ta.num_rows != tb.num_rows or ta.column("row_index") != tb.column("row_index"):
        print(f"row sets differ: {ta.num_rows} vs {tb.num_rows} rows")
        return 1
    cols = [c for c in ta.column_names if c.startswith("p_")]
    worst = max(pc.max(pc.abs(pc.subtract(ta.column(c), tb.column(c)))).as_py() for c in cols)
    print(f"{ta.num_rows} rows, {', '.join(cols)}: largest difference {worst:.2e}")
    return 0 if worst <= float(tol) else 1


if __name__ == "__main__":
    checks = {"device": device, "memory": memory, "jagged": jagged, "sync": sync, "same": same, "scores": scores}
    sys.exit(checks[sys.argv[1]](*sys.argv[2:]))
