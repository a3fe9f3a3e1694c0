"""Safe loading: nothing trec-rank reads can run code, and nothing it writes can land outside its output.

Static: every `torch.load` in the package passes `weights_only=True`, YAML is only read with
`safe_load`, no pickle-family module is imported (plans, manifests and job records are JSON).
Behavioural: a checkpoint whose files were replaced by pickles with a malicious `__reduce__` is
refused without running it (a marker file must not appear); a `--passthrough` column named `../x`
only becomes a column name, and training and scoring write nothing outside their run/output directory
(feature and task names such as `../evil` are refused at config load: tests/test_bad_inputs.py).
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import ROOT, run_cli
from trec_rank.config.experiment import read_config

PACKAGE = ROOT / "trec_rank"
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _is_attr(node: ast.AST, owner: str, names: set[str]) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in names and isinstance(node.value, ast.Name) \
        and node.value.id == owner


def test_source_loads_nothing_unsafely() -> None:
    problems, torch_loads = [], 0
    for path, tree in _sources():
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _is_attr(node.func, "torch", {"load"}):
                torch_loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if isinstance(node, ast.Call) and _is_attr(node.func, "yaml", UNSAFE_YAML):
                problems.append(f"{where}:{node.lineno}: yaml.{node.func.attr} (use yaml.safe_load)")
            if isinstance(node, ast.Call) and _is_attr(node.func, "np", {"load"}):
                if any(k.arg == "allow_pickle" for k in node.keywords):
                    problems.append(f"{where}:{node.lineno}: np.load with allow_pickle")
            if isinstance(node, ast.Import) and path.name != "safe_dcp.py":  # it imports pickle to restrict it
                problems += [f"{where}:{node.lineno}: import {a.name}" for a in node.names
                             if a.name.split(".")[0] in PICKLE_MODULES]
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] in PICKLE_MODULES:
                    problems.append(f"{where}:{node.lineno}: from {node.module} import ...")
                if node.module == "yaml" and {a.name for a in node.names} & UNSAFE_YAML:
                    problems.append(f"{where}:{node.lineno}: from yaml import an unsafe loader")
    assert not problems, "\n".join(problems)
    assert torch_loads >= 1  # the scan sees the checkpoint's rng load: it is looking at the right code


# ---- behaviour -------------------------------------------------------------------------------------
class Payload:
    """Pickles to a call of os.system: unpickling it runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def small_config(tmp: Path, data: Path) -> Path:
    """The base config on `data`, a 3-step run evaluated on valid only."""
    cfg = read_config(ROOT / "configs" / "ml100k_base.yaml")  # schema file inlined: the copy is written elsewhere
    cfg["data"].update(path=str(data), eval_splits=["valid"])
    cfg["train"].update(epochs=1, max_steps=3)
    path = tmp / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def trained_run(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[str]]:
    """(sandbox, config, files outside sandbox/a/b/run after training)."""
    sandbox = tmp_path_factory.mktemp("safe-loading")
    config = small_config(sandbox, ml100k_dir / "ranking")
    run = sandbox / "a" / "b" / "run"
    run_cli("train", str(config), "--run-dir", str(run))
    outside = {p for p in tree(sandbox) if not p.startswith("a/b/run")}
    return sandbox, config, outside


def test_outputs_and_passthrough_names_cannot_escape(trained_run: tuple[Path, Path, set[str]],
                                                             ml100k_dir: Path) -> None:
    sandbox, config, outside = trained_run
    assert outside == {"small.yaml", "a", "a/b"}, f"training wrote outside its run dir: {outside}"
    table = pq.read_table(ml100k_dir / "ranking" / "test").slice(0, 3000)
    data = sandbox / "in"
    data.mkdir(exist_ok=True)
    pq.write_table(table.append_column("../x", pa.array(range(3000), pa.int64())), data / "part-0.parquet")
    out = sandbox / "a" / "b" / "out"
    before = tree(sandbox)
    run_cli("score", str(config), "--checkpoint", str(sandbox / "a" / "b" / "run"), "--input", str(data),
            "--output", str(out), "--passthrough", "../x,user_id", "--batch-size", "1000")
    new = {p for p in tree(sandbox) - before if not p.startswith("a/b/out")}
    assert not new, f"score wrote outside --output: {new}"
    scores = pq.read_table(out)
    assert scores.column_names == ["row_index", "../x", "user_id", "p_like"]  # a name stays a column name
    assert scores.num_rows == 3000 and (out / "_SUCCESS").is_file()


def _tampered(trained_run: tuple[Path, Path, set[str]], tmp: Path, member: str) -> tuple[Path, Path]:
    """A copy of the trained checkpoint with `member` replaced by a malicious pickle; returns (ckpt, marker)."""
    sandbox, _, _ = trained_run
    ckpt = tmp / "ckpt"
    shutil.copytree(sorted((sandbox / "a" / "b" / "run" / "checkpoints").glob("step-*"))[-1], ckpt)
    marker = tmp / "PWNED"
    with open(ckpt / member, "wb") as f:
        pickle.dump(Payload(f"touch {marker}"), f)
    return ckpt, marker


def _eval(config: Path, ckpt: Path, tmp: Path):  # noqa: ANN202
    return run_cli("eval", str(config), "--checkpoint", str(ckpt), "--run-dir", str(tmp / "ev"), "--splits", "valid",
                   check=False)


def test_malicious_rng_pickle_is_refused(trained_run: tuple[Path, Path, set[str]], tmp_path: Path) -> None:
    ckpt, marker = _tampered(trained_run, tmp_path, "rng/rank-0.pt")
    proc = _eval(trained_run[1], ckpt, tmp_path)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert not marker.exists(), "the pickle in rng/rank-0.pt was executed"
    assert "rank-0.pt: not a trec-rank RNG state, refused" in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_malicious_dcp_metadata_is_refused(trained_run: tuple[Path, Path, set[str]], tmp_path: Path) -> None:
    ckpt, marker = _tampered(trained_run, tmp_path, ".metadata")
    proc = _eval(trained_run[1], ckpt, tmp_path)
    assert not marker.exists(), "the pickle in .metadata was executed"
    assert proc.returncode == 2 and "refused checkpoint metadata" in proc.stderr, proc.stderr[-2000:]
