"""keep_freed_memory: freed tensors stay in the process, unless the user chose an allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Frees a tensor of argv[1] MiB and prints how many MiB of resident memory went back to the OS.
RETURNED_MIB = """
import sys, torch
from coatnet.cpu_memory import keep_freed_memory
print(keep_freed_memory())
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(int(sys.argv[1]) << 18)
before = rss()
del x
print((before - rss()) >> 20)
"""


def returned_mib(size_mib: int, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", RETURNED_MIB, str(size_mib)], check=True,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    kept, mib = out.stdout.split()[-2:]
    return kept, int(mib)


# 24 MiB: under glibc's largest mmap threshold; 64 MiB: always mmap-ed by glibc's defaults.
@pytest.mark.parametrize("size_mib", [24, 64])
def test_freed_tensor_memory_stays_in_the_process(size_mib: int) -> None:
    kept, mib = returned_mib(size_mib)
    assert kept == "True"
    assert mib < 2  # glibc's default hands it all back (the case below)


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
                                 {"MALLOC_MMAP_THRESHOLD_": "33554432"}])
def test_a_users_malloc_settings_are_left_alone(env: dict[str, str]) -> None:
    kept, mib = returned_mib(64, env)
    assert kept == "False"
    assert mib >= 60
