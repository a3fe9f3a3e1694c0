"""TorchX components: real local_cwd jobs (no venv on PATH), and the kubernetes/slurm specs they generate.

The cluster specs are TorchX's own dry runs (the Volcano job object and the sbatch script that
`torchx run` would submit), read field by field as a cluster user would check them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torchx.runner import get_runner
from torchx.specs.finder import ComponentValidationException

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = "launch/components.py:train"
TORCHX = str(Path(sys.executable).parent / "torchx")
# The documented commands must work without an activated venv: nothing of it on PATH.
BARE_PATH = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(sys.executable).parent != Path(p))
CLUSTER = ["--nnodes", "4", "--nproc_per_node", "8", "--gpu", "8", "--max_retries", "3",
           "--run_dir", "/mnt/shared/runs/din", "--data", "/mnt/shared/data/ml-100k/ranking",
           "--pg_timeout_s", "900", "--env", "NCCL_SOCKET_IFNAME=eth0", "train.epochs=2"]


def _torchx(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": BARE_PATH, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([TORCHX, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("nnodes,nproc", [(1, 2), (2, 1)])  # 2 ranks on one node; 2 simulated nodes
def test_local_cwd_job_trains_on_two_ranks(ml100k_dir: Path, tmp_path: Path, nnodes: int, nproc: int) -> None:
    proc = _torchx("run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", COMPONENT,
                   "--run_dir", str(tmp_path / "run"), "--data", f"{ml100k_dir}/ranking", "--nnodes", str(nnodes),
                   "--nproc_per_node", str(nproc), "train.max_steps=10")
    assert proc.returncode == 0 and "SUCCEEDED" in proc.stderr + proc.stdout, proc.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["like/auc"] > 0.55


def test_failed_job_prints_the_failing_rank_error(tmp_path: Path) -> None:
    """Before: `torchrun: command not found` hid in torchx_logs and `torchx run` said `msg: <NONE>`."""
    proc = _torchx("run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", COMPONENT,
                   "--run_dir", str(tmp_path / "run"), "--nproc_per_node", "1", "train.lr=0.1")
    assert proc.returncode == 1 and "FAILED" in proc.stderr
    status = " ".join(proc.stderr[proc.stderr.index("AppStatus:"):].split()).replace("''", "'")  # YAML-folded
    assert "errorCode: 2" in status and "message: 'configs/ml100k_base.yaml: unknown config key 'train.lr'" in status


def _dryrun(scheduler: str, cfg: dict, args: list[str]) -> tuple:
    with get_runner() as runner:
        info = runner.dryrun_component(COMPONENT, args, scheduler=scheduler, cfg=cfg, workspace=None)
    return info, info._app.roles[0]


def _command(cmd: str) -> str:
    return " ".join(cmd.split())


def test_kubernetes_volcano_job_for_4_nodes_of_8_gpus() -> None:
    mounts = ["--mounts", "type=volume,src=trec-rank-pvc,dst=/mnt/shared,type=bind,src=/raid,dst=/mnt/raid,readonly"]
    info, _ = _dryrun("kubernetes", {"queue": "default", "namespace": "recsys"},
                      ["--image", "ghcr.io/org/trec-rank:0.1.0", *mounts, *CLUSTER])
    job = yaml.safe_load(str(info))
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    assert job["spec"]["queue"] == "default" and job["spec"]["maxRetry"] == 3
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 4 and all(t["replicas"] == 1 and t["maxRetry"] == 3 for t in tasks)
    for i, task in enumerate(tasks):
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "ghcr.io/org/trec-rank:0.1.0"
        limits = container["resources"]["limits"]
        assert limits == {"cpu": "64000m", "memory": f"{8 * 32 * 1024}M", "nvidia.com/gpu": "8"}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["TREC_RANK_PG_TIMEOUT_S"] == "900" and env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and env["OMP_NUM_THREADS"] == "8"
        assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/mnt/shared/runs/din/nccl_trace_rank_"
        mounted = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared, raid = mounted["/mnt/shared"], mounted["/mnt/raid"]
        assert volumes[shared["name"]]["persistentVolumeClaim"] == {"claimName": "trec-rank-pvc"}
        assert volumes[raid["name"]]["hostPath"] == {"path": "/raid"} and raid["readOnly"] is True
        assert container["command"][:2] == ["bash", "-c"]
        cmd = _command(container["command"][2])
        assert cmd.startswith('PY=.venv/bin/python; [ -x "$PY" ] || PY=python; exec "$PY" -m torch.distributed.run ')
        rank0 = "TORCHX_RANK0_HOST" if i == 0 else "VC_CLI_0_HOSTS"  # the first pod's name, resolved by Volcano
        assert f"--rdzv_backend c10d --rdzv_endpoint ${{{rank0}:=localhost}}:29500" in cmd
        assert f"--rdzv_id '{job['metadata']['name']}' --nnodes 4 --nproc_per_node 8" in cmd
        assert cmd.endswith("-m trec_rank.cli train configs/ml100k_base.yaml --run-dir /mnt/shared/runs/din "
                            "--resume --set data.path=/mnt/shared/data/ml-100k/ranking --set train.epochs=2 "
                            "--set sharding.device=cuda")


def test_slurm_batch_for_4_nodes_of_8_gpus() -> None:
    info, role = _dryrun("slurm", {"partition": "gpu", "time": "04:00:00"}, CLUSTER)
    script = info.request.materialize()
    assert script.count("#SBATCH hetjob") == 3 and info.request.max_retries == 3
    for i in range(4):
        opts = f"#SBATCH --job-name=cli-{i} --requeue --partition=gpu --time=04:00:00 --ntasks-per-node=1"
        assert f"{opts} --cpus-per-task=64 --mem={8 * 32 * 1024} --gpus-per-task=8" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script  # a failed job requeues itself, up to max_retries
    replica = info.request.replicas["cli-0"]
    assert replica.env["TREC_RANK_PG_TIMEOUT_S"] == "900" and replica.env["NCCL_DEBUG"] == "WARN"
    cmd = _command(replica.args[1])
    assert "exec \"$PY\" -m torch.distributed.run --rdzv_backend c10d " in cmd
    assert "--rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in cmd
    assert "--nnodes 4 --nproc_per_node 8" in cmd and "--run-dir /mnt/shared/runs/din --resume" in cmd
    assert role.image == ""  # slurm runs the checkout on the shared filesystem: no image needed


def test_ranks_follow_gpus_and_resources_follow_ranks() -> None:
    _, role = _dryrun("slurm", {}, ["--gpu", "4"])
    assert "--nproc_per_node 4" in role.args[1] and "--set sharding.device=cuda" in role.args[1]
    assert (role.resource.cpu, role.resource.memMB, role.resource.gpu) == (32, 4 * 32 * 1024, 4)
    assert "--run-dir 'runs/${app_id}'" in role.args[1]  # a job's own run dir by default; retries share it
    _, cpu_role = _dryrun("slurm", {}, ["--nproc_per_node", "2", "--cpu", "6", "--memMB", "9000"])
    assert (cpu_role.resource.cpu, cpu_role.resource.memMB) == (6, 9000) and "sharding.device" not in cpu_role.args[1]
    with pytest.raises(ComponentValidationException, match="at most one rank per GPU"):
        _dryrun("slurm", {}, ["--gpu", "4", "--nproc_per_node", "8"])


def test_train_component_resumes_by_default_and_overwrites_only_when_asked() -> None:
    _, role = _dryrun("slurm", {}, [])
    assert "--resume" in role.args[1] and "--overwrite" not in role.args[1]
    _, fresh = _dryrun("slurm", {}, ["--resume", "False", "--overwrite", "True", "--run_dir", "runs/x"])
    assert "--overwrite" in fresh.args[1] and "--resume" not in fresh.args[1]


def test_kubernetes_without_an_image_is_one_line(tmp_path: Path) -> None:
    proc = _torchx("run", "--dryrun", "--workspace", "", "-s", "kubernetes", "-cfg", "queue=default", COMPONENT,
                   "--gpu", "8")
    assert proc.returncode != 0 and "--image is required on kubernetes" in proc.stderr, proc.stderr[-2000:]
    config = tmp_path / ".torchxconfig"
    config.write_text(f"[component:{COMPONENT}]\nimage = ghcr.io/org/trec-rank:0.2.0\n")
    ok = subprocess.run([TORCHX, "run", "--dryrun", "--workspace", "", "-s", "kubernetes", "-cfg", "queue=default",
                         COMPONENT, "--gpu", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "TORCHXCONFIG": str(config)})
    assert ok.returncode == 0 and "image: ghcr.io/org/trec-rank:0.2.0" in ok.stdout, ok.stderr[-2000:]


def test_plan_component_runs_the_job_python_on_cpu() -> None:
    with get_runner() as runner:
        info = runner.dryrun_component("launch/components.py:plan", ["--world_size", "32", "--hbm_gb", "80",
                                       "--image", "img:1"], scheduler="kubernetes", cfg={"queue": "q"}, workspace=None)
    role = info._app.roles[0]
    assert role.resource.gpu == 0 and role.args[:2] == ["-c", 'PY=.venv/bin/python; [ -x "$PY" ] || PY=python; '
                                                              'exec "$PY" "$@"']
    assert role.args[3:6] == ["-m", "trec_rank.cli", "plan"] and "--hbm-gb 80.0" in " ".join(role.args)


def test_score_component_matches_train_on_a_gpu_cluster() -> None:
    with get_runner() as runner:
        info = runner.dryrun_component("launch/components.py:score", [
            "--image", "img:1", "--gpu", "8", "--checkpoint", "/mnt/shared/runs/din", "--output", "/mnt/shared/s",
            "--input", "/mnt/shared/data/test", "--mounts", "type=volume,src=pvc,dst=/mnt/shared"],
            scheduler="kubernetes", cfg={"queue": "q"}, workspace=None)
    role = info._app.roles[0]
    cmd = _command(role.args[1])
    assert "--nproc_per_node 8" in cmd and cmd.endswith(
        "-m trec_rank.cli score configs/ml100k_base.yaml --checkpoint /mnt/shared/runs/din --input "
        "/mnt/shared/data/test --output /mnt/shared/s --set sharding.device=cuda")
    assert (role.resource.cpu, role.resource.gpu, role.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]) == (64, 8, "3")
    assert role.env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/mnt/shared/s/nccl_trace_rank_"
    assert [m.dst_path for m in role.mounts] == ["/mnt/shared"]
