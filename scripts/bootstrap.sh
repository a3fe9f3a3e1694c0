#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv with the pinned stack.
# TREC_RANK_VARIANT=cpu (default) | cuda chooses fbgemm-gpu-cpu or the CUDA fbgemm-gpu.
# A stamp file records the requirement hash so a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT="${TREC_RANK_VARIANT:-cpu}"
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.trec-rank-stamp"

case "$VARIANT" in
  cpu)  FBGEMM="fbgemm-gpu-cpu==1.8.0"; OTHER="fbgemm-gpu" ;;
  cuda) FBGEMM="fbgemm-gpu==1.8.0"; OTHER="fbgemm-gpu-cpu" ;;
  *) echo "bootstrap: TREC_RANK_VARIANT must be 'cpu' or 'cuda', got '$VARIANT'" >&2; exit 2 ;;
esac

want="$VARIANT $(cat scripts/bootstrap.sh scripts/check_install.py pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
# Both variants install the same fbgemm_gpu/ package: switching leaves the other's files unless removed.
$PIP uninstall -y "$OTHER" 2>/dev/null || true
$PIP install "$FBGEMM"
# torchrec's metadata pins the CUDA fbgemm-gpu: install it alone, then its real needs.
$PIP install --no-deps "torchrec==1.8.0"
$PIP install "tensordict==0.15.3" "torchmetrics==1.0.3" "tqdm" "pyre-extensions" "iopath"
$PIP install --no-deps -e .
$PIP install "torchx==0.7.0" "pyarrow==26.0.1" "tensorboard==2.21.0" "PyYAML" "filelock" "pytest" "pytest-xdist==3.8.0" "ruff" "docstring-parser"
# TorchX's kubernetes scheduler (and its --dryrun) needs the client; it pulls urllib3 2.x, which pip
# flags against torchx 0.7.0's pin but which works for everything torchx does here.
$PIP install "kubernetes==37.0.2"
# `trec-rank report` draws its PNG with matplotlib (Agg backend, no display needed).
$PIP install "matplotlib==3.11.2"
$PIP install "fastapi==0.163.2" "uvicorn==0.54.0"  # `trec-rank serve`: HTTP JSON (docs/serving.md)
# `make lint`: the import-layer contracts and the type checker.
$PIP install "import-linter==2.17" "mypy==2.4.1"
# A CPU torch next to the CUDA fbgemm-gpu (pip found a local CPU wheel first) installs without error:
# check the pair, and fail here with one line rather than on the cluster.
"$VENV/bin/python" scripts/check_install.py "$VARIANT"
echo "$want" > "$STAMP"
echo "bootstrap: .venv ready ($VARIANT)"
