"""keep_freed_memory: freed tensors stay in the process, unless the user chose an allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Frees a 24 MiB tensor and prints how many MiB of resident memory went back to the OS.
RETURNED_MIB = """
import sys, torch
from coatnet.cpu_memory import keep_freed_memory
print(keep_freed_memory())
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(24 << 18)
before = rss()
del x
print((before - rss()) >> 20)
"""


def returned_mib(env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", RETURNED_MIB], check=True, capture_output=True,
                         text=True, timeout=120, env={**os.environ, **(env or {})})
    kept, mib = out.stdout.split()[-2:]
    return kept, int(mib)


def test_freed_tensor_memory_stays_in_the_process() -> None:
    kept, mib = returned_mib()
    assert kept == "True"
    assert mib < 2  # glibc's default hands all 24 MiB back (the case below)


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_a_users_malloc_settings_are_left_alone(env: dict[str, str]) -> None:
    kept, mib = returned_mib(env)
    assert kept == "False"
    assert mib >= 20
