"""TorchX components: the same job on a laptop (`-s local_cwd`) and on kubernetes/slurm GPU clusters.

    torchx run -s local_cwd launch/components.py:train --config configs/ml100k_base.yaml --nproc_per_node 2
    torchx run --workspace "" -s kubernetes -cfg queue=default,namespace=recsys launch/components.py:train \
        --image REGISTRY/trec-rank:0.1.0 --nnodes 2 --gpu 8 --config configs/ml100k_din.yaml \
        --mounts type=volume,src=trec-rank-pvc,dst=/mnt/shared \
        --run_dir /mnt/shared/runs/din --data /mnt/shared/data/ml-100k/ranking
    torchx run -s slurm -cfg partition=gpu launch/components.py:train --nnodes 2 --gpu 8 \
        --config configs/ml100k_din.yaml --run_dir /shared/runs/din --data /shared/data/ml-100k/ranking

Each rank is `trec-rank` under the job's own interpreter (`.venv/bin/python -m torch.distributed.run`,
the image's or the checkout's), so nothing has to be on PATH. Per node: one rank per GPU, CPUs and
memory sized from the ranks (docs/cluster.md has the numbers), the NCCL settings below, and the
process-group timeout in TREC_RANK_PG_TIMEOUT_S. `plan` needs no accelerator: one CPU process.
"""

import sys
from typing import Dict, List, Optional  # noqa: UP035 - torchx's component linter reads these names

import torchx.specs as specs
from torchx.components import dist
from torchx.runner.config import get_config
from torchx.specs.finder import ComponentValidationException

# Schedulers that run from a directory (the checkout, on a shared filesystem for slurm) and ignore
# the image; every other one pulls `--image` on each node.
DIRECTORY_SCHEDULERS = ("local_cwd", "local", "slurm")
IMAGE_HELP = ("--image is required on {scheduler}: the image built from the Dockerfile and pushed to a registry "
              "the cluster pulls from (or `image = ...` under [component:{component}] in .torchxconfig)")

# Per rank when --cpu/--memMB are 0 (whole node = this x ranks). GPU ranks get room for the loader
# and the host-side optimizer state of fused/UVM tables; CPU ranks are laptop-sized.
GPU_RANK_CPU, GPU_RANK_MEM_MB = 8, 32 * 1024
CPU_RANK_CPU, CPU_RANK_MEM_MB = 1, 4 * 1024

# Set on GPU jobs (an --env of the same name wins). Cluster-specific ones (NCCL_SOCKET_IFNAME,
# GLOO_SOCKET_IFNAME, NCCL_IB_HCA, ...) are left to --env: docs/cluster.md lists them.
NCCL_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # a failed/timed-out collective ends the process (no hang)
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # flight recorder: the last collectives of each rank ...
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # ... dumped when one times out (files named below)
    "NCCL_DEBUG": "WARN",
}

RUN_DIR = f"runs/{specs.macros.app_id}"  # one run dir per job; a retry of the job keeps it (and resumes)


def _scheduler() -> str | None:
    """The scheduler of this `torchx run`: TorchX does not pass it to components, so read the command
    line (`-s NAME`), else .torchxconfig's [cli:run] default. None when called from Python."""
    argv = sys.argv
    if "run" not in argv:
        return None
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-s", "--scheduler"):
            return value
        if flag.startswith("--scheduler="):
            return flag.split("=", 1)[1]
    return get_config(prefix="cli", name="run", key="scheduler")


def _require_image(image: str, component: str) -> str:
    """The image, or the reason it is needed (`torchx run` prints this exception's text, no traceback)."""
    scheduler = _scheduler()
    if not image and scheduler is not None and scheduler not in DIRECTORY_SCHEDULERS:
        component = f"launch/components.py:{component}"
        raise ComponentValidationException(IMAGE_HELP.format(scheduler=scheduler, component=component))
    return image


def _python(cmd: str) -> str:
    """torchx's `torchrun ...` line run by the job's own interpreter: the checkout's/image's .venv,
    else the image's `python`. A bare `torchrun` needs an activated venv and fails silently."""
    assert cmd.startswith("torchrun "), cmd
    return ('PY=.venv/bin/python; [ -x "$PY" ] || PY=python; exec "$PY" -m torch.distributed.run '
            + cmd[len("torchrun "):])


def _ddp(args: list[str], name: str, image: str, nnodes: int, nproc_per_node: int, cpu: int, gpu: int,
         memMB: int, max_retries: int, pg_timeout_s: int, mounts: list[str] | None,
         env: dict[str, str] | None, trace_dir: str) -> specs.AppDef:
    """One role of `nnodes` replicas, each `python -m torch.distributed.run -m trec_rank.cli ARGS`."""
    if gpu and nproc_per_node > gpu:
        raise ComponentValidationException(
            f"--nproc_per_node {nproc_per_node} > --gpu {gpu}: run at most one rank per GPU")
    ranks = nproc_per_node or gpu or 1
    cpu = cpu or ranks * (GPU_RANK_CPU if gpu else CPU_RANK_CPU)
    memMB = memMB or ranks * (GPU_RANK_MEM_MB if gpu else CPU_RANK_MEM_MB)
    if gpu and not any(a.startswith("sharding.device=") for a in args):
        args = [*args, "--set", "sharding.device=cuda"]  # a GPU job must not fall back to CPU quietly
    job_env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max(1, cpu // ranks)),
               "TREC_RANK_PG_TIMEOUT_S": str(pg_timeout_s)}
    if gpu:
        job_env.update(NCCL_ENV, TORCH_NCCL_DEBUG_INFO_TEMP_FILE=f"{trace_dir}/nccl_trace_rank_")
    app = dist.ddp(*args, m="trec_rank.cli", image=image, name=name, cpu=cpu, gpu=gpu, memMB=memMB,
                   j=f"{nnodes}x{ranks}", max_retries=max_retries, mounts=mounts, env={**job_env, **(env or {})})
    role = app.roles[0]
    role.args = [role.args[0], _python(role.args[1])]
    return app


def train(
    *overrides: str,
    config: str = "configs/ml100k_base.yaml",
    run_dir: str = RUN_DIR,
    data: str = "",
    resume: bool = True,
    overwrite: bool = False,
    plan: str = "",
    image: str = "",
    nnodes: int = 1,
    nproc_per_node: int = 0,
    gpu: int = 0,
    cpu: int = 0,
    memMB: int = 0,
    max_retries: int = 0,
    pg_timeout_s: int = 1800,
    mounts: Optional[List[str]] = None,  # noqa: UP006, UP045
    env: Optional[Dict[str, str]] = None,  # noqa: UP006, UP045
) -> specs.AppDef:
    """Distributed training with trec-rank (DMP + planner + pipelined steps + DCP checkpoints).

    Args:
        overrides: config overrides passed as --set KEY=VALUE (e.g. train.epochs=3)
        config: experiment YAML, relative to the working directory / image workdir
        run_dir: checkpoints, TensorBoard logs, metrics.json; on clusters a path every node shares (see --mounts)
        data: dataset split root, overrides the config's data.path (on clusters: a path every node sees)
        resume: continue from the latest complete checkpoint in run_dir (what a retried job needs)
        overwrite: replace the run that run_dir holds (with --resume False; else a run dir is never reused)
        plan: optional sharding plan JSON from `trec-rank plan --out`
        image: container image (required except on local_cwd and slurm, which run the checkout)
        nnodes: number of nodes
        nproc_per_node: ranks per node (0: one per GPU, else 1)
        gpu: GPUs per node; > 0 makes the job use CUDA (sharding.device=cuda) and fail without it
        cpu: CPUs per node (0: 8 per GPU rank, 1 per CPU rank)
        memMB: memory per node in MB (0: 32768 per GPU rank, 4096 per CPU rank)
        max_retries: scheduler restarts of the whole job after a failure; with resume they continue
        pg_timeout_s: seconds any collective may wait before the job fails
        mounts: TorchX mounts, e.g. type=volume,src=PVC,dst=/mnt/shared or type=bind,src=/host,dst=/mnt (kubernetes)
        env: extra environment variables, e.g. NCCL_SOCKET_IFNAME=eth0,GLOO_SOCKET_IFNAME=eth0
    """
    args = ["train", config, "--run-dir", run_dir]
    args += ["--resume"] if resume else []
    args += ["--overwrite"] if overwrite else []
    args += ["--plan", plan] if plan else []
    args += ["--set", f"data.path={data}"] if data else []
    for item in overrides:
        args += ["--set", item]
    return _ddp(args, "trec-rank-train", _require_image(image, "train"), nnodes, nproc_per_node, cpu, gpu,
                memMB, max_retries, pg_timeout_s, mounts, env, run_dir)


def score(
    *overrides: str,
    checkpoint: str,
    output: str,
    config: str = "configs/ml100k_base.yaml",
    input: str = "data/ml-100k/ranking/test",  # noqa: A002 - the CLI flag's name
    passthrough: str = "",
    batch_size: int = 0,
    sharded: bool = False,
    plan: str = "",
    quantize: str = "",
    image: str = "",
    nnodes: int = 1,
    nproc_per_node: int = 0,
    gpu: int = 0,
    cpu: int = 0,
    memMB: int = 0,
    max_retries: int = 0,
    pg_timeout_s: int = 1800,
    mounts: Optional[List[str]] = None,  # noqa: UP006, UP045
    env: Optional[Dict[str, str]] = None,  # noqa: UP006, UP045
) -> specs.AppDef:
    """Batch offline scoring with trec-rank: Parquet in, Parquet parts + _SUCCESS manifest out.

    Args:
        overrides: config overrides passed as --set KEY=VALUE (e.g. data.num_workers=2)
        checkpoint: checkpoint dir, or a run dir (its latest complete checkpoint), e.g. train's --run_dir
        output: output directory on storage every node shares; rerun with the same value to resume
        config: experiment YAML the checkpoint was trained with
        input: Parquet file or directory to score (on clusters: a path every node sees)
        passthrough: comma-separated input columns copied to the output (empty: group_by, user_id, item_id)
        batch_size: rows per forward (0: data.eval_batch_size)
        sharded: shard the embedding tables across the ranks as in training
        plan: optional sharding plan JSON for sharded scoring
        quantize: "int8" for int8 embedding tables, empty for fp32
        image: container image (required except on local_cwd and slurm, which run the checkout)
        nnodes: number of nodes
        nproc_per_node: ranks per node (0: one per GPU, else 1)
        gpu: GPUs per node; > 0 makes the job use CUDA (sharding.device=cuda) and fail without it
        cpu: CPUs per node (0: 8 per GPU rank, 1 per CPU rank)
        memMB: memory per node in MB (0: 32768 per GPU rank, 4096 per CPU rank)
        max_retries: scheduler restarts after a failure (finished parts are kept and skipped)
        pg_timeout_s: seconds any collective may wait before the job fails
        mounts: TorchX mounts, e.g. type=volume,src=PVC,dst=/mnt/shared (kubernetes)
        env: extra environment variables, e.g. NCCL_SOCKET_IFNAME=eth0
    """
    args = ["score", config, "--checkpoint", checkpoint, "--input", input, "--output", output]
    args += ["--passthrough", passthrough] if passthrough else []
    args += ["--batch-size", str(batch_size)] if batch_size else []
    args += ["--sharded"] if sharded else []
    args += ["--plan", plan] if plan else []
    args += ["--quantize", quantize] if quantize else []
    for item in overrides:
        args += ["--set", item]
    return _ddp(args, "trec-rank-score", _require_image(image, "score"), nnodes, nproc_per_node, cpu, gpu,
                memMB, max_retries, pg_timeout_s, mounts, env, output)


def plan(
    *overrides: str,
    world_size: int,
    config: str = "configs/ml100k_base.yaml",
    local_world_size: int = 8,
    device: str = "cuda",
    hbm_gb: float = 0.0,
    ddr_gb: float = 0.0,
    batch_size: int = 0,
    out: str = "",
    format: str = "table",  # noqa: A002 - the CLI flag's name
    compare: str = "",
    image: str = "",
    cpu: int = 2,
    memMB: int = 8192,
    mounts: Optional[List[str]] = None,  # noqa: UP006, UP045
) -> specs.AppDef:
    """Sharding plan for a described cluster, computed in one CPU process (trec-rank plan).

    Args:
        overrides: config overrides passed as --set KEY=VALUE (e.g. data.batch_size=2048)
        world_size: total ranks of the cluster to plan for
        config: experiment YAML, relative to the working directory / image workdir
        local_world_size: ranks per host of that cluster (training must use the same ranks per node)
        device: compute device of that cluster's ranks: cuda or cpu
        hbm_gb: accelerator memory per rank in GiB (0: the config's sharding.hbm_gb, else torchrec's 32)
        ddr_gb: host memory per rank in GiB (0: the config's sharding.ddr_gb, else torchrec's default)
        batch_size: per-rank training batch (0: the config's data.batch_size)
        out: write the plan JSON here for `trec-rank train --plan` (on clusters: shared storage)
        format: table (text) or json
        compare: space-separated cluster SPECs to plan side by side, e.g. "ws=8,lws=8,hbm=80 ws=16,lws=8,hbm=40"
        image: container image (required except on local_cwd and slurm, which run the checkout)
        cpu: CPUs for the planning process
        memMB: memory for the planning process in MB
        mounts: TorchX mounts for --out, as for train
    """
    args = ["-m", "trec_rank.cli", "plan", config, "--world-size", str(world_size),
            "--local-world-size", str(local_world_size), "--device", device, "--format", format]
    args += ["--hbm-gb", str(hbm_gb)] if hbm_gb else []
    args += ["--ddr-gb", str(ddr_gb)] if ddr_gb else []
    args += ["--batch-size", str(batch_size)] if batch_size else []
    args += ["--out", out] if out else []
    args += ["--compare", *compare.split()] if compare else []
    for item in overrides:
        args += ["--set", item]
    run = 'PY=.venv/bin/python; [ -x "$PY" ] || PY=python; exec "$PY" "$@"'
    role = specs.Role(name="trec-rank-plan", image=_require_image(image, "plan"), entrypoint="bash",
                      args=["-c", run, "plan", *args], env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                      resource=specs.Resource(cpu=cpu, gpu=0, memMB=memMB),
                      mounts=specs.parse_mounts(mounts) if mounts else [])
    return specs.AppDef(name="trec-rank-plan", roles=[role])
