"""Keep the host memory a training or scoring step frees, instead of faulting it in again every step.

glibc's malloc returns freed memory at the top of its heap to the kernel once more than a trim threshold
of it is free, and serves blocks above an mmap threshold from fresh mappings. Both thresholds adapt, but
only to the largest single block freed (the trim threshold to twice it), while a step frees tens of MiB of
activations and gradients in many smaller blocks. So the heap shrinks after every step and grows again in
the next, and every page comes back as a page fault that the kernel zero-fills: at batch 2048 an MMoE step
took ~600-900 such faults (docs/torchrec-cpu.md, "Host memory between steps").

`keep_freed_memory` fixes both thresholds once per process (mallopt): blocks up to 32 MiB (glibc's largest
mmap threshold on 64-bit) come from the heap, and up to 256 MiB of freed heap stays with the process. It
leaves the allocator alone where the user chose one: any `MALLOC_*` tunable in the environment (glibc reads
those at start-up), a preloaded allocator (`LD_PRELOAD`: jemalloc, tcmalloc), or a C library without
glibc's mallopt (macOS; musl's accepts nothing).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)
MIB = 1024**2
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 * MIB
TRIM_THRESHOLD = 256 * MIB


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Set the two thresholds in this process; True if the C library took them."""
    if environ.get("LD_PRELOAD") or any(key.startswith("MALLOC_") for key in environ):
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already has, its C library's among them
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("host allocator: %s", "freed memory kept (mallopt)" if kept else "left as it is")
    return kept
