"""The host allocator keeps what a step frees (trec_rank.parallel.host_memory): a large-batch dense step
stops faulting its memory in again every step, and the user's own allocator choice is left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trec_rank.parallel.host_memory import keep_freed_memory

# An MMoE over-arch step at batch 2048 (trec_rank's own modules, Adam), after warm-up: minor page faults
# per step. `setup` runs first: init_distributed (as every job does) or nothing (glibc as it starts).
STEPS = """
import resource, torch
{setup}
from trec_rank.config.models import MoEParams
from trec_rank.models.dice import make_activation
from trec_rank.models.towers import build_network
torch.manual_seed(0)
net = build_network("mmoe", 102, ["a", "b"], MoEParams(experts=4, expert_hidden=[64]), make_activation("relu"), None)
opt = torch.optim.Adam(net.parameters())
def step():
    out, _ = net.forward_gates(torch.randn(2048, 102))
    opt.zero_grad()
    sum(o.square().mean() for o in out.values()).backward()
    opt.step()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_step(setup: str) -> float:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}  # no MALLOC_* or LD_PRELOAD from the caller
    out = subprocess.run([sys.executable, "-c", STEPS.format(setup=setup)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_job_process_stops_refaulting_the_memory_its_steps_free() -> None:
    """glibc alone returned each step's freed heap to the kernel and faulted it in again (~380 faults a
    step here, ~700-900 in the real trainer at batch 2048); a process that went through init_distributed
    keeps it."""
    plain = _faults_per_step("")
    job = _faults_per_step("from trec_rank.parallel.env import init_distributed, shutdown\n"
                           "init_distributed('cpu'); shutdown()")
    assert plain > 150, f"glibc kept the memory by itself here ({plain} faults a step): the test shows nothing"
    assert job < plain / 3, (job, plain)


@pytest.mark.parametrize("environ", [{"MALLOC_ARENA_MAX": "2"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                     {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}])
def test_the_users_own_allocator_settings_are_left_alone(environ: dict[str, str]) -> None:
    assert keep_freed_memory(environ) is False
