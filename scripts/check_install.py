"""Is this environment's torch the build its fbgemm-gpu needs? Run by scripts/bootstrap.sh and the Dockerfile.

    python scripts/check_install.py cuda    # exit 1 with one line when torch/fbgemm-gpu do not pair

A machine whose pip finds a local CPU torch wheel first installs a CPU torch next to the CUDA
fbgemm-gpu without complaint; the job then fails (or quietly runs on CPU) on the cluster. The
check needs no GPU and no driver: it imports torch (which loads without one) and reads
fbgemm-gpu's build from its files, since importing the CUDA fbgemm needs the driver's NVML.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

CUDART = re.compile(rb"libcudart\.so\.(\d+)")


def verdict(variant: str, torch_version: str, torch_cuda: str | None, fbgemm_variant: str,
            fbgemm_cuda: int | None) -> str | None:
    """The one-line problem with this pairing, None when it is right for `variant` (cpu or cuda)."""
    if fbgemm_variant != variant:
        return (f"fbgemm-gpu is the {fbgemm_variant} build but TREC_RANK_VARIANT={variant}: remove .venv and "
                f"rerun TREC_RANK_VARIANT={variant} make bootstrap")
    if variant == "cpu":
        return None
    if torch_cuda is None:
        return (f"torch {torch_version} is a CPU build next to the CUDA fbgemm-gpu (pip found a CPU torch wheel "
                f"first): install the CUDA torch wheel of the same version, e.g. pip install --force-reinstall "
                f"--no-deps torch=={torch_version.split('+')[0]} from an index that serves CUDA builds")
    torch_major = int(torch_cuda.split(".")[0])
    if fbgemm_cuda is not None and fbgemm_cuda != torch_major:
        return (f"torch {torch_version} is built for CUDA {torch_cuda} but fbgemm-gpu links CUDA {fbgemm_cuda}: "
                "install the pair built for the same CUDA")
    return None


def linked_cuda_major(libraries: list[Path]) -> int | None:
    """The CUDA runtime major the shared libraries link (libcudart.so.N), None if none names one."""
    for lib in libraries:
        found = CUDART.search(lib.read_bytes())
        if found:
            return int(found.group(1))
    return None


def fbgemm_build() -> tuple[str, int | None]:
    """(variant, CUDA major) of the installed fbgemm-gpu, read from its files without importing it."""
    spec = importlib.util.find_spec("fbgemm_gpu")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("check_install: fbgemm_gpu is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    info = json.loads((root / "docs" / "target.default.json.py").read_text())
    cuda = linked_cuda_major(sorted(root.glob("*.so"))) if info["variant"] == "cuda" else None
    return info["variant"], cuda


def main(variant: str) -> int:
    import torch

    fbgemm_variant, fbgemm_cuda = fbgemm_build()
    problem = verdict(variant, torch.__version__, torch.version.cuda, fbgemm_variant, fbgemm_cuda)
    if problem:
        print(f"check_install: {problem}", file=sys.stderr)
        return 1
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    print(f"check_install: torch {torch.__version__}{cuda} with fbgemm-gpu ({fbgemm_variant}) is a matching pair")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
