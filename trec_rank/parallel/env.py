"""Process group and device: torchrun's environment in, one `DistEnv` out.

A plain `trec-rank train` (no torchrun) still gets a one-rank gloo/NCCL group, so DMP, the
planner and DCP run the same code path on a laptop and on a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("sharding.device: 'cuda' requested but no CUDA device is available "
                         "(install the CUDA variant: TREC_RANK_VARIANT=cuda make test)")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _attempt_store(rank: int, world: int, timeout_s: int) -> dist.Store:
    """torchrun's store, namespaced by restart attempt.

    After an elastic restart the store still holds the previous attempt's gloo addresses (seen
    with torch 2.13: the new rank 0 dials the dead rank 1 and gives up); a per-attempt prefix
    makes every attempt rendezvous from scratch."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"trec_rank/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def init_distributed(preference: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join torchrun's group (or make a single-rank one); NCCL on CUDA, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = pick_device(preference, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend, store=_attempt_store(rank, world, timeout_s), rank=rank,
                                    world_size=world, timeout=timedelta(seconds=timeout_s))
        elif "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:  # one process: an in-memory store, no port to race for
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank, world, local_rank, local_world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
