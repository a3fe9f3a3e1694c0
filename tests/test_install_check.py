"""scripts/check_install.py: the torch / fbgemm-gpu pairing that bootstrap and the Dockerfile verify.

The CUDA cases are decided from version strings (what a CUDA install reports); the script also
runs for real on this CPU install, where asking for the CUDA variant must fail with one line.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_install", ROOT / "scripts" / "check_install.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_cpu_torch_next_to_cuda_fbgemm_is_refused() -> None:
    why = check.verdict("cuda", "2.13.0+cpu", None, "cuda", 13)
    assert "torch 2.13.0+cpu is a CPU build" in why and "torch==2.13.0 " in why


def test_cuda_pairs() -> None:
    assert check.verdict("cuda", "2.13.0", "13.0", "cuda", 13) is None
    assert check.verdict("cuda", "2.13.0", "13.0", "cuda", None) is None  # fbgemm names no cudart: torch decides
    assert "CUDA 12.8 but fbgemm-gpu links CUDA 13" in check.verdict("cuda", "2.13.0+cu128", "12.8", "cuda", 13)
    assert "fbgemm-gpu is the cpu build" in check.verdict("cuda", "2.13.0", "13.0", "cpu", None)
    assert check.verdict("cpu", "2.13.0+cpu", None, "cpu", None) is None
    assert check.verdict("cpu", "2.13.0", "13.0", "cpu", None) is None  # a CUDA torch runs CPU jobs too


def test_linked_cuda_is_read_from_the_library(tmp_path: Path) -> None:
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"\x7fELF" + b"\0" * 64 + b"libc10.so\0libcudart.so.13\0libc.so.6\0")
    assert check.linked_cuda_major([lib]) == 13
    fbgemm = Path(importlib.util.find_spec("fbgemm_gpu").submodule_search_locations[0])
    assert check.linked_cuda_major([fbgemm / "fbgemm_gpu_config.so"]) is None  # this CPU build links no CUDA


def test_script_on_this_install() -> None:
    ok = subprocess.run([sys.executable, "scripts/check_install.py", "cpu"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "matching pair" in ok.stdout
    bad = subprocess.run([sys.executable, "scripts/check_install.py", "cuda"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "fbgemm-gpu is the cpu build" in bad.stderr
