"""The scoring model: a training checkpoint loaded unsharded, sharded across the ranks, or with int8 tables.

Which one is decided once on rank 0 (and broadcast, so all ranks agree):
- unsharded (default): `build_model` on meta, materialised, the checkpoint's "model" state loaded with
  `dcp.load(no_dist=True)`. Every process holds the whole model, so ranks never talk while scoring.
- sharded: `--sharded` or `--plan`, or automatically when the fp32 table bytes times the processes sharing one
  memory (local_world_size on CPU, 1 per GPU) exceed MEMORY_FRACTION of what is available there
  (MemAvailable; the GPU's free memory), as seen by rank 0 at start-up. The training path builds it
  (`runtime.model.shard_model`: planner or `--plan`, DMP) and `checkpoint.load` fills it without an optimizer.
  Sharded embeddings exchange data on every forward, so ranks score in lockstep.
- int8 (`--quantize int8`): the unsharded model with its EmbeddingBagCollection/EmbeddingCollection
  swapped for TorchRec's int8 modules (`quantize_inference_model`, row-wise scale and bias). TorchRec
  shards quantized tables only across the devices of one process (`shard_quant_model` uses
  `ShardingEnv.from_local`, one-to-all input dist), so int8 tables cannot be split across scoring
  processes, and quantizing starts from the fp32 tables anyway: int8 is refused when the model would
  have to be sharded. When the input has labels, the fp32 model is kept as a reference and both score
  the same batches (each rank's first loop.MEASURE_ROWS rows), so the AUC change from quantization is
  measured on exactly the scored rows.

The checkpoint's keys are `model.<key>`: training shards TrainWrapper, whose serving model is `.model`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torchrec.distributed.types import ShardingPlan

from trec_rank.config.experiment import ExperimentConfig
from trec_rank.config.schema import Schema
from trec_rank.data.batch import Batch
from trec_rank.models.embeddings import materialize
from trec_rank.models.registry import build_model
from trec_rank.parallel.env import DistEnv
from trec_rank.runtime.checkpoint import damaged_file
from trec_rank.runtime.safe_dcp import SafeFileSystemReader

log = logging.getLogger(__name__)
MEMORY_FRACTION = 0.5  # leave half of the memory to batches, the fp32->int8 copy and the OS page cache
WRAPPER_PREFIX = "model."  # TrainWrapper.model
Forward = Callable[[Batch], dict[str, torch.Tensor]]


@dataclass
class ScoringModel:
    forward: Forward  # batch (on the model's device) -> logits by output key
    reference: Forward | None  # the fp32 model when int8 scores are compared against it, else None
    kind: str  # "unsharded" | "sharded" | "int8"
    lockstep: bool  # every rank must call forward the same number of times (sharded collectives)


def table_bytes(schema: Schema) -> int:
    """fp32 bytes of every embedding table the model builds."""
    tables = [*schema.pooled_tables, *schema.sequence_tables]
    return sum(schema.table_rows(t.name) * t.embedding_dim * 4 for t in tables)


def available_bytes(device: torch.device) -> int | None:
    """Memory one host can give the model: free GPU memory, or MemAvailable; None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def choose_kind(cfg: ExperimentConfig, env: DistEnv, sharded: bool, quantize: str | None) -> str:
    """Rank 0's decision between unsharded, sharded and int8 (see the module docstring)."""
    copies = 1 if env.device.type == "cuda" else env.local_world_size  # processes sharing one memory
    need = table_bytes(cfg.schema) * copies
    avail = available_bytes(env.device)
    too_big = avail is not None and need > MEMORY_FRACTION * avail
    if quantize:
        if sharded or too_big:
            why = "--sharded or --plan was given" if sharded else (
                f"{copies} process(es) x {need / copies / 2**20:,.0f} MiB of fp32 tables "
                f"exceed {MEMORY_FRACTION:.0%} of {(avail or 0) / 2**20:,.0f} MiB available")
            raise ValueError(f"--quantize {quantize}: int8 scoring keeps the whole model in every process ({why}); "
                             "TorchRec shards int8 tables only within one process. Score fp32 with --sharded.")
        return "int8"
    if too_big and not sharded:
        log.info("sharding the model: %d process(es) x %.0f MiB of tables > %.0f%% of %.0f MiB available",
                 copies, need / copies / 2**20, 100 * MEMORY_FRACTION, (avail or 0) / 2**20)
    return "sharded" if sharded or too_big else "unsharded"


def load_unsharded(cfg: ExperimentConfig, ckpt: Path, device: torch.device) -> nn.Module:
    """The serving model with the checkpoint's weights, in eval mode, no process group involved."""
    model = materialize(build_model(cfg, torch.device("meta")), device)
    state = {WRAPPER_PREFIX + k: v for k, v in model.state_dict().items()}
    try:
        dcp.load({"model": state}, storage_reader=SafeFileSystemReader(str(ckpt)), no_dist=True)
    except CheckpointException as err:
        first = str(err).strip().splitlines()[-1][:300]
        raise ValueError(damaged_file(ckpt) or f"--checkpoint {ckpt}: does not hold this model's weights ({first})"
                         ) from None
    model.load_state_dict({k[len(WRAPPER_PREFIX):]: v for k, v in state.items()})
    return model.eval()


def load_sharded(cfg: ExperimentConfig, env: DistEnv, ckpt: Path, plan: ShardingPlan | None) -> Forward:
    """DMP over the scoring ranks, as in training (`plan` None: plan collectively); returns the serving
    forward (no loss, so no labels needed)."""
    from trec_rank.runtime import checkpoint
    from trec_rank.runtime.model import ranking_spec, shard_model

    dmp = shard_model(ranking_spec(cfg), env, plan)
    checkpoint.load(ckpt, dmp, None)
    dmp.eval()
    # TrainWrapper.forward needs labels for its loss; its `.model` is the serving model, with the
    # sharded modules in place (dmp.module unwraps DMP and the DDP wrapper of the dense part).
    return lambda batch: dmp.module.model(batch)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap the fp32 embedding modules for int8 ones in place (weights row-wise quantized)."""
    from torchrec.inference.modules import quantize_inference_model

    return quantize_inference_model(model)


def load(cfg: ExperimentConfig, env: DistEnv, ckpt: Path, kind: str, plan: ShardingPlan | None,
         keep_reference: bool) -> ScoringModel:
    """Build the model `choose_kind` picked; `keep_reference`: also keep fp32 next to int8 (dAUC)."""
    if kind == "sharded":
        return ScoringModel(load_sharded(cfg, env, ckpt, plan), None, kind, lockstep=True)
    model = load_unsharded(cfg, ckpt, env.device)
    if kind == "unsharded":
        return ScoringModel(model, None, kind, lockstep=False)
    reference = copy.deepcopy(model) if keep_reference else None
    return ScoringModel(quantize_int8(model).eval(), reference, kind, lockstep=False)
