# Two commands do all the set-up on a fresh machine:
#   make demo   bootstrap .venv, prepare MovieLens-100K, train on 2 local ranks (TorchX), score the test split
#   make test   bootstrap .venv and run the whole test suite (TEST_WORKERS pytest-xdist workers, default 2)
#   make test-fast   the unit tier only (no subprocesses), for editing
#   make lint   ruff, the import-layer contracts (import-linter) and the type checker (mypy)
# TREC_RANK_VARIANT=cuda selects the CUDA fbgemm-gpu build (default: cpu).

VENV := .venv
BIN := $(VENV)/bin
DATA := data/ml-100k
RUN := runs/demo
export PATH := $(CURDIR)/$(BIN):$(PATH)
export OMP_NUM_THREADS ?= 1
# Most tests wait on process start-up (interpreter, torch, torchrec imports), so two workers overlap it
# even on 2 cores; --dist loadfile keeps a module on one worker, so its session fixtures run once.
TEST_WORKERS ?= 2

.PHONY: bootstrap demo test test-fast lint clean

bootstrap:
	@bash scripts/bootstrap.sh

$(DATA)/_manifest.json: | bootstrap
	$(BIN)/trec-rank data ml-100k --out $(DATA)

demo: bootstrap $(DATA)/_manifest.json
	rm -rf $(RUN)
	$(BIN)/torchx run -s local_cwd launch/components.py:train --config configs/ml100k_base.yaml \
		--run_dir $(RUN) --nproc_per_node 2 --resume False
	$(BIN)/torchx run -s local_cwd launch/components.py:score --config configs/ml100k_base.yaml \
		--checkpoint $(RUN) --input $(DATA)/ranking/test --output $(RUN)/scores --nproc_per_node 2
	@echo "== metrics ($(RUN)/metrics.json)"; cat $(RUN)/metrics.json; echo
	@echo "== scores ($(RUN)/scores/_SUCCESS)"; cat $(RUN)/scores/_SUCCESS

test: bootstrap
	$(BIN)/python -m pytest tests -q -p no:warnings -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: bootstrap
	$(BIN)/python -m pytest tests -q -p no:warnings -m unit --durations=10

lint: bootstrap
	$(BIN)/ruff check trec_rank tests launch benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf runs torchx_logs
