"""Crash-safe distributed checkpoints with torch.distributed.checkpoint (DCP).

Layout: RUN_DIR/checkpoints/step-00000100/ holding DCP's per-rank shards, `.metadata`,
`trainer_state.json` (step, epoch, data position, config fingerprint) and `rng/rank-N.pt`.
Every rank writes into `step-N.tmp`; only after all ranks are done does rank 0 rename it, so a
directory without `.tmp` is always complete, and a crash mid-save leaves the previous one as the
latest. Loading goes through DCP, so a checkpoint reshards onto any plan or world size.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from trec_rank.runtime import faults
from trec_rank.runtime.safe_dcp import SafeFileSystemReader

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / STATE_FILE).is_file() and (p / ".metadata").is_file()]
    return [p for _, p in sorted(found)]


def resolve(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir / checkpoints dir whose latest complete checkpoint is used."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise ValueError(f"--checkpoint: no complete checkpoint at {p}")


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ckpt / STATE_FILE}: damaged checkpoint file ({err})") from None


def damaged_file(ckpt: Path) -> str | None:
    """The first file of `ckpt` that does not hold what its `.metadata` says (missing, cut short, or a
    tensor that does not load), as a message; None when every file reads. Run only after a load failed:
    it reads the whole checkpoint again."""
    metadata = SafeFileSystemReader(str(ckpt)).read_metadata()
    tensors = {fqn for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    for index, info in sorted(metadata.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        path = ckpt / info.relative_path
        if not path.is_file():
            return f"{path}: checkpoint file missing"
        if path.stat().st_size < info.offset + info.length:
            return f"{path}: damaged checkpoint file (cut short: {path.stat().st_size} bytes, needs " \
                   f"{info.offset + info.length})"
        if index.fqn in tensors:
            with open(path, "rb") as f:
                f.seek(info.offset)
                try:
                    torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
                except Exception as err:  # noqa: BLE001 - any failure: this file is damaged
                    return f"{path}: damaged checkpoint file ({index.fqn}: {type(err).__name__})"
    return None


def latest(run_dir: str | Path) -> Path | None:
    """RUN_DIR's newest complete checkpoint (what --resume continues from), None when there is none."""
    found = complete_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def check(ckpt: Path, fingerprint: str, source: str, flag: str = "--checkpoint") -> dict[str, Any]:
    """The checkpoint's trainer state, if its tensors were made for the model `source` builds.

    The one fingerprint check of every job kind (resume, init-from, eval, score): a checkpoint of
    another schema or model would fail deep inside DCP, or worse, load into a different model."""
    state = read_state(ckpt)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"{flag} {ckpt}: checkpoint was trained with another schema/model than {source} "
                         f"(fingerprint {state.get('fingerprint')} != {fingerprint})")
    return state


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states: the CPU generator, and its current GPU's once CUDA is in use (dropout
    and sampling on the GPU draw from that one)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(root: str | Path, step: int, model: torch.nn.Module, optimizer: Any, state: dict[str, Any],
         keep: int) -> Path:
    root = Path(root)
    final, tmp = root / f"step-{step:08d}", root / f"step-{step:08d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()},
             storage_writer=dcp.FileSystemWriter(str(tmp), overwrite=True))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank-{rank}.pt")
    faults.kill_if("save", step, rank)
    dist.barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s saved", final)
    dist.barrier()
    return final


def load(ckpt: Path, model: torch.nn.Module, optimizer: Any | None) -> dict[str, Any]:
    """Load in place under any plan/world size; returns the trainer state."""
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    # allow_partial_load: a table that moved between data_parallel and a fused kernel changes which
    # optimizer owns its state; its weights still load, its optimizer state restarts.
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)),
                 planner=DefaultLoadPlanner(allow_partial_load=True))
    except CheckpointException as err:
        raise ValueError(damaged_file(ckpt) or f"{ckpt}: checkpoint cannot be loaded ({err})") from None
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    rng = ckpt / "rng" / f"rank-{dist.get_rank()}.pt"
    if rng.is_file():
        try:
            saved = torch.load(rng, weights_only=True)
            torch.set_rng_state(saved["torch"])
        except Exception as err:  # noqa: BLE001 - any failure means: not our file, refuse it
            raise ValueError(f"{rng}: not a trec-rank RNG state, refused ({type(err).__name__})") from None
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    return read_state(ckpt)
