"""An export directory, loaded: what `trec-rank serve` and any Python caller use to score a `Batch`.

DIR/
  model.pt2       the torch.export program (torch.export.save): FlatModel.forward(*inputs) -> probabilities
  artifact.json   input contract, outputs, input schema, fingerprints, package versions, export checks
  config.yaml     the resolved experiment config (schema inlined), for `load_config`: request conversion

The program itself needs torch, fbgemm_gpu and torchrec only (docs/export.md shows the loop without
trec_rank); this module adds the trec_rank side: a `Batch` in, probabilities by output name out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trec_rank.config.experiment import ExperimentConfig, load_config
from trec_rank.data.batch import Batch
from trec_rank.export.contract import Contract

ARTIFACT_FILE = "artifact.json"
PROGRAM_FILE = "model.pt2"
CONFIG_FILE = "config.yaml"
FORMAT = 1


@dataclass
class Artifact:
    meta: dict[str, Any]  # artifact.json
    config: ExperimentConfig
    program: nn.Module  # ExportedProgram.module(): (*inputs) -> tuple of [B] float32 probabilities
    contract: Contract

    @property
    def outputs(self) -> list[str]:
        """Output names: `trec-rank score` writes the same probabilities as p_<name>."""
        return list(self.meta["outputs"])

    @torch.no_grad()
    def predict(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Probabilities [B] float32 per output name for a batch built by the data layer (labels unused)."""
        probs = self.program(*self.contract.flatten(batch))
        return dict(zip(self.outputs, probs, strict=True))


def read_meta(path: Path) -> dict[str, Any]:
    """artifact.json of an export dir; ValueError naming the file when missing, damaged or of another format."""
    file = path / ARTIFACT_FILE
    if not file.is_file():
        raise ValueError(f"{file}: not found; {path} is not a trec-rank export (make one with `trec-rank export`)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: damaged artifact file ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{file}: not a format-{FORMAT} trec-rank export (format {meta.get('format')!r})"
                         if isinstance(meta, dict) else f"{file}: damaged artifact file (not a JSON object)")
    return meta


def load_program(file: Path) -> nn.Module:
    """The saved program as a callable module; registers the fbgemm/torchrec operators it calls first."""
    import fbgemm_gpu  # noqa: F401 - registers torch.ops.fbgemm
    import torchrec  # noqa: F401 - registers torchrec's operators

    if not file.is_file():
        raise ValueError(f"{file}: not found (the export is incomplete)")
    try:
        return torch.export.load(str(file)).module()
    except Exception as err:  # torch.export.load reports a bad archive with many exception types
        raise ValueError(f"{file}: damaged model file ({type(err).__name__}: {str(err)[:200]})") from None


def load_artifact(path: str | Path) -> Artifact:
    """Load an export dir (see the module docstring); ValueError naming the file for a missing/damaged one."""
    path = Path(path)
    meta = read_meta(path)
    try:
        contract = Contract.from_json(meta["contract"])
        outputs = meta["outputs"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path / ARTIFACT_FILE}: damaged artifact file (missing {err})") from None
    if not isinstance(outputs, list) or not outputs:
        raise ValueError(f"{path / ARTIFACT_FILE}: damaged artifact file (no outputs)")
    config = load_config(path / CONFIG_FILE)  # a ConfigError (ValueError) names the file
    return Artifact(meta, config, load_program(path / PROGRAM_FILE), contract)
