"""`trec-rank export` through the real CLI entry point: every ranking model kind's exported program scores
what `trec-rank score` scores, int8 keeps the AUC, the program runs where trec_rank cannot be imported, and
bad input ends with one `error:` line.

Data: `trec-rank data synthetic` rows for each config's own schema (histories of length 0..max_len, so
empty ones too), 2,000 rows (test split: 200). Models: each config as shipped, trained for 2 steps; a
trained checkpoint per kind is shared by the tests (module-scoped cache). CLI calls run in this process
(`trec_rank.cli.main`): the same entry point as the shell, without an interpreter start per call.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import ROOT
from trec_rank import cli
from trec_rank.config.experiment import ExperimentConfig, load_config
from trec_rank.config.models import side_bounds
from trec_rank.data.batch import Batch
from trec_rank.data.dataset import ParquetDataset
from trec_rank.data.prepare.synthetic import prepare_synthetic
from trec_rank.export.artifact import ARTIFACT_FILE, PROGRAM_FILE, Artifact, load_artifact
from trec_rank.export.contract import Contract
from trec_rank.runtime.checkpoint import read_state, resolve

KINDS = {  # model kind -> config
    "base": "ml100k_base", "din": "ml100k_din", "din_feedback": "ml100k_din_feedback",
    "esmm": "ml100k_esmm", "esmm_din": "ml100k_esmm_din", "hstu": "ml100k_hstu_ranking",
    "hstu_esmm": "ml100k_hstu_esmm", "shared_bottom": "adult_shared_bottom", "moe": "adult_moe",
    "mmoe": "adult_mmoe", "cgc": "adult_cgc", "ple": "adult_ple",
}
ROWS = 2000


def config(kind: str) -> str:
    return str(ROOT / "configs" / f"{KINDS[kind]}.yaml")


def align_histories(root: Path, cfg: ExperimentConfig) -> None:
    """Histories a DIN group attends together are parallel lists (as in real data); synthetic rows draw each
    length independently, so the others of a group become ids of their own table, one per first-history id."""
    schema = cfg.schema
    for group in Contract.from_config(cfg).aligned:
        first, others = schema.feature(group[0]), [schema.feature(f) for f in group[1:]]
        for file in sorted(root.glob("*/*.parquet")):
            table = pq.read_table(file)
            lead = table[first.column].combine_chunks()
            for f in others:
                ids = pc.remainder(lead.values, schema.table(f.table).num_embeddings)
                column = pa.ListArray.from_arrays(lead.offsets, ids)
                table = table.set_column(table.schema.get_field_index(f.column), f.column, column)
            pq.write_table(table, file)


class Runs:
    """Synthetic data per config and one 2-step training run per kind, made on first use."""

    def __init__(self, root: Path) -> None:
        self.root, self.data, self.runs = root, {}, {}
        self.artifacts: dict[tuple[str, ...], tuple[Path, str]] = {}

    def data_for(self, kind: str) -> Path:
        if kind not in self.data:
            out = self.root / f"data-{kind}"
            cfg = load_config(config(kind))
            prepare_synthetic(cfg.schema, ROWS, out, seed=0)
            align_histories(out, cfg)
            self.data[kind] = out
        return self.data[kind]

    def sets(self, kind: str) -> list[str]:
        return [f"data.path={self.data_for(kind)}", "data.batch_size=128", "data.eval_batch_size=128"]

    def run_for(self, kind: str) -> Path:
        if kind not in self.runs:
            run = self.root / f"run-{kind}"
            cli.train(config(kind), [*self.sets(kind), "train.max_steps=2", "train.epochs=1"], str(run))
            self.runs[kind] = run
        return self.runs[kind]

    def artifact(self, capsys: pytest.CaptureFixture, kind: str, *extra: str) -> tuple[Path, str]:
        """(export dir, what export printed) of `kind` exported with `extra` flags, made once."""
        key = (kind, *extra)
        if key not in self.artifacts:
            out = self.root / f"art-{kind}{''.join(extra)}"
            self.artifacts[key] = (out, export(capsys, self, kind, out, *extra))
        return self.artifacts[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("export"))


def main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`trec-rank ARGS` in this process: exit code, and what this call alone printed."""
    capsys.readouterr()  # drop earlier output (a fixture's training run)
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def export(capsys: pytest.CaptureFixture, runs: Runs, kind: str, out: Path, *extra: str) -> str:
    sets = [a for s in runs.sets(kind) for a in ("--set", s)]
    code, stdout, stderr = main(capsys, "export", config(kind), "--checkpoint", str(runs.run_for(kind)),
                                "--out", str(out), *sets, *extra)
    assert code == 0, stderr
    return stdout


def score(capsys: pytest.CaptureFixture, runs: Runs, kind: str, out: Path, *extra: str) -> dict[str, np.ndarray]:
    """`trec-rank score` of the test split: column -> values in row_index order."""
    sets = [a for s in runs.sets(kind) for a in ("--set", s)]
    code, _, stderr = main(capsys, "score", config(kind), "--checkpoint", str(runs.run_for(kind)), "--input",
                           str(runs.data_for(kind) / "test"), "--output", str(out), *sets, *extra)
    assert code == 0, stderr
    table = pq.read_table(out)
    order = np.argsort(table["row_index"].to_numpy(), kind="stable")
    return {c: table[c].to_numpy()[order] for c in table.column_names}


def split_batches(art: Artifact, data: Path, batch_size: int) -> Iterator[Batch]:
    cfg = art.config
    ds = ParquetDataset(str(data / "test"), cfg.schema, batch_size, shuffle=False, drop_last=False,
                        with_labels=False, side_bounds=side_bounds(cfg.model.typed_params))
    return ds.batches(0, 0)


def predict(art_dir: Path, data: Path) -> dict[str, np.ndarray]:
    """Artifact.predict over the test split in row order."""
    art = load_artifact(art_dir)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in split_batches(art, data, 128):
        for name, p in art.predict(batch).items():
            assert p.dtype == torch.float32 and p.shape == (batch.batch_size,)
            parts.setdefault(name, []).append(p.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def single_rows(art_dir: Path, data: Path) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(row, Artifact.predict of that row alone) for the first rows and every row with an empty sequence
    feature: batches of one id per feature, or of no id at all, are where traced shapes specialise."""
    art = load_artifact(art_dir)
    for row, batch in enumerate(split_batches(art, data, 1)):
        if row < 4 or (batch.sequence.keys() and bool((batch.sequence.lengths() == 0).any())):
            yield row, art.predict(batch)


@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_scores_equal_trec_rank_score(kind: str, runs: Runs, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    art, stdout = runs.artifact(capsys, kind)
    assert "export: saved program vs model on 200 rows" in stdout
    scored = score(capsys, runs, kind, tmp_path / "scores")
    meta = json.loads((art / ARTIFACT_FILE).read_text())
    assert sorted(f"p_{k}" for k in meta["outputs"]) == sorted(c for c in scored if c.startswith("p_"))
    got = predict(art, runs.data_for(kind))
    for name in meta["outputs"]:
        np.testing.assert_allclose(got[name], scored[f"p_{name}"], rtol=0, atol=1e-5, err_msg=name)
    for row, probs in single_rows(art, runs.data_for(kind)):
        for name in meta["outputs"]:
            np.testing.assert_allclose(probs[name].numpy(), scored[f"p_{name}"][row:row + 1], rtol=0, atol=1e-5)
    assert meta["fingerprints"]["model"] == read_state(resolve(runs.run_for(kind)))["fingerprint"]


def test_int8_auc_change_is_printed_and_small(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    art, stdout = runs.artifact(capsys, "din", "--quantize", "int8")
    line = next(x for x in stdout.splitlines() if x.startswith("export: int8 vs fp32 on 200 rows: like/auc"))
    check = json.loads((art / ARTIFACT_FILE).read_text())["check"]
    assert f"(dAUC {check['auc']['like']['delta']:+.5f})" in line
    assert abs(check["auc"]["like"]["delta"]) <= 0.002
    # every table is saved once: TorchRec's per-table views of the int8 weights stay out of the program
    program = torch.export.load(str(art / PROGRAM_FILE))
    uint8 = [k for k, v in [*program.state_dict.items(), *program.constants.items()]
             if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 2 and v.numel() > 0]
    assert not uint8, uint8
    # the int8 program scores what `trec-rank score --quantize int8` scores
    scored = score(capsys, runs, "din", tmp_path / "scores8", "--quantize", "int8")
    np.testing.assert_allclose(predict(art, runs.data_for("din"))["like"], scored["p_like"], rtol=0, atol=1e-5)


CHILD = textwrap.dedent("""
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "trec_rank" or name.startswith("trec_rank."):
                raise ImportError(f"{name} is hidden in this process")
    sys.meta_path.insert(0, Block())
    try:
        import trec_rank  # noqa: F401
        raise SystemExit("trec_rank is importable")
    except ImportError:
        pass
    import torch, fbgemm_gpu, torchrec  # noqa: F401 - the program's operators
    for art, inputs in zip(sys.argv[1::2], sys.argv[2::2]):
        meta = json.load(open(f"{art}/artifact.json"))
        program = torch.export.load(f"{art}/model.pt2").module()
        saved = torch.load(inputs)
        assert [t["name"] for t in meta["inputs"]] == saved["names"]
        with torch.no_grad():
            out = program(*saved["inputs"])
        for name, p in zip(meta["outputs"], out):
            torch.testing.assert_close(p, saved["expected"][name], rtol=0, atol=1e-6)
        print("ok", art, meta["outputs"], meta["quantize"])
    assert "trec_rank" not in sys.modules
""")


def test_artifact_runs_without_trec_rank(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = []
    for kind, extra in (("din", ("--quantize", "int8")), ("hstu_esmm", ())):
        art, _ = runs.artifact(capsys, kind, *extra)
        loaded = load_artifact(art)
        batch = next(split_batches(loaded, runs.data_for(kind), 64))
        inputs = tmp_path / f"inputs-{kind}.pt"
        torch.save({"names": [t["name"] for t in loaded.meta["inputs"]], "inputs": loaded.contract.flatten(batch),
                    "expected": loaded.predict(batch)}, inputs)
        args += [str(art), str(inputs)]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # no PYTHONPATH
    child = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, env=env)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.count("ok ") == 2, child.stdout


@pytest.mark.parametrize("case", ["fingerprint", "retrieval", "out_not_export", "no_checkpoint"])
def test_bad_input_is_one_error_line(case: str, runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, cfg, ckpt = tmp_path / "art", config("din"), str(runs.run_for("base"))
    if case == "fingerprint":
        expected = "checkpoint was trained with another schema/model"
    elif case == "retrieval":
        cfg, expected = str(ROOT / "configs" / "ml100k_hstu.yaml"), "a retrieval config (kind: retrieval)"
    elif case == "out_not_export":
        cfg = config("base")
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = "not an earlier export"
    else:
        ckpt, expected = str(tmp_path), "no complete checkpoint"
    code, _, stderr = main(capsys, "export", cfg, "--checkpoint", ckpt, "--out", str(out))
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert case == "out_not_export" or not out.exists()
    assert not list(tmp_path.glob(".art.tmp-*"))


def test_damaged_artifact_is_refused_naming_the_file(runs: Runs, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    art = tmp_path / "art"
    shutil.copytree(runs.artifact(capsys, "base")[0], art)
    (art / PROGRAM_FILE).write_bytes((art / PROGRAM_FILE).read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{art / PROGRAM_FILE}: damaged model file"):
        load_artifact(art)
    (art / ARTIFACT_FILE).write_text("{")
    with pytest.raises(ValueError, match=f"{art / ARTIFACT_FILE}: damaged artifact file"):
        load_artifact(art)
    with pytest.raises(ValueError, match="not a trec-rank export"):
        load_artifact(tmp_path / "missing")
    # an earlier export is replaced, not refused
    stdout = export(capsys, runs, "base", art, "--eval-split", "")
    assert "replaced the earlier export" in stdout and load_artifact(art).outputs == ["like"]
