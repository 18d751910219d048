"""Keep freed heap memory in the server process instead of handing it back after every request.

A 1,024-row request is a 256-KiB message, and its handling allocates and frees several blocks of
that size (gRPC's slices, the request bytes, onnxruntime's intermediates). glibc's malloc gives
such blocks back to the kernel as soon as they are free (``munmap``, or trimming the heap top past
a threshold that starts at 128 KiB), so the next request faults every page in again and the kernel
zeroes it: measured on the S1 GMM graph, 58-110 page faults per 1,024-row request (two runs).
Raising the mmap and trim thresholds keeps that memory for the next request (~3 faults): 1,024
rows x 8 concurrent, two workers, five interleaved pairs of runs, median +15 % requests/s and
-10 % server CPU per request; one-row requests fault as rarely either way.

The cost is memory that stays with the process: at most ``keep`` bytes of free heap top per
malloc arena, and blocks up to ``keep / 2`` (capped at glibc's 32 MiB) served from the heap, so a
server that once took a large batch holds on to that memory. ``keep = 0`` leaves glibc's defaults.
Only glibc has these knobs (``mallopt``); elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit builds (HEAP_MAX_SIZE / 2)


def malloc_parameters(keep_bytes: int) -> dict[int, int]:
    """The mallopt settings that keep up to ``keep_bytes`` of freed memory (none for 0)."""
    if keep_bytes < 0:
        raise ValueError(f"malloc_keep_mb: expected a size >= 0, got {keep_bytes} bytes")
    if keep_bytes == 0:
        return {}
    return {M_TRIM_THRESHOLD: keep_bytes, M_TOP_PAD: keep_bytes // 4,
            M_MMAP_THRESHOLD: min(keep_bytes // 2, MMAP_THRESHOLD_MAX)}


def keep_freed_memory(keep_bytes: int) -> bool:
    """Apply :func:`malloc_parameters` to this process; True when glibc took every one of them."""
    parameters = malloc_parameters(keep_bytes)
    if not parameters:
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols the process has loaded: its C library's among them
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has it; musl's mallopt accepts and ignores
    except (OSError, AttributeError, TypeError):
        log.info("malloc_keep_mb: this C library has no glibc mallopt; leaving its defaults")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    taken = all(mallopt(parameter, value) == 1 for parameter, value in parameters.items())
    if not taken:
        log.warning("malloc_keep_mb: glibc refused some of %s", parameters)
    return taken
