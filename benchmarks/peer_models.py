"""DIN and MMoE trained by the peer libraries' own loops; run in .venv-peers by benchmarks/peers.py.

    .venv-peers/bin/python benchmarks/peer_models.py SPEC.json OUT.json

SPEC: {"library": "deepctr" | "rechub", "model": "din" | "mmoe", "batch": int, "threads": int,
"data": NPZ, "vocab": {column: rows}, "evaluate": bool}. NPZ holds `train/<column>` and
`valid/<column>` arrays, written by the driver from trec-rank's Parquet splits:
  din:  user_id, age_bucket, gender, occupation, item_id, item_genre [N] int64; hist_item_id,
        hist_genre [N, 50] int64, padded on the right with 0 (0 is no item or genre: the driver
        shifts genres by one); seq_length [N]; like [N] float32.
  mmoe: the 13 census id columns [N] int64, the 6 standardised `*_f` columns [N] float32,
        income and never_married [N] float32.
Each model is built the way the library's own examples build it, at the shapes of issue 18: DIN with
embeddings 16, a Dice activation unit [64, 32] and an MLP [200, 80] (DeepCTR-Torch's MLP keeps its
default ReLU: its Dice asserts a 3-d input there); MMoE with embeddings 8, 4 experts [64] and towers
[32]. Optimizers and regularisers are the libraries' defaults (DeepCTR: compile("adam") = Adam(1e-3)
over every parameter plus its L2 on every embedding table; torch-rechub: Adam(1e-3, weight decay
1e-5) over every parameter), since those are what their users run. The training loop is the
library's: DeepCTR's `model.fit` (verbose=0: no per-batch training metrics, which would only add
cost) and torch-rechub's `train_one_epoch`, the loop its `fit` runs before its validation and save.
OUT: wall seconds of that call, the StepClock summary (step_clock.py), and the valid AUC per task.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_clock import StepClock  # noqa: E402

DIN_USER = ["user_id", "age_bucket", "gender", "occupation"]
DIN_TARGET = {"item_id": "hist_item_id", "item_genre": "hist_genre"}  # target -> history column
DIN_TASKS = ["like"]
MMOE_TASKS = ["income", "never_married"]


def split(npz: np.lib.npyio.NpzFile, name: str) -> dict[str, np.ndarray]:
    return {k.split("/", 1)[1]: npz[k] for k in npz.files if k.startswith(name + "/")}


def run_deepctr(spec: dict, train: dict, valid: dict) -> tuple[float, np.ndarray]:
    import requests
    requests.get = None  # DeepCTR-Torch's import starts a registry version check; let it fail at once
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN
    from deepctr_torch.models.multitask import MMOE

    vocab, batch = spec["vocab"], spec["batch"]
    if spec["model"] == "din":
        # DeepCTR-Torch's DIN finds each behaviour sequence under the name "hist_" + target name
        rename = {"hist_item_id": "hist_item_id", "hist_genre": "hist_item_genre"}
        cols = [SparseFeat(c, vocab[c], 16) for c in [*DIN_USER, *DIN_TARGET]]
        cols += [VarLenSparseFeat(SparseFeat(rename[h], vocab[t], 16, embedding_name=t), maxlen=50,
                                  length_name="seq_length") for t, h in DIN_TARGET.items()]
        model = DIN(cols, list(DIN_TARGET), dnn_hidden_units=(200, 80), att_hidden_size=(64, 32),
                    att_activation="Dice", device="cpu")
        model.compile("adam", "binary_crossentropy")
        tasks = DIN_TASKS
    else:
        dense = [c for c in train if c.endswith("_f")]
        cols = [SparseFeat(c, rows, 8) for c, rows in vocab.items()] + [DenseFeat(c, 1) for c in dense]
        model = MMOE(cols, num_experts=4, expert_dnn_hidden_units=(64,), gate_dnn_hidden_units=(),
                     tower_dnn_hidden_units=(32,), task_types=("binary", "binary"), task_names=tuple(MMOE_TASKS),
                     device="cpu")
        model.compile("adam", ["binary_crossentropy", "binary_crossentropy"])
        tasks = MMOE_TASKS
        rename = {}

    def inputs(rows: dict) -> dict:
        return {rename.get(k, k): v for k, v in rows.items() if k not in tasks}

    labels = np.stack([train[t] for t in tasks], 1).astype(np.float32)
    t0 = time.perf_counter()
    model.fit(inputs(train), labels if len(tasks) > 1 else labels[:, 0], batch_size=batch, epochs=1, verbose=0)
    wall = time.perf_counter() - t0
    pred = model.predict(inputs(valid), 2048) if spec["evaluate"] else None
    return wall, pred


def run_rechub(spec: dict, train: dict, valid: dict) -> tuple[float, np.ndarray]:
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.models.ranking import DIN
    from torch_rechub.trainers import CTRTrainer, MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    vocab, batch = spec["vocab"], spec["batch"]
    if spec["model"] == "din":
        features = [SparseFeature(c, vocab[c], 16) for c in DIN_USER]
        targets = [SparseFeature(c, vocab[c], 16, padding_idx=0) for c in DIN_TARGET]
        history = [SequenceFeature(h, vocab[t], 16, pooling="concat", shared_with=t) for t, h in DIN_TARGET.items()]
        model = DIN(features, history, targets, mlp_params={"dims": [200, 80]},
                    attention_mlp_params={"dims": [64, 32], "activation": "dice"})
        trainer = CTRTrainer(model, n_epoch=1, device="cpu")  # train_one_epoch saves nothing
        tasks = DIN_TASKS
    else:
        features = [SparseFeature(c, vocab[c], 8) for c in vocab] + [DenseFeature(c) for c in train if c.endswith("_f")]
        model = MMOE(features, ["classification", "classification"], 4, {"dims": [64]}, [{"dims": [32]}] * 2)
        trainer = MTLTrainer(model, ["classification", "classification"], n_epoch=1, device="cpu")
        tasks = MMOE_TASKS

    def loader_args(rows: dict) -> tuple[dict, np.ndarray]:
        y = np.stack([rows[t] for t in tasks], 1) if len(tasks) > 1 else rows[tasks[0]]
        return {k: v for k, v in rows.items() if k not in tasks and k != "seq_length"}, y

    x_tr, y_tr = loader_args(train)
    x_va, y_va = loader_args(valid or train)  # no valid rows when not evaluating (vocab_sweep.py)
    train_dl, valid_dl, _ = DataGenerator(x_tr, y_tr).generate_dataloader(x_va, y_va, x_va, y_va, batch_size=batch)
    t0 = time.perf_counter()
    trainer.train_one_epoch(train_dl)
    wall = time.perf_counter() - t0
    if not spec["evaluate"]:
        return wall, None
    model.eval()
    with torch.no_grad():
        pred = np.concatenate([model(x).reshape(len(y), -1).numpy() for x, y in valid_dl])
    return wall, pred


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    npz = np.load(spec["data"])
    train, valid = split(npz, "train"), split(npz, "valid")
    clock = StepClock()
    wall, pred = {"deepctr": run_deepctr, "rechub": run_rechub}[spec["library"]](spec, train, valid)
    clock.close()
    tasks = DIN_TASKS if spec["model"] == "din" else MMOE_TASKS
    auc = {t: float(roc_auc_score(valid[t], pred[:, i])) for i, t in enumerate(tasks)} if pred is not None else {}
    rows = len(train[tasks[0]])
    Path(sys.argv[2]).write_text(json.dumps({"rows": rows, "wall_s": wall, "auc": auc, **clock.summary()}))


if __name__ == "__main__":
    main()
