"""scripts/gpu_smoke.sh --device cpu: the GPU smoke script runs end to end here, GPU-only checks SKIP.

So that the script is not dead code until it meets a GPU: every check that can run on CPU (install
pairing, planning, DIN train/checkpoint/resume, HSTU, eval and scoring of the checkpoint on CPU,
sharded and int8 scoring, speed) must PASS with tiny step counts.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_ONLY = {"device", "memory", "din-adam", "jagged", "sync-debug"}
ON_CPU = {"install", "plan", "din", "resume", "hstu", "eval-on-cpu", "score", "score-on-cpu", "score-sharded",
          "score-int8", "speed-din", "speed-hstu"}


def test_gpu_smoke_script_on_cpu(ml100k_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", "scripts/gpu_smoke.sh", "--device", "cpu", "--data", str(ml100k_dir),
                           "--out", str(tmp_path / "smoke"), "--steps", "8"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    lines = [line.split(None, 2) for line in proc.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    status = {name: st for st, name, *_ in lines}
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("logs in " + str(tmp_path / "smoke") + ")"), \
        proc.stdout + proc.stderr[-3000:]
    assert {n for n, s in status.items() if s == "SKIP"} == GPU_ONLY, proc.stdout
    assert {n for n, s in status.items() if s == "PASS"} == ON_CPU, proc.stdout
    assert (tmp_path / "smoke" / "din" / "checkpoints").is_dir()
