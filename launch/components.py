"""TorchX components: the same job on a laptop (`-s local_cwd`) and on kubernetes/slurm clusters.

    torchx run -s local_cwd launch/components.py:train --config configs/ml100k_base.yaml --nnodes 1 --nproc_per_node 2
    torchx run -s kubernetes -cfg queue=default,namespace=recsys launch/components.py:train \
        --image ghcr.io/ORG/trec-rank:0.1.0 --config configs/ml100k_base.yaml --nnodes 4 --nproc_per_node 8 --gpu 8
    torchx run -s local_cwd launch/components.py:plan --config configs/synthetic_large.yaml \
        --world_size 128 --local_world_size 8 --hbm_gb 80 --out plans/synthetic_128.json

`train` (and `score`) roles run `python -m trec_rank.cli ...` under torchrun (dist.ddp), so
rendezvous, restarts (`max_retries`) and the process group come from TorchX; the CLI itself is
unchanged. `plan` needs no accelerator and no process group: one plain process on any CPU node,
so a what-if for a 128-GPU cluster runs before that cluster is booked.
"""

from typing import Dict, Optional  # noqa: UP035 - torchx's component linter reads these names

import torchx.specs as specs
from torchx.components import dist

DEFAULT_IMAGE = "trec-rank:latest"


def _ddp(args: list[str], name: str, image: str, nnodes: int, nproc_per_node: int, cpu: int, gpu: int,
         memMB: int, max_retries: int, env: Optional[Dict[str, str]]) -> specs.AppDef:  # noqa: UP006, UP045
    return dist.ddp(*args, m="trec_rank.cli", image=image, name=name, cpu=cpu, gpu=gpu, memMB=memMB,
                    j=f"{nnodes}x{nproc_per_node}", max_retries=max_retries,
                    env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})


def train(
    *overrides: str,
    config: str = "configs/ml100k_base.yaml",
    run_dir: str = "runs/train",
    resume: bool = True,
    plan: str = "",
    image: str = DEFAULT_IMAGE,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,  # noqa: UP006, UP045
) -> specs.AppDef:
    """Distributed training with trec-rank (DMP + planner + pipelined steps + DCP checkpoints).

    Args:
        overrides: config overrides passed as --set KEY=VALUE (e.g. train.epochs=3)
        config: experiment YAML, relative to the working directory / image workdir
        run_dir: run directory for checkpoints, TensorBoard logs and metrics.json (shared storage on clusters)
        resume: continue from the latest complete checkpoint in run_dir (needed for restarts to resume)
        plan: optional sharding plan JSON from `trec-rank plan --out`
        image: container image (ignored by local_cwd)
        nnodes: number of nodes
        nproc_per_node: ranks per node (GPUs per node on GPU clusters)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_retries: job restarts after a failure (elastic restart resumes from the last checkpoint)
        env: extra environment variables
    """
    args = ["train", config, "--run-dir", run_dir]
    args += ["--resume"] if resume else []
    args += ["--plan", plan] if plan else []
    for item in overrides:
        args += ["--set", item]
    return _ddp(args, "trec-rank-train", image, nnodes, nproc_per_node, cpu, gpu, memMB, max_retries, env)


def score(
    *overrides: str,
    config: str = "configs/ml100k_base.yaml",
    checkpoint: str = "runs/train",
    input: str = "data/ml-100k/ranking/test",  # noqa: A002 - the CLI flag's name
    output: str = "runs/scores",
    passthrough: str = "",
    batch_size: int = 0,
    sharded: bool = False,
    plan: str = "",
    quantize: str = "",
    image: str = "trec-rank:latest",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,  # noqa: UP006, UP045
) -> specs.AppDef:
    """Batch offline scoring with trec-rank: Parquet in, Parquet parts + _SUCCESS manifest out.

    Args:
        overrides: config overrides passed as --set KEY=VALUE (e.g. data.num_workers=2)
        config: experiment YAML the checkpoint was trained with
        checkpoint: checkpoint dir, or a run dir (its latest complete checkpoint)
        input: Parquet file or directory to score
        output: output directory (shared storage on clusters); rerun with the same value to resume
        passthrough: comma-separated input columns copied to the output (empty: group_by, user_id, item_id)
        batch_size: rows per forward (0: data.eval_batch_size)
        sharded: shard the embedding tables across the ranks as in training
        plan: optional sharding plan JSON for sharded scoring
        quantize: "int8" for int8 embedding tables, empty for fp32
        image: container image (ignored by local_cwd)
        nnodes: number of nodes
        nproc_per_node: ranks per node
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_retries: job restarts after a failure (finished parts are kept and skipped)
        env: extra environment variables
    """
    args = ["score", config, "--checkpoint", checkpoint, "--input", input, "--output", output]
    args += ["--passthrough", passthrough] if passthrough else []
    args += ["--batch-size", str(batch_size)] if batch_size else []
    args += ["--sharded"] if sharded else []
    args += ["--plan", plan] if plan else []
    args += ["--quantize", quantize] if quantize else []
    for item in overrides:
        args += ["--set", item]
    return _ddp(args, "trec-rank-score", image, nnodes, nproc_per_node, cpu, gpu, memMB, max_retries, env)


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
    image: str = "trec-rank:latest",
    cpu: int = 2,
    memMB: int = 8192,
) -> specs.AppDef:
    """Sharding plan for a described cluster, computed in one CPU process (trec-rank plan).

    Args:
        overrides: config overrides passed as --set KEY=VALUE (e.g. data.batch_size=2048)
        world_size: total ranks of the cluster to plan for
        config: experiment YAML, relative to the working directory / image workdir
        local_world_size: ranks per host of that cluster (training must use the same nproc_per_node)
        device: compute device of that cluster's ranks: cuda or cpu
        hbm_gb: accelerator memory per rank in GB (0: the config's sharding.hbm_gb, else torchrec's default)
        ddr_gb: host memory per rank in GB (0: the config's sharding.ddr_gb, else torchrec's default)
        batch_size: per-rank training batch (0: the config's data.batch_size)
        out: write the plan JSON here for `trec-rank train --plan` (empty: print only)
        format: table (text) or json
        compare: space-separated cluster SPECs to plan side by side, e.g. "ws=8,lws=8,hbm=80 ws=16,lws=8,hbm=40"
        image: container image (ignored by local_cwd)
        cpu: CPUs for the planning process
        memMB: memory for the planning process in MB
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
    role = specs.Role(name="trec-rank-plan", image=image, entrypoint="python", args=args,
                      env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                      resource=specs.Resource(cpu=cpu, gpu=0, memMB=memMB))
    return specs.AppDef(name="trec-rank-plan", roles=[role])
