"""The pins users get: bootstrap, pyproject and the Dockerfile agree on the stack."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_pins_the_stack_and_dockerfile_uses_it() -> None:
    boot = (ROOT / "scripts" / "bootstrap.sh").read_text()
    for pin in ('"torch==2.13.0"', '"fbgemm-gpu-cpu==1.8.0"', '"fbgemm-gpu==1.8.0"', '"torchrec==1.8.0"',
                '"torchmetrics==1.0.3"', '"torchx==0.7.0"'):
        assert pin in boot, pin
    assert "--no-deps \"torchrec==1.8.0\"" in boot  # torchrec's metadata pins the CUDA fbgemm
    pyproject = (ROOT / "pyproject.toml").read_text()
    for dep in re.findall(r'"(pyarrow|tensorboard|torchx)==([\d.]+)"', pyproject):
        assert f'"{dep[0]}=={dep[1]}"' in boot, dep
    docker = (ROOT / "Dockerfile").read_text()
    assert "ARG VARIANT=cuda" in docker and "TREC_RANK_VARIANT=${VARIANT}" in docker
    assert docker.count("bash scripts/bootstrap.sh") == 2
    assert "COPY scripts/bootstrap.sh" in docker and "COPY pyproject.toml" in docker


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
