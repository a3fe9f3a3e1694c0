"""Process-group set-up: backend choice, CUDA diagnosis, timeout, planner memory, shared run_dir.

The GPU-only decisions are pure functions fed what torch would report on a GPU node; the shared
storage check runs in two real gloo processes that stand for two nodes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.distributed_c10d import Backend, BackendConfig

from trec_rank.parallel import env as penv
from trec_rank.parallel.storage import MESSAGE


def test_cuda_group_reduces_cpu_tensors_on_gloo_and_cuda_tensors_on_nccl() -> None:
    assert BackendConfig(Backend(penv.backend_for("cuda"))).get_device_backend_map() == {
        "cpu": "gloo", "cuda": "nccl"}
    assert penv.backend_for("cpu") == "gloo"


def test_cuda_causes_are_named() -> None:
    assert "CPU build" in penv.explain_no_cuda("2.13.0+cpu", None, None, 0)
    old_driver = "The NVIDIA driver on your system is too old (found version 12040).\nPlease update"
    why = penv.explain_no_cuda("2.13.0", "13.0", old_driver, 0)
    assert "too old (found version 12040)" in why and ">= 580" in why and "\n" not in why
    assert "no CUDA device is visible" in penv.explain_no_cuda("2.13.0", "13.0", None, 0)
    assert penv.explain_no_cuda("2.13.0", "13.0", None, 8) is None


def test_gpu_job_without_cuda_fails_instead_of_training_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="sharding.device: cuda was asked for .* CPU build"):
        penv.pick_device("cuda")
    with caplog.at_level("INFO", logger="trec_rank.parallel.env"):
        assert penv.pick_device("auto").type == "cpu"
    assert "sharding.device auto: cpu (torch 2.13.0+cpu is a CPU build" in caplog.text  # auto says what and why


def test_timeout_comes_from_the_environment() -> None:
    assert penv.timeout_seconds(None) == 1800 and penv.timeout_seconds("600") == 600
    with pytest.raises(ValueError, match="TREC_RANK_PG_TIMEOUT_S"):
        penv.timeout_seconds("10m")


def test_planner_memory_is_gib_and_defaults_to_the_gpu() -> None:
    h100 = 85_520_809_984  # what mem_get_info()[1] reports on an 80 GB H100: 79.6 GiB
    assert penv.planner_hbm_gib(None, None, h100) == pytest.approx(79.65, abs=0.01)
    assert penv.planner_hbm_gib(40.0, 70.0, h100) == 40.0 and penv.planner_hbm_gib(None, 70.0, h100) == 70.0
    assert penv.planner_hbm_gib(None, None, None) is None  # planning for a GPU from a CPU: torchrec's default
    assert penv.device_total_bytes("cuda") is None  # this CPU build has no GPU to ask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, run_dirs: list[str], out: str) -> None:
    """One 'node': torchrun's variables, then the real init_distributed with this node's run_dir."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TREC_RANK_PG_TIMEOUT_S="60")
    try:
        env = penv.init_distributed("cpu", run_dir=run_dirs[rank])
        timeout = dist.GroupMember.WORLD._get_backend(torch.device("cpu")).options._timeout
        result = f"ok rank={env.rank} timeout={int(timeout / timedelta(seconds=1))}"
    except ValueError as err:
        result = f"error {err}"
    finally:
        penv.shutdown()
    Path(out, f"rank{rank}").write_text(result)


def _two_nodes(tmp_path: Path, run_dirs: list[str]) -> list[str]:
    mp.start_processes(_rank, args=(_free_port(), run_dirs, str(tmp_path)), nprocs=2, start_method="spawn")
    return [(tmp_path / f"rank{r}").read_text() for r in range(2)]


def test_nodes_with_their_own_run_dirs_stop_with_one_line(tmp_path: Path) -> None:
    node_disks = [str(tmp_path / "node0" / "runs" / "x"), str(tmp_path / "node1" / "runs" / "x")]
    results = _two_nodes(tmp_path, node_disks)
    assert all(r.startswith(f"error {MESSAGE}") and "ranks [1]" in r and "\n" not in r for r in results), results
    assert list(Path(node_disks[0]).iterdir()) == []  # the probe is cleaned up


def test_shared_run_dir_passes_with_the_configured_timeout(tmp_path: Path) -> None:
    shared = str(tmp_path / "shared" / "runs" / "x")
    assert _two_nodes(tmp_path, [shared, shared]) == ["ok rank=0 timeout=60", "ok rank=1 timeout=60"]
    assert list(Path(shared).iterdir()) == []


def test_cuda_install_without_driver_is_one_line() -> None:
    nvml = OSError("libnvidia-ml.so.1: cannot open shared object file: No such file or directory")
    try:
        try:
            raise nvml
        except OSError as inner:
            raise RuntimeError("fbgemm_gpu failed to load") from inner
    except RuntimeError as err:
        why = penv.missing_driver(err)
    assert why is not None and "libnvidia-ml.so.1" in why and "CPU install" in why and "\n" not in why
    assert penv.missing_driver(ValueError("data.path: missing")) is None


def test_data_and_help_import_no_torchrec(tmp_path: Path) -> None:
    """A node whose CUDA fbgemm cannot load fails on `import torchrec`: `data`/--help must not need it."""
    code = ("import sys; from trec_rank.cli import main; rc = main(['data', 'synthetic', '--out', sys.argv[1]]); "
            "print(rc, sorted(m for m in ('torchrec', 'fbgemm_gpu') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout + proc.stderr
    assert "error: data synthetic: --schema CONFIG is required" in proc.stderr


def test_a_rank_error_lands_where_torchelastic_and_torchx_read_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        {}["missing"]
    except KeyError as err:
        penv.record_failure(err, lines=3)
    message = json.loads(error_file.read_text())["message"]
    assert message["message"].splitlines()[-1] == "KeyError: 'missing'" and len(message["message"].splitlines()) == 3
    assert "Traceback" in message["extraInfo"]["py_callstack"] and message["extraInfo"]["timestamp"].isdigit()
    penv.record_failure("data.path: no such directory")
    assert json.loads(error_file.read_text())["message"]["message"] == "data.path: no such directory"


def _env(device: str, world: int) -> penv.DistEnv:
    return penv.DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=world, device=torch.device(device))


def test_the_pipeline_runs_where_there_is_something_to_overlap() -> None:
    from trec_rank.config.experiment import TrainConfig as T
    from trec_rank.train.loop import pipelined

    assert not pipelined(T(), _env("cpu", 1))  # one CPU rank: nothing to overlap, the plain loop is faster
    assert pipelined(T(), _env("cpu", 2)) and pipelined(T(), _env("cuda", 1))
    assert pipelined(T(pipeline=True), _env("cpu", 1)) and not pipelined(T(pipeline=False), _env("cuda", 8))
    assert not pipelined(T(pipeline=True, nan_policy="skip"), _env("cuda", 8))  # skip decides before each update


def test_one_rank_has_no_ddp_and_keeps_the_checkpoint_names(adult_dir: Path) -> None:
    """DDP on one rank only costs (its reducer runs every step); DMP's names never had DDP's `module.`,
    so a one-rank checkpoint is the many-rank one (tests/test_train_equivalence.py resumes 2 -> 1)."""
    from torch.nn.parallel import DistributedDataParallel

    from trec_rank.config.experiment import load_config
    from trec_rank.runtime.model import ranking_spec, shard_model

    cfg = load_config(Path(__file__).parents[1] / "configs/adult_mmoe.yaml", [f"data.path={adult_dir}/adult"])
    env = penv.init_distributed("cpu")
    try:
        dmp = shard_model(ranking_spec(cfg), env)
        assert not any(isinstance(m, DistributedDataParallel) for m in dmp.modules())
        names = set(dmp.state_dict())
        assert all(n.startswith(("model.ebc.", "model.over.")) for n in names), sorted(names)
        # 13 tables + the stacked over-arch: experts' first layer, gates, towers, heads (a weight and a bias each)
        assert "model.ebc.embedding_bags.age_b.weight" in names and len(names) == 13 + 8
    finally:
        penv.shutdown()


GLOO_THREADS_AFTER_MAIN = (
    "import os, sys; from trec_rank.cli import main; rc = main(sys.argv[1:]); "
    "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]; "
    "print(rc, sorted(n for n in names if 'gloo' in n))")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names come from Linux's /proc")
def test_a_finished_job_leaves_no_gloo_threads_to_interpreter_exit(adult_dir: Path, tmp_path: Path) -> None:
    """A job's gloo threads outlived it: destroy_process_group() does not stop them, and TorchRec's sharded
    modules keep the group alive in reference cycles. They were torn down during interpreter exit, where
    now and then a rank of a finished 2-rank job aborted (SIGABRT) and torchrun failed the job. The CLI now
    frees the group before `main` returns."""
    config = Path(__file__).parents[1] / "configs/adult_mmoe.yaml"
    proc = subprocess.run([sys.executable, "-c", GLOO_THREADS_AFTER_MAIN, "train", str(config), "--run-dir",
                           str(tmp_path / "run"), "--set", f"data.path={adult_dir}/adult", "--set",
                           "train.max_steps=4", "--set", "data.eval_splits=[]"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout[-2000:]
