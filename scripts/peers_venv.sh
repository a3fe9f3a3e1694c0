#!/usr/bin/env bash
# Idempotent set-up of .venv-peers: the libraries benchmarks/peers.py and benchmarks/vocab_sweep.py
# compare trec-rank against (DeepCTR-Torch, torch-rechub), in their own venv so that nothing they
# pull can change the project's .venv. Same torch as the project (the CPU build of 2.13.0), installed
# first so that no peer's requirement can bring another torch. The peers go in with --no-deps and
# then only what their DIN/MMoE models and training loops import (checked by the import line at the
# end): torch-rechub's top-level package imports every model and trainer, which need numpy, pandas,
# scikit-learn and tqdm, nothing from its optional extras; DeepCTR-Torch's package import starts a
# version check against the registry (requests, packaging), which benchmarks/peers_worker.py disarms.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv-peers
STAMP="$VENV/.peers-stamp"

want="$(sha256sum scripts/peers_venv.sh | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
$PIP install --no-deps "deepctr-torch==0.3.0" "torch-rechub==0.9.0"
$PIP install "numpy" "pandas" "scikit-learn" "tqdm" "requests" "packaging"
"$VENV/bin/python" - <<'EOF'
import requests
requests.get = None  # no version check call from this import test (it fails inside its own try)
import torch
from deepctr_torch.models import DIN
from deepctr_torch.models.multitask import MMOE
from torch_rechub.models.ranking import DIN as RDIN
from torch_rechub.models.multi_task import MMOE as RMMOE
from torch_rechub.trainers import CTRTrainer, MTLTrainer
assert torch.__version__.startswith("2.13.0"), torch.__version__
EOF
echo "$want" > "$STAMP"
echo "peers_venv: $VENV ready (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
