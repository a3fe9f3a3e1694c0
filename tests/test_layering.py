"""Model code never imports distributed code (the layering contract import-linter cannot express).

import-linter checks the package layers in `make lint`; it cannot forbid a subpackage of an external
package, so this test reads the model sources' import statements for `torch.distributed`."""

from __future__ import annotations

import ast
from pathlib import Path

import trec_rank.models

MODELS = Path(trec_rank.models.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_models_never_import_torch_distributed() -> None:
    offenders = {str(p.relative_to(MODELS)): sorted(n for n in _imports(p) if n.startswith("torch.distributed"))
                 for p in sorted(MODELS.rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_sees_an_offending_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from torch.distributed import all_reduce\nimport torch.distributed as dist\n")
    assert {n for n in _imports(bad) if n.startswith("torch.distributed")} == {
        "torch.distributed", "torch.distributed.all_reduce"}
