"""Keep freed tensor memory inside the process on Linux (glibc malloc) during CPU training.

glibc hands large blocks back to the OS when they are freed (above a threshold that it moves
around at run time, up to 32 MiB), so a training step that allocates the same activations every
step can pay again for page faults that zero fresh memory. Pinning the thresholds keeps a steady
step time: CoAtNet-0 trains 24% faster at 64 px and 28% at 224 px on a 2-core AMD EPYC
(``benchmarks/results/cpu_ablation.md``). The same effect as starting Python with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``, or with jemalloc/tcmalloc
preloaded. The cost: the process keeps its peak heap instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for this setting on 64-bit
_TRIM_THRESHOLD = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Pin glibc's mmap and trim thresholds for this process. True if they were set.

    Does nothing (False) off Linux/glibc, or when the user already chose: glibc ``MALLOC_*``
    variables, malloc ``GLIBC_TUNABLES``, or another allocator in ``LD_PRELOAD``.
    """
    if not sys.platform.startswith("linux"):
        return False
    if (any(os.environ.get(name) for name in _USER_SETTINGS)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or os.environ.get("LD_PRELOAD", "").strip()):
        logger.debug("malloc settings left as the environment chose")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
