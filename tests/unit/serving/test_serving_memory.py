"""The server keeps freed heap memory: a request's large blocks are not faulted in afresh each time."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.config import Settings
from serving.runtime.memory import (M_MMAP_THRESHOLD, M_TOP_PAD, M_TRIM_THRESHOLD, MMAP_THRESHOLD_MAX,
                                    malloc_parameters)

ROOT = Path(__file__).resolve().parents[3]

# Allocate and free eight 256-KiB blocks (a 1,024-row request's worth) 200 times; count the page
# faults of the last 200 cycles, in a fresh interpreter so the test process's malloc is untouched.
CYCLES = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from serving.runtime.memory import keep_freed_memory
    keep = int(sys.argv[1])
    assert keep_freed_memory(keep) == (keep > 0)
    def cycle():
        blocks = [np.ones(1 << 16, dtype=np.float32) for _ in range(8)]
        del blocks
    for _ in range(5):
        cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        cycle()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
""")


def faults_per_cycle(keep_bytes: int) -> float:
    result = subprocess.run([sys.executable, "-c", CYCLES, str(keep_bytes)], capture_output=True, text=True,
                            timeout=60, check=True, cwd=ROOT)
    return float(result.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt's thresholds are glibc's")
def test_kept_memory_is_not_faulted_in_again():
    # glibc's defaults hand the blocks back and fault them in again every cycle (measured ~480
    # faults per cycle of 2 MiB); keeping 64 MiB serves every cycle from memory already mapped.
    assert faults_per_cycle(0) > 100
    assert faults_per_cycle(64 << 20) < 5


def test_malloc_parameters():
    assert malloc_parameters(0) == {}
    assert malloc_parameters(64 << 20) == {M_TRIM_THRESHOLD: 64 << 20, M_TOP_PAD: 16 << 20,
                                           M_MMAP_THRESHOLD: 32 << 20}
    assert malloc_parameters(1 << 30)[M_MMAP_THRESHOLD] == MMAP_THRESHOLD_MAX  # glibc refuses more
    with pytest.raises(ValueError, match="malloc_keep_mb"):
        malloc_parameters(-1)


def test_malloc_keep_setting_is_validated(tmp_path):
    assert Settings(repo=tmp_path).malloc_keep_mb == 64
    with pytest.raises(ValidationError, match="malloc_keep_mb"):
        Settings(repo=tmp_path, malloc_keep_mb=-1)
    with pytest.raises(ValidationError, match="malloc_keep_mb"):
        Settings(repo=tmp_path, malloc_keep_mb=4096)
