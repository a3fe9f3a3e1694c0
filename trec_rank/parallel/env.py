"""Process group and device: torchrun's environment in, one `DistEnv` out.

A plain `trec-rank train` (no torchrun) still gets a one-rank group, so DMP, the planner and DCP
run the same code path on a laptop and on a cluster. The decisions that only a GPU could show
(which backend, why CUDA is unusable, how much memory the planner may use) are pure functions
here so that CPU tests can pin them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trec_rank.parallel.host_memory import keep_freed_memory

log = logging.getLogger(__name__)
GIB = 1024**3
TIMEOUT_ENV = "TREC_RANK_PG_TIMEOUT_S"  # set by launch/components.py --pg_timeout_s
DEFAULT_TIMEOUT_S = 1800
MIN_DRIVER = 580  # the CUDA 13 wheels of torch 2.13 / fbgemm-gpu 1.8 need this NVIDIA driver


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device_type: str) -> str:
    """The process-group backend string for ranks on `device_type`.

    On CUDA a group of both backends: NCCL for CUDA tensors (the sharded embeddings' all-to-alls),
    gloo for the CPU tensors that metrics, the NaN guard and object collectives reduce. NCCL in
    torch 2.13 rejects CPU tensors, so a plain "nccl" group crashes the first eval."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def explain_no_cuda(torch_version: str, cuda_version: str | None, init_error: str | None,
                    device_count: int) -> str | None:
    """Why CUDA cannot be used, in one clause (None when it can); the inputs are what torch reports."""
    if cuda_version is None:
        return (f"torch {torch_version} is a CPU build (install the CUDA one: "
                "TREC_RANK_VARIANT=cuda make bootstrap, or use the CUDA image)")
    if init_error:
        first = init_error.strip().splitlines()[0]
        return (f"CUDA {cuda_version} does not start here: {first} (these wheels need NVIDIA driver "
                f">= {MIN_DRIVER}; `nvidia-smi` shows the node's)")
    if device_count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "no CUDA device is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
    return None


def cuda_problem() -> str | None:
    """`explain_no_cuda` for this process. torch.cuda.is_available() hides the cause; init() says it."""
    error = None
    if torch.version.cuda is not None:
        try:
            torch.cuda.init()
        except Exception as err:  # noqa: BLE001 - any failure to start CUDA is the answer we report
            error = str(err) or type(err).__name__
    count = torch.cuda.device_count() if torch.version.cuda is not None and error is None else 0
    return explain_no_cuda(torch.__version__, torch.version.cuda, error, count)


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """`sharding.device`: cuda fails loudly without a usable GPU; auto says what it chose and why."""
    problem = cuda_problem() if preference in ("auto", "cuda") else "sharding.device is cpu"
    if preference == "cuda" and problem:
        raise ValueError(f"sharding.device: cuda was asked for (a GPU job) but {problem}")
    if problem is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: {count} visible on this node "
                             "(run at most one rank per GPU: --nproc_per_node <= --gpu)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if preference == "auto" and local_rank == 0:
        log.info("sharding.device auto: %s%s", device, f" ({problem})" if problem else "")
    return device


def timeout_seconds(value: str | None) -> int:
    """The process-group timeout: `TREC_RANK_PG_TIMEOUT_S` (what the components' --pg_timeout_s sets)."""
    if value is None or value == "":
        return DEFAULT_TIMEOUT_S
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{TIMEOUT_ENV}: must be a whole number of seconds >= 1, got {value!r}")
    return int(value)


def planner_hbm_gib(explicit: float | None, configured: float | None, device_total_bytes: int | None) -> float | None:
    """Accelerator memory per rank for the planner, in GiB (2**30 bytes) like every `hbm_gb`.

    An explicit --hbm-gb wins, then the config's `sharding.hbm_gb`, then the GPU's real memory
    (torch.cuda.mem_get_info); None leaves torchrec's 32 GiB default (planning a GPU from a CPU)."""
    if explicit is not None:
        return explicit
    if configured is not None:
        return configured
    return device_total_bytes / GIB if device_total_bytes else None


def device_total_bytes(device_type: str) -> int | None:
    """Total memory of this process's GPU, None off CUDA or when CUDA cannot start."""
    if device_type != "cuda" or cuda_problem() is not None:
        return None
    return torch.cuda.mem_get_info()[1]


def missing_driver(err: BaseException) -> str | None:
    """The one line for a CUDA install on a node without the NVIDIA driver, None for other errors.

    The CUDA fbgemm-gpu links the driver's NVML (libnvidia-ml.so.1), so on such a node every
    `import torchrec` fails; planning and data preparation need no GPU and run from the CPU install."""
    cause: BaseException | None = err
    while cause is not None:
        found = re.search(r"(libnvidia-ml\.so[.\d]*|libcuda\.so[.\d]*)", str(cause))
        if found:
            return (f"this CUDA install cannot load here: {found.group(1)} (the NVIDIA driver's library) is "
                    f"missing. Run `trec-rank plan` from the CPU install (TREC_RANK_VARIANT=cpu make bootstrap), "
                    f"or on a GPU node with driver >= {MIN_DRIVER}")
        cause = cause.__cause__ or cause.__context__
    return None


def record_failure(err: BaseException | str, lines: int = 12) -> None:
    """Under torchrun, leave this rank's error where torchelastic collects a job's root cause.

    torchrun copies the first failing worker's $TORCHELASTIC_ERROR_FILE to its own, which TorchX
    names per replica; `torchx run`/`torchx status` then print it as the replica's `error_msg`
    instead of `msg: <NONE>`. A user error is its one line; a bug is its traceback's last lines."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    if isinstance(err, str):
        text, stack = err, ""
    else:
        stack = "".join(traceback.format_exception(err))
        text = "\n".join(stack.rstrip().splitlines()[-lines:])
    body = {"message": {"message": text, "extraInfo": {"py_callstack": stack, "timestamp": str(int(time.time()))}}}
    Path(path).write_text(json.dumps(body))


def _attempt_store(rank: int, world: int, timeout_s: int) -> dist.Store:
    """torchrun's store, namespaced by restart attempt.

    After an elastic restart the store still holds the previous attempt's gloo addresses (seen
    with torch 2.13: the new rank 0 dials the dead rank 1 and gives up); a per-attempt prefix
    makes every attempt rendezvous from scratch."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"trec_rank/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def init_distributed(preference: str = "auto", timeout_s: int | None = None,
                     run_dir: str | Path | None = None) -> DistEnv:
    """Join torchrun's group (or make a single-rank one): gloo on CPU, gloo+NCCL on CUDA.

    `timeout_s` (default: $TREC_RANK_PG_TIMEOUT_S, else 1800) bounds every collective. With
    `run_dir`, a multi-rank job first proves that every rank sees the same directory there
    (`storage.check_shared_dir`), so checkpoints cannot scatter over node-local disks. Every job kind
    starts here, so this is also where the host allocator is told to keep what steps free (host_memory)."""
    keep_freed_memory()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    timeout_s = timeout_s or timeout_seconds(os.environ.get(TIMEOUT_ENV))
    device = pick_device(preference, local_rank)
    if not dist.is_initialized():
        backend = backend_for(device.type)
        timeout = timedelta(seconds=timeout_s)
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend, store=_attempt_store(rank, world, timeout_s), rank=rank,
                                    world_size=world, timeout=timeout)
        elif "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # one process: an in-memory store, no port to race for
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if run_dir is not None and world > 1:
        from trec_rank.parallel.storage import check_shared_dir

        check_shared_dir(Path(run_dir))
    return DistEnv(rank, world, local_rank, local_world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_process_groups() -> None:
    """Free the destroyed process groups now, while the interpreter is whole; the CLI calls this once a
    command's frames are gone.

    A gloo group's threads live as long as any Python object refers to the group: destroy_process_group()
    unregisters it but does not stop them. TorchRec's sharded modules refer to it from reference cycles,
    which only the garbage collector frees, so the group outlived the job and was torn down during
    interpreter finalisation. There a rank intermittently aborted after a job that had finished
    ("terminate called without an active exception", SIGABRT; about one 2-rank run in 170 on a busy
    2-core machine; it failed two full test runs), and torchrun reported the whole job failed. One full
    collection (~0.5 s) frees the group and joins its threads."""
    gc.collect()
