"""A new user's first mistakes are reported at once: no torch import, one line naming what they wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import sys; from trec_rank.cli import main; rc = main(sys.argv[1:]); "
         "print(rc, 'torch' in sys.modules)")


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("command", "path", "hint"), [
    ("train", "data/ml-1m/ranking", "trec-rank data ml-1m --source YOUR_DOWNLOAD --out data/ml-1m"),
    ("train", "data/ml-100k/ranking", "trec-rank data ml-100k --out data/ml-100k"),
    ("eval", "mine/ranking", "trec-rank data describe PATH"),
])
def test_missing_data_is_named_as_written_before_torch_loads(tmp_path: Path, command: str, path: str,
                                                              hint: str) -> None:
    config = str(ROOT / "configs" / "ml100k_din.yaml")
    extra = ["--run-dir", "runs/x"] if command == "train" else ["--checkpoint", "runs/x"]
    proc = _cli(tmp_path, command, config, *extra, "--set", f"data.path={path}")
    assert proc.stdout.split() == ["2", "False"], proc.stderr  # exit 2, torch never imported
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and f"data.path {path}:" in line and hint in line
    assert not (tmp_path / "runs").exists()  # nothing written


def test_config_mistake_is_reported_before_torch_loads(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "train", str(ROOT / "configs" / "ml100k_hstu.yaml"), "--run-dir", "r",
                "--set", "model.params.num_blockz=2")
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "num_blockz" in line
