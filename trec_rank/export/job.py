"""`trec-rank export`: a ranking checkpoint -> an inference artifact (artifact.py describes the directory).

Route: `torch.export.export` (non-strict) of `FlatModel`, the model behind a flat tuple of tensors, saved
with `torch.export.save`; docs/export.md says why, and what TorchScript and strict export failed on. The
weights are loaded as `trec-rank score` loads them (the unsharded model, CPU, eval mode), and int8 swaps
the embedding modules for TorchRec's int8 ones before the trace, so the program holds int8 tables.

Before the directory is moved into place the saved program is loaded back and run on a labelled split
(`--eval-split`, default test, when it exists): its probabilities must equal the eager model's within
TOLERANCE, and for int8 the AUC change against the fp32 model is measured, printed and recorded.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from torch import nn

from trec_rank.config.experiment import ExperimentConfig, load_config
from trec_rank.config.models import side_bounds
from trec_rank.config.typed import to_dict
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset, list_parquet_files
from trec_rank.export.artifact import ARTIFACT_FILE, CONFIG_FILE, FORMAT, PROGRAM_FILE, load_program
from trec_rank.export.compat import traceable
from trec_rank.export.contract import Contract, FlatModel
from trec_rank.models.ranking import RankingModel
from trec_rank.runtime import checkpoint
from trec_rank.runtime.metrics import auc
from trec_rank.runtime.model import fingerprint, ranking_spec
from trec_rank.score.model import load_unsharded, quantize_int8

TOLERANCE = 1e-5  # exported vs eager probabilities, max abs
CHECK_ROWS = 200_000  # rows of the eval split the checks read at most
HASHING = ("oov: hash maps an integer id to id mod num_embeddings and a string id to BLAKE2b-64 (8-byte digest, "
           "little-endian uint64) mod num_embeddings; oov: oov_row maps ids >= num_embeddings to row "
           "num_embeddings; oov: error rejects them (trec_rank/data/convert.py)")


@dataclass
class ExportRequest:
    config: str
    overrides: list[str]
    checkpoint: str
    out: str
    quantize: str | None  # None | "int8"
    eval_split: str  # split under data.path for the checks; "" for none


def check_out(out: Path) -> bool:
    """Refuse an --out that holds anything but an earlier export (that one is replaced); True if it exists."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / ARTIFACT_FILE).is_file():
        raise ValueError(f"--out {out}: exists, is not empty and holds no {ARTIFACT_FILE} (not an earlier export); "
                         "choose another --out")
    return out.is_dir() and any(out.iterdir())


def versions() -> dict[str, str]:
    import fbgemm_gpu
    import torchrec

    try:
        ours = importlib.metadata.version("trec-rank")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {"torch": torch.__version__, "torchrec": torchrec.__version__, "fbgemm_gpu": fbgemm_gpu.__version__,
            "trec_rank": ours}


def schema_json(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every input feature with what a request needs to know about it: kind, column, table size, max length."""
    s = cfg.schema
    features = []
    for f in s.features:
        if f.kind == "label":
            continue
        entry: dict[str, Any] = {"name": f.name, "kind": f.kind, "column": f.column}
        if f.table:
            t = s.table(f.table)
            entry.update(table=t.name, num_embeddings=t.num_embeddings, table_rows=s.table_rows(t.name),
                         embedding_dim=t.embedding_dim, oov=f.oov, pooling=f.pooling)
        if f.kind == "sequence":
            entry.update(max_len=f.max_len, side=dict(f.side))
        features.append(entry)
    bounds = {k: v[0] for k, v in side_bounds(cfg.model.typed_params).items()}
    return {"features": features, "labels": [{"name": f.name, "column": f.column} for f in s.labels],
            "side_bounds": bounds, "hashing": HASHING}


def trace(model: nn.Module, cfg: ExperimentConfig, contract: Contract
          ) -> tuple[torch.export.ExportedProgram, list[str]]:
    """(the exported FlatModel, its output names): outputs are the model's keys not starting with '_'."""
    assert isinstance(model, RankingModel), type(model)
    example = contract.example({f.name: f.max_len for f in cfg.schema.features})
    with torch.no_grad():
        keys = FlatModel(model, contract, []).model(FlatModel(model, contract, []).batch(example))
    outputs = [k for k in keys if not k.startswith("_")]
    flat = FlatModel(model, contract, outputs).eval()
    with traceable(model):
        program = torch.export.export(flat, example, dynamic_shapes=contract.dynamic_shapes(), strict=False)
    return program, outputs


def _labelled(cfg: ExperimentConfig, split: str) -> Path | None:
    path = Path(cfg.data.path) / split
    if not split or not path.exists():
        return None
    names = pq.read_schema(list_parquet_files(path)[0]).names
    return path if all(f.column in names for f in cfg.schema.labels) else None


@torch.no_grad()
def check(program: nn.Module, model: nn.Module, reference: nn.Module | None, cfg: ExperimentConfig,
          contract: Contract, outputs: list[str], split: Path) -> dict[str, Any]:
    """Run the saved program, the eager model and (int8) the fp32 model on `split`: max |diff| and AUCs."""
    ds = ParquetDataset(str(split), cfg.schema, cfg.data.eval_batch_size, shuffle=False, drop_last=False,
                        with_labels=True, validate=cfg.data.validate, side_bounds=side_bounds(cfg.model.typed_params))
    diff, rows = 0.0, 0
    got: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    ref: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    labels: dict[str, list[np.ndarray]] = {}
    batch: Batch
    for batch in ds.batches(0, 0):
        exported = program(*contract.flatten(batch))
        eager = model(batch)
        diff = max(diff, *(float((p - torch.sigmoid(eager[k].float())).abs().max()) for k, p in zip(outputs, exported)))
        fp32 = eager if reference is None else reference(batch)
        for k, p in zip(outputs, exported, strict=True):
            got[k].append(p.numpy())
            ref[k].append(torch.sigmoid(fp32[k].float()).numpy())
        for task, y in batch.labels.items():
            labels.setdefault(task, []).append(y.numpy())
        rows += batch.batch_size
        if rows >= CHECK_ROWS:
            break
    result: dict[str, Any] = {"split": str(split), "rows": rows, "max_abs_diff_vs_eager": diff}
    if reference is not None:
        result["auc"] = {}
        for task in [t for t in cfg.model.tasks if t in labels and t in outputs]:
            truth = np.concatenate(labels[task])
            a32, a8 = auc(np.concatenate(ref[task]), truth), auc(np.concatenate(got[task]), truth)
            result["auc"][task] = {"fp32": a32, "int8": a8, "delta": a8 - a32}
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _install(tmp: Path, out: Path, replace: bool) -> None:
    """Move the finished tmp dir to `out`; an earlier export there is swapped out first, then deleted."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    assert replace or not old.exists()


def run(req: ExportRequest) -> dict[str, Any]:
    """Export; returns artifact.json's dict. ValueError (one `error:` line) for every user mistake."""
    from trec_rank.retrieval.config import is_retrieval_config

    out = Path(req.out)
    existed = check_out(out)
    if is_retrieval_config(req.config):
        raise ValueError(f"{req.config}: a retrieval config (kind: retrieval); export covers ranking models only")
    cfg = load_config(req.config, req.overrides)
    ckpt = checkpoint.resolve(req.checkpoint)
    spec = ranking_spec(cfg)
    state = checkpoint.check(ckpt, spec.fingerprint, cfg.source)
    t0 = time.perf_counter()
    model = load_unsharded(cfg, ckpt, torch.device("cpu"))
    reference = None
    if req.quantize:
        reference = copy.deepcopy(model)
        model = quantize_int8(model).eval()
    contract = Contract.from_config(cfg)
    program, outputs = trace(model, cfg, contract)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.export.save(program, str(tmp / PROGRAM_FILE))
        resolved = to_dict(cfg)
        resolved["data"]["path"] = os.path.abspath(cfg.data.path)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
        assert ranking_spec(load_config(tmp / CONFIG_FILE)).fingerprint == spec.fingerprint, "config.yaml round trip"
        split = _labelled(cfg, req.eval_split)
        checks = None
        if split is not None:
            checks = check(load_program(tmp / PROGRAM_FILE), model, reference, cfg, contract, outputs, split)
            if checks["max_abs_diff_vs_eager"] > TOLERANCE:
                raise RuntimeError(f"export: the saved program differs from the model by "
                                   f"{checks['max_abs_diff_vs_eager']:.3g} on {split} (> {TOLERANCE}); not written")
        meta = {
            "format": FORMAT, "program": PROGRAM_FILE, "config_file": CONFIG_FILE,
            "route": f"torch.export.export(strict=False) + torch.export.save, torch {torch.__version__}; CPU",
            "model": {"name": cfg.model.name, "tasks": cfg.model.tasks},
            "outputs": outputs,
            "output_tensors": {"dtype": "float32", "shape": ["B"], "meaning": "sigmoid of the logit: "
                               "`trec-rank score` writes it as p_<name>", "order": outputs},
            "inputs": contract.tensors(), "contract": contract.to_json(), "schema": schema_json(cfg),
            "quantize": req.quantize,
            "fingerprints": {"model": spec.fingerprint, "config": fingerprint(to_dict(cfg))},
            "checkpoint": {"path": str(ckpt.resolve()), "step": state.get("step"),
                           "fingerprint": state.get("fingerprint"),
                           "metadata_sha256": _sha256(ckpt / ".metadata")},
            "versions": versions(), "check": checks,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1))
        _install(tmp, out, existed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _print_summary(meta, out, existed)
    return meta


def _print_summary(meta: dict[str, Any], out: Path, replaced: bool) -> None:
    checks = meta["check"]
    if checks is None:
        print("export: no labelled eval split found; the program was not checked on data (see --eval-split)")
    else:
        print(f"export: saved program vs model on {checks['rows']} rows of {checks['split']}: "
              f"max |diff| {checks['max_abs_diff_vs_eager']:.2e}")
        for task, a in checks.get("auc", {}).items():
            print(f"export: int8 vs fp32 on {checks['rows']} rows: {task}/auc {a['fp32']:.5f} -> {a['int8']:.5f} "
                  f"(dAUC {a['delta']:+.5f})")
    size = (out / PROGRAM_FILE).stat().st_size / 2**20
    print(f"export: {'replaced the earlier export in' if replaced else 'wrote'} {out} ({PROGRAM_FILE} {size:.1f} MiB, "
          f"outputs {', '.join(meta['outputs'])}, quantize {meta['quantize'] or 'none'})", flush=True)
